"""One FSDP2 run for tests/integration/test_quant_fsdp.py: 2 gloo processes, Lightning's ModelParallelStrategy.

python fsdp_quant_run.py OUT_DIR {ptq,prune_qat,qat_dict} [--checkpoint-every N] [--resume CKPT] [--no-convert]

Every rank writes ``OUT_DIR/rank<r>.json``: its activation observers before any synchronization and at fit end,
the callback's results, whether it holds the int8 model, and a checksum of the gathered full weights. Rank 0 also
writes ``OUT_DIR/reference.pt``: fixed inputs and the outputs of the gathered network on them (fake-quant for QAT,
float for PTQ), to compare the int8 artifact with. The artifact goes to ``OUT_DIR/int8/``. ``qat_dict`` trains a
network that returns a dict, which the ONNX backend refuses: the preflight fails on rank 0, during training.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ResumableLoader, TinyClassifier, TinyNet, classification_data, loader, shard_tiny_classifier
from lightning_compress import IterativePruningCallback, PostTrainingQuantCallback, QATCallback
from lightning_compress.engine.fake_quant import prepare_qat


class ShardedClassifier(TinyClassifier):
    """Rank 1 trains on inputs 5x wider than rank 0's, so the ranks' observers really see different ranges."""

    def configure_model(self):
        shard_tiny_classifier(self)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x * (1.0 + 4.0 * self.global_rank), y), batch_idx)


class DictNet(TinyNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": super().forward(x)}


class DictClassifier(ShardedClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = DictNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["logits"]


def _observers(module) -> dict[str, list[float]]:
    return {k: v.float().flatten().tolist() for k, v in module.state_dict().items() if ".activation_observer." in k}


class Record(Callback):
    """Listed after the compression callbacks: its ``on_fit_end`` sees their results."""

    def __init__(self, out_dir, quant):
        self.out_dir, self.quant, self.first, self.local = Path(out_dir), quant, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first is None and trainer.global_step >= 2:  # QAT is on, before the first validation syncs
            self.first = _observers(pl_module)
        if batch_idx == trainer.num_training_batches - 1:  # before the epoch's validation synchronizes them
            self.local = _observers(pl_module)

    def on_fit_end(self, trainer, pl_module):
        full = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        record = {
            "first": self.first,
            "local": self.local,
            "observers": _observers(pl_module),
            "results": {k: v for k, v in self.quant.results.items() if isinstance(v, (float, str))},
            "has_int8": self.quant.quantized_model is not None,
        }
        if trainer.global_rank == 0:
            record["checksum"] = sum(float(t.double().abs().sum()) for k, t in full.items() if k.endswith("weight"))
            weights = {k: t for k, t in full.items() if k.endswith("weight")}
            record["zeros"] = sum(int((t == 0).sum()) for k, t in weights.items() if "fc" in k)
            net = TinyNet()
            if isinstance(self.quant, QATCallback):
                prepare_qat(net, self.quant.config)
            net.load_state_dict({k.removeprefix("net."): v for k, v in full.items()})
            x = classification_data(64, seed=1).tensors[0]
            with torch.no_grad():
                torch.save({"x": x, "out": net.eval()(x)}, self.out_dir / "reference.pt")
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out_dir, kind = sys.argv[1], sys.argv[2]
    every = int(sys.argv[sys.argv.index("--checkpoint-every") + 1]) if "--checkpoint-every" in sys.argv else 0
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    L.seed_everything(0)
    save = str(Path(out_dir) / "int8" / f"{kind}_int8.onnx")
    if kind == "ptq":
        quant = PostTrainingQuantCallback(module="net", monitor="val_acc", latency="off", save_path=save, verbose=False)
    else:
        convert = "--no-convert" not in sys.argv
        quant = QATCallback(
            module="net",
            monitor="val_acc",
            latency="off",
            averaging_constant=0.1,
            save_path=save,
            verbose=False,
            convert_on_fit_end=convert,
        )
    callbacks = [quant, Record(out_dir, quant)]
    if kind == "prune_qat":
        callbacks.insert(0, IterativePruningCallback(target_sparsity=0.5, start_step=2, end_step=12, verbose=False))
    if every:
        callbacks.append(ModelCheckpoint(dirpath=Path(out_dir) / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        default_root_dir=out_dir,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    model = DictClassifier() if kind == "qat_dict" else ShardedClassifier()
    trainer.fit(model, ResumableLoader(classification_data()), loader(64), ckpt_path=resume)
    # Tear the process group down before the interpreter exits: gloo's threads otherwise sometimes abort the exit.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
