"""One FSDP2 run for tests/integration/test_pruning_fsdp.py: 2 gloo processes, Lightning's ModelParallelStrategy.

python fsdp_pruning_run.py OUT_DIR [--checkpoint-every N] [--resume CKPT] [--lr LR]

Every rank writes ``OUT_DIR/rank<r>.json``: the zeros and sizes of the gathered full weights, a checksum of them,
the callback's results, the masks' local shapes, and the flat indices of the zeros of every pruned weight.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ResumableLoader, TinyClassifier, classification_data, shard_tiny_classifier
from lightning_compress import IterativePruningCallback


class ShardedClassifier(TinyClassifier):
    def configure_model(self):
        shard_tiny_classifier(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class FullWeights(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, IterativePruningCallback))
        full = {n: p.full_tensor().detach() for n, p in pl_module.named_parameters()}
        pruned = [n for n in full if n in pruning.pruner.weights]
        record = {
            "zeros": sum(int((full[n] == 0).sum()) for n in pruned),
            "numel": sum(full[n].numel() for n in pruned),
            "checksum": sum(float(t.double().abs().sum()) for t in full.values()),
            "results": {k: v for k, v in pruning.results.items() if isinstance(v, float)},
            "local_mask_rows": {n: list(m.shape) for n, m in pruning.pruner.masks.items()},
            "zero_indices": {n: (full[n] == 0).flatten().nonzero().flatten().tolist() for n in pruned},
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out_dir = sys.argv[1]
    every = int(sys.argv[sys.argv.index("--checkpoint-every") + 1]) if "--checkpoint-every" in sys.argv else 0
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    lr = float(sys.argv[sys.argv.index("--lr") + 1]) if "--lr" in sys.argv else 0.05
    L.seed_everything(0)
    pruning = IterativePruningCallback(
        target_sparsity=0.7, start_step=2, end_step=20, update_every_n_steps=3, verbose=False
    )
    callbacks = [pruning, FullWeights(out_dir)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=Path(out_dir) / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(ShardedClassifier(lr=lr), ResumableLoader(classification_data()), ckpt_path=resume)
    # Tear the process group down before the interpreter exits: gloo's threads otherwise sometimes abort the exit.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
