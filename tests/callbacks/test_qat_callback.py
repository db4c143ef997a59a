"""QATCallback in real Trainers: any forward, pruning + QAT, checkpoints and resume, schedule, logging, errors.

Conversions are the slow part (~1 s each for these tiny models once torchao is imported); the tests that need one
share it where they can, and use ``latency="off"`` except one.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import ResumableLoader, TinyClassifier, classification_data, loader, trainer
from lightning_compress import IterativePruningCallback, QATCallback, load_quantized
from lightning_compress.demos.models import ResidualCNN
from lightning_compress.engine.convert import Int8ConversionError, int8_weights
from lightning_compress.engine.fake_quant import FakeQuantModule, fake_quant_modules, quant_state_keys

# --------------------------------------------------------------------------------------------------------------------
# Models (module level: checkpoints store hyperparameters, the DDP test pickles them)
# --------------------------------------------------------------------------------------------------------------------


class Classifier(TinyClassifier):
    """TinyClassifier with test and predict steps."""

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])


class TwoInputNet(nn.Module):
    """``forward(x, side, *, scale)``: two tensors and a keyword-only argument."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(16, 32)
        self.side = nn.Linear(8, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, side: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(torch.relu(self.main(x) + self.side(side))) * scale


class TwoInputModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TwoInputNet()

    def training_step(self, batch, batch_idx):
        x, side, y = batch
        return F.cross_entropy(self.net(x, side, scale=2.0), y)

    def validation_step(self, batch, batch_idx):
        x, side, y = batch
        self.log("val_acc", (self.net(x, side, scale=2.0).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def two_input_loader(n: int = 192, batch_size: int = 32) -> DataLoader:
    data = classification_data(n)
    side = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(data.tensors[0], side, data.tensors[1]), batch_size=batch_size)


class TransformerModule(L.LightningModule):
    """Lightning's demo Transformer: ``forward(inputs, target, mask=None)``, nn.Transformer with a causal mask."""

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=50, ninp=32, nhead=2, nhid=32, nlayers=1)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self.model(inputs, target), target.view(-1))

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val_nll", F.nll_loss(self.model(inputs, target), target.view(-1)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_loader() -> DataLoader:
    tokens = torch.randint(0, 50, (64, 8), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(tokens, tokens.roll(1, 1)), batch_size=16)


class ResidualModule(L.LightningModule):
    """The demo ResidualCNN (Conv-BN-ReLU, residual adds, 1x1 shortcuts) at toy width on 12x12 images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ResidualCNN(widths=(4, 8, 8), num_classes=4)
        self.example_input_array = torch.zeros(2, 1, 12, 12)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def image_loader(n: int = 96, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g) * 0.5
    x[:, :, :6, :6] += y.view(-1, 1, 1, 1).float()  # a learnable signal
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class NotExportable(TinyClassifier):
    """Python control flow on a tensor value: trains fine, cannot be exported."""

    def forward(self, x):
        out = self.net(x)
        if out.sum() > 0:
            return out
        return -out


class FailIfTrained(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step ran before the configuration error")


def _observer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".activation_observer." in k}


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------------------
# Any model, no edits
# --------------------------------------------------------------------------------------------------------------------


def test_multi_input_keyword_forward_and_int8_matches_fake_quant(tmp_path):
    L.seed_everything(0)
    module = TwoInputModule()
    params_before = list(module.parameters())
    forward_before = type(module.net).forward
    callback = QATCallback(
        backend="inductor", module="net", monitor="val_acc", latency="off", save_path=str(tmp_path / "int8.pt2")
    )
    trainer(tmp_path, [callback], max_epochs=2).fit(module, two_input_loader(), two_input_loader(64))

    assert set(fake_quant_modules(module.net)) == {"main", "side", "head"}
    assert all(a is b for a, b in zip(module.parameters(), params_before, strict=True))  # same Parameter objects
    assert "forward" not in vars(module.net) and type(module.net).forward is forward_before  # forward never patched
    # the exported int8 program takes the same call, with a dynamic batch
    x, side = torch.randn(5, 16), torch.randn(5, 8)
    module.eval()
    with torch.no_grad():
        fake = module.net(x, side, scale=2.0)
        int8 = callback.quantized_model(x, side, scale=2.0)
        # called exactly like the float network: positional or keyword, and from the saved artifact
        assert torch.equal(callback.quantized_model(x, side=side, scale=2.0), int8)
        assert torch.equal(callback.quantized_model(side=side, x=x, scale=2.0), int8)
        assert torch.equal(load_quantized(tmp_path / "int8.pt2")(x, side, scale=2.0), int8)
    assert int8.shape == (5, 4)
    assert torch.allclose(int8, fake, atol=0.05 * fake.abs().max().item())
    results = callback.results
    assert results["top1_agreement"] >= 0.95
    assert results["int8_val_acc"] == pytest.approx(results["fake_quant_val_acc"], abs=0.05)
    assert results["val_acc_drop"] == pytest.approx(results["fake_quant_val_acc"] - results["int8_val_acc"])
    assert {"sqnr/main", "sqnr/side", "sqnr/head", "activation_scale/main", "weight_scale/head"} <= set(results)
    assert results["saved_to"] == str(tmp_path / "int8.pt2") and (tmp_path / "int8.pt2").is_file()


def test_whole_lightning_module_as_target(tmp_path):
    """``module=None``: the LightningModule itself is prepared; the metric is measured through its ``forward``."""
    L.seed_everything(0)
    model = Classifier()
    model.example_input_array = torch.zeros(4, 16)
    callback = QATCallback(backend="inductor", monitor="val_acc", latency="off")
    trainer(tmp_path, [callback], max_epochs=1).fit(model, loader(), loader(64))
    assert set(fake_quant_modules(model)) == {"net.fc1", "net.fc2"}
    assert callback.results["top1_agreement"] >= 0.95
    assert "forward" not in vars(model)  # the swap used for the measurement was undone


def test_demo_transformer_trains_with_fake_quant_and_checkpoints_load_strictly(tmp_path):
    L.seed_everything(0)
    module = TransformerModule()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    callback = QATCallback(backend="inductor", module="model", convert_on_fit_end=False)
    trainer(tmp_path, [callback, saver], max_epochs=1, enable_checkpointing=True).fit(module, token_loader())
    prepared = fake_quant_modules(module.model)
    assert {"decoder", "transformer.encoder.layers.0.linear1", "transformer.decoder.layers.0.linear2"} <= set(prepared)
    assert all(m.observer.is_initialized for m in prepared.values())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not quant_state_keys(checkpoint["state_dict"])  # observers live in the callback's state
    plain = TransformerModule.load_from_checkpoint(tmp_path / "last.ckpt")  # strict, no callback, no edits
    assert not fake_quant_modules(plain)
    assert torch.equal(plain.model.decoder.weight, module.model.decoder.weight)


@pytest.mark.slow
def test_demo_transformer_int8(tmp_path):
    """The demo Transformer passes an explicit causal mask to nn.Transformer: it still exports and converts."""
    L.seed_everything(0)
    module = TransformerModule()
    callback = QATCallback(backend="inductor", module="model", monitor="val_nll", latency="off")
    trainer(tmp_path, [callback], max_epochs=1).fit(module, token_loader(), token_loader())
    inputs, target = next(iter(token_loader()))
    module.eval()
    with torch.no_grad():
        fake = module.model(inputs, target)
        int8 = callback.quantized_model(inputs[:5], target[:5])
    assert int8.shape == (5 * 8, 50)
    assert callback.results["top1_agreement"] >= 0.95
    assert callback.results["int8_val_nll"] == pytest.approx(callback.results["fake_quant_val_nll"], rel=0.05)
    assert int8_weights(callback.quantized_program)
    assert torch.isfinite(fake).all()


def test_residual_cnn_with_batchnorm(tmp_path):
    L.seed_everything(0)
    module = ResidualModule()
    callback = QATCallback(backend="inductor", module="net", monitor="val_acc", latency="off", freeze_bn_at=4)
    trainer(tmp_path, [callback], max_epochs=2).fit(module, image_loader(), image_loader(48))
    assert len(fake_quant_modules(module.net)) == 10  # stem, 2 convs per block, 2 shortcut convs, the head
    assert len(int8_weights(callback.quantized_program)) == len(fake_quant_modules(module.net))
    assert callback.results["top1_agreement"] >= 0.95
    module.eval()
    x = next(iter(image_loader()))[0]
    with torch.no_grad():
        fake, int8 = module(x), callback.quantized_model(x)
    assert (fake.argmax(1) == int8.argmax(1)).float().mean() >= 0.9


# --------------------------------------------------------------------------------------------------------------------
# Pruning + QAT
# --------------------------------------------------------------------------------------------------------------------


class ZeroKeeper(Callback):
    """Counts weights that were zero at a training step and are non-zero at a later one, once QAT is on."""

    def __init__(self) -> None:
        self.revived = 0
        self.steps_with_fake_quant = 0
        self._zeros: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layers = fake_quant_modules(pl_module.net)
        if any(m.is_fake_quant_enabled for m in layers.values()):
            self.steps_with_fake_quant += 1
        for name in ("fc1", "fc2"):
            weight = pl_module.net.get_submodule(name).weight.detach()
            if name in self._zeros:
                self.revived += int((weight[self._zeros[name]] != 0).sum())
            self._zeros[name] = weight == 0


@pytest.mark.parametrize("qat_first", [True, False])
def test_pruning_and_qat_in_one_trainer_give_sparse_int8(tmp_path, qat_first):
    L.seed_everything(0)
    model = Classifier()
    pruning = IterativePruningCallback(target_sparsity=0.8, start_step=0, end_step=12, update_every_n_steps=2)
    qat = QATCallback(backend="inductor", module="net", start=4, latency="off")
    keeper = ZeroKeeper()
    callbacks = [qat, pruning] if qat_first else [pruning, qat]
    trainer(tmp_path, [*callbacks, keeper], max_epochs=3).fit(model, loader())

    assert keeper.steps_with_fake_quant == 24 - 4
    assert keeper.revived == 0  # QAT's straight-through gradients never bring a pruned weight back
    weights = {"fc1": model.net.fc1.weight.detach(), "fc2": model.net.fc2.weight.detach()}
    pruned = sum(int((w == 0).sum()) for w in weights.values())
    assert pruned == round(0.8 * 1280)
    int8 = int8_weights(qat.quantized_program)
    assert len(int8) == 2
    zero_int8 = sum(int((q == 0).sum()) for q in int8.values())
    assert zero_int8 >= pruned  # every pruned weight is a zero int8 weight (rounding may add a few more)
    for q in int8.values():  # position by position: match each int8 tensor to its layer by shape
        (name,) = [n for n, w in weights.items() if w.shape == q.shape]
        assert bool((q[weights[name] == 0] == 0).all())


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: test(ckpt_path), second fit, load_from_checkpoint, resume, load_checkpoint helper
# --------------------------------------------------------------------------------------------------------------------


def test_test_ckpt_path_second_fit_and_load_from_checkpoint_after_qat(tmp_path):
    L.seed_everything(0)
    model = Classifier()
    callback = QATCallback(backend="inductor", module="net", monitor="val_acc", latency="off")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    fit = trainer(tmp_path, [callback, saver], max_epochs=2, enable_checkpointing=True)
    fit.fit(model, loader(), loader(64))
    first_program = callback.quantized_program
    assert fake_quant_modules(model.net), "the LightningModule stays the fake-quant training model"
    in_memory = fit.validate(model, loader(64), verbose=False)[0]["val_acc"]

    # test from the checkpoint: the observers come back from the callback state, so it is the same model
    tested = fit.test(ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), dataloaders=loader(64), verbose=False)
    assert tested[0]["test_acc"] == pytest.approx(in_memory)

    # a second fit continues from the trained fake-quant model and converts again
    second = trainer(tmp_path, [callback], max_epochs=1)
    second.fit(model, loader(), loader(64))
    assert second.global_step == 8
    assert callback.quantized_program is not first_program
    assert all(isinstance(m, FakeQuantModule) for m in fake_quant_modules(model.net).values())

    # Lightning's own loader, strict, into the plain class: no fake-quant keys in the model state
    plain = Classifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert not fake_quant_modules(plain)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert torch.equal(plain.net.fc1.weight, checkpoint["state_dict"]["net.fc1.weight"])


def test_load_checkpoint_helper_restores_the_fake_quant_model(tmp_path):
    L.seed_everything(0)
    model = Classifier()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    callback = QATCallback(backend="inductor", module="net", freeze_bn_at=3, convert_on_fit_end=False)
    trainer(tmp_path, [callback, saver], max_epochs=1, enable_checkpointing=True).fit(model, loader())

    fresh = QATCallback(backend="inductor", module="net").load_checkpoint(Classifier(), tmp_path / "last.ckpt")
    assert _states_equal(_observer_state(fresh), _observer_state(model))
    x = torch.randn(10, 16)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # without the helper, the plain model is the float model (observers are not in the model state)
    plain = Classifier.load_from_checkpoint(tmp_path / "last.ckpt").eval()
    with torch.no_grad():
        assert not torch.equal(plain(x), model(x))


def _resume_callback() -> QATCallback:
    return QATCallback(
        backend="inductor",
        module="net",
        start=3,
        freeze_observers_at=9,
        freeze_bn_at=12,
        averaging_constant=0.2,
        convert_on_fit_end=False,
    )


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("checkpoint_step", [5, 10, 13])
def test_resume_mid_qat_is_bitwise_identical(tmp_path, checkpoint_step):
    """Before/after the observer freeze and after the BN freeze, mid-epoch (a dataloader that resumes mid-epoch)."""
    L.seed_everything(0)
    full = Classifier()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=checkpoint_step, save_top_k=-1)
    trainer(tmp_path, [_resume_callback(), saver], max_epochs=2, enable_checkpointing=True).fit(
        full, ResumableLoader(classification_data())
    )
    ckpt = next((tmp_path / "ckpt").glob(f"*step={checkpoint_step}.ckpt"))

    L.seed_everything(0)
    resumed = Classifier()
    trainer(tmp_path, [_resume_callback()], max_epochs=2).fit(
        resumed, ResumableLoader(classification_data()), ckpt_path=ckpt
    )
    a, b = _full_state(full), _full_state(resumed)
    assert a.keys() == b.keys() and any(".activation_observer." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_weights_only_checkpoint_keeps_observers(tmp_path):
    model = Classifier()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True)
    callback = QATCallback(backend="inductor", module="net", convert_on_fit_end=False)
    trainer(tmp_path, [callback, saver], max_epochs=1, enable_checkpointing=True).fit(model, loader())
    fresh = QATCallback(backend="inductor", module="net").load_checkpoint(Classifier(), tmp_path / "weights.ckpt")
    assert _states_equal(_observer_state(fresh), _observer_state(model))
    # Lightning does not run callback checkpoint hooks for weights-only checkpoints: the observer buffers stay in the
    # model state, so the plain class needs strict=False (documented in the README)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*activation_observer"):
        Classifier.load_from_checkpoint(tmp_path / "weights.ckpt")
    plain = Classifier.load_from_checkpoint(tmp_path / "weights.ckpt", strict=False)
    assert torch.equal(plain.net.fc1.weight, model.net.fc1.weight)


# --------------------------------------------------------------------------------------------------------------------
# Observers and schedule
# --------------------------------------------------------------------------------------------------------------------


class ObserverWatch(Callback):
    """Fails if an observer moves between the start and the end of any validation run during fit."""

    def __init__(self) -> None:
        self.validations = 0
        self._before: dict[str, torch.Tensor] = {}

    def on_validation_start(self, trainer, pl_module):
        self._before = _observer_state(pl_module)

    def on_validation_end(self, trainer, pl_module):
        assert _states_equal(self._before, _observer_state(pl_module))
        self.validations += 1


def test_observers_never_move_in_validate_test_predict(tmp_path):
    L.seed_everything(0)
    model = Classifier()
    watch = ObserverWatch()
    callback = QATCallback(backend="inductor", module="net", convert_on_fit_end=False)
    fit = trainer(tmp_path, [callback, watch], max_epochs=2, num_sanity_val_steps=0)
    fit.fit(model, loader(), loader(64, seed=1))
    assert watch.validations == 2
    before = _observer_state(model)
    assert before and all(bool(v) for k, v in before.items() if k.endswith("initialized"))
    data = classification_data()
    shifted = DataLoader(TensorDataset(data.tensors[0] * 10, data.tensors[1]), batch_size=64)
    fit.validate(model, shifted, verbose=False)
    fit.test(model, shifted, verbose=False)
    fit.predict(model, shifted)
    assert _states_equal(before, _observer_state(model))


class ScheduleRecorder(Callback):
    """Per training batch (after the QAT callback applied its schedule): enabled, observers frozen, BN frozen."""

    def __init__(self) -> None:
        self.by_step: dict[int, tuple[bool, bool, bool]] = {}
        self.by_epoch: dict[int, set[tuple[bool, bool, bool]]] = {}
        self.observer_min: dict[int, float] = {}
        self.bn_mean: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        fc1 = pl_module.net.fc1
        bn = pl_module.net.bn
        bn_frozen = any(h.__name__ == "_keep_bn_in_eval" for h in bn._forward_pre_hooks.values())
        state = (fc1.is_fake_quant_enabled, fc1.observer.is_frozen, bn_frozen)
        self.by_step[trainer.global_step] = state
        self.by_epoch.setdefault(trainer.current_epoch, set()).add(state)
        self.observer_min[trainer.global_step] = float(fc1.observer.min_val)
        self.bn_mean[trainer.global_step] = bn.running_mean.clone()


def test_schedule_in_steps_is_applied(tmp_path):
    L.seed_everything(0)
    model = Classifier()
    recorder = ScheduleRecorder()
    callback = QATCallback(
        backend="inductor",
        module="net",
        start=3,
        freeze_observers_at=6,
        freeze_bn_at=10,
        averaging_constant=0.5,
        convert_on_fit_end=False,
    )
    trainer(tmp_path, [callback, recorder], max_epochs=2).fit(model, loader())
    expected = {s: (s >= 3, s >= 6, s >= 10) for s in range(16)}
    assert recorder.by_step == expected
    mins = recorder.observer_min
    assert mins[3] == float("inf")  # fake quant off: the observer has not seen anything
    assert len({mins[4], mins[5], mins[6]}) == 3  # it moves once enabled ...
    assert all(mins[s] == mins[6] for s in range(6, 16))  # ... and not after the freeze
    bn = recorder.bn_mean
    assert not torch.equal(bn[9], bn[10])  # BN statistics moved until step 10 ...
    assert all(torch.equal(bn[s], bn[10]) for s in range(10, 16))  # ... and are frozen from then on
    assert model.net.bn.training is False  # frozen BN stays in eval mode whatever train() did


def test_schedule_in_epochs_is_applied(tmp_path):
    L.seed_everything(0)
    recorder = ScheduleRecorder()
    callback = QATCallback(
        backend="inductor",
        module="net",
        start=1,
        freeze_observers_at=2,
        freeze_bn_at=3,
        schedule_unit="epoch",
        convert_on_fit_end=False,
    )
    trainer(tmp_path, [callback, recorder], max_epochs=4).fit(Classifier(), loader())
    assert recorder.by_epoch == {
        0: {(False, False, False)},
        1: {(True, False, False)},
        2: {(True, True, False)},
        3: {(True, True, True)},
    }


# --------------------------------------------------------------------------------------------------------------------
# Artifact, TensorBoard, latency
# --------------------------------------------------------------------------------------------------------------------


def test_artifact_in_logger_dir_load_round_trip_tensorboard_and_eager_latency(tmp_path):
    L.seed_everything(0)
    model = Classifier()
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = QATCallback(
        backend="inductor", module="net", monitor="val_acc", latency="eager", latency_batch_sizes=[1, 8]
    )
    trainer(tmp_path, [callback], max_epochs=2, logger=logger).fit(model, loader(), loader(64))

    path = callback.results["saved_to"]
    assert path == f"{logger.log_dir}/qat_int8.pt2"
    loaded = load_quantized(path)
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), callback.quantized_model(x))
    assert {type(m).__name__ for m in callback.quantized_model.modules()} >= {"QuantizedModule"}
    results = callback.results
    assert results["int8_bytes"] > 0 and results["size_ratio"] == results["int8_bytes"] / results["float_bytes"]
    for size in (1, 8):
        assert results[f"float_ms/batch_{size}"] > 0 and results[f"int8_ms/batch_{size}"] > 0
        assert results[f"speedup/batch_{size}"] == pytest.approx(
            results[f"float_ms/batch_{size}"] / results[f"int8_ms/batch_{size}"], rel=1e-6
        )
    assert not any(k.startswith("float_compiled_ms") for k in results)  # only with latency="compiled"
    for name in ("fc1", "fc2"):  # the logged activation scale is the one the fake-quant op uses
        scale, _ = model.net.get_submodule(name).observer.qparams()
        assert results[f"activation_scale/{name}"] == pytest.approx(float(scale), rel=1e-6)

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        f"compress/quant/{k}"
        for k in (
            "float_bytes",
            "int8_bytes",
            "size_ratio",
            "fake_quant_val_acc",
            "int8_val_acc",
            "val_acc_drop",
            "top1_agreement",
            "sqnr/fc1",
            "sqnr/fc2",
            "activation_scale/fc1",
            "weight_scale/fc2",  # layer names are relative to `module`
            "int8_ms/batch_8",
            "speedup/batch_1",
        )
    }
    assert expected <= scalars
    assert events.Scalars("compress/quant/int8_val_acc")[-1].value == pytest.approx(results["int8_val_acc"])
    logged_scale = events.Scalars("compress/quant/activation_scale/fc2")[-1].value
    assert logged_scale == pytest.approx(float(model.net.fc2.observer.qparams()[0]), rel=1e-6)
    assert "compress/quant/per_layer_sqnr" in events.Tags()["images"]
    tensors = events.Tags()["tensors"]
    assert "compress/quant/summary/text_summary" in tensors
    summary = events.Tensors("compress/quant/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "int8_val_acc" in summary and "top1_agreement" in summary
    assert "custom_scalars__config__" in tensors


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 3}, r"`weight_bits` must be one of 4, 8, got 3"),
        ({"weight_bits": 16}, r"`weight_bits` must be one of 4, 8, got 16"),
        ({"activation_observer": "ema"}, r"`activation_observer` must be one of 'minmax', 'moving_average', .*'ema'"),
        ({"averaging_constant": 0.0}, r"`averaging_constant` must be in \(0, 1\], got 0.0"),
        ({"start": 5, "freeze_observers_at": 2}, r"`freeze_observers_at` must be >= `start` \(5\).*got 2"),
        ({"start": -1}, r"`start` must be a non-negative integer, got -1"),
        ({"freeze_bn_at": 1.5}, r"`freeze_bn_at` must be a non-negative integer, got 1.5"),
        ({"schedule_unit": "batch"}, r"`schedule_unit` must be one of 'step', 'epoch', got 'batch'"),
        ({"mode": "weight_only"}, r"`mode` must be one of 'static', 'dynamic', got 'weight_only'"),
        ({"latency": "fast"}, r"`latency` must be one of 'compiled', 'eager', 'off', got 'fast'"),
        ({"latency_batch_sizes": [1, 0]}, r"`latency_batch_sizes` must hold positive integers, got \[1, 0\]"),
    ],
)
def test_bad_arguments_rejected_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATCallback(backend="inductor", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"module": "decoder"}, r"`module`='decoder' is not a submodule of Classifier\. Its submodules: net"),
        ({"module": "net", "include": ["conv"]}, r"`include` pattern 'conv' matches no"),
        ({"module": "net", "monitor": "val_accuracy"}, r"`monitor`='val_accuracy' is not logged.*`val_acc`"),
    ],
)
def test_bad_configuration_rejected_before_training(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [QATCallback(backend="inductor", latency="off", **kwargs), FailIfTrained()]).fit(
            Classifier(), loader(), loader(64)
        )


def test_monitor_without_validation_loop_rejected_before_training(tmp_path):
    class NoValidation(Classifier):
        validation_step = None  # type: ignore[assignment]

    with pytest.raises(ValueError, match=r"`monitor`='val_acc' needs a validation loop"):
        trainer(tmp_path, [QATCallback(backend="inductor", module="net", monitor="val_acc"), FailIfTrained()]).fit(
            NoValidation(), loader()
        )


def test_non_exportable_model_fails_at_conversion_saying_why_and_what_to_change(tmp_path):
    model = NotExportable()
    model.example_input_array = torch.zeros(4, 16)
    callback = QATCallback(backend="inductor", latency="off")
    why_and_fix = r"(?s)could not capture `NotExportable`.*data-dependent.*Common fixes"
    with pytest.raises(Int8ConversionError, match=why_and_fix):
        trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    assert fake_quant_modules(model), "training itself worked; the LightningModule is untouched by the failure"


def test_copy_of_prepared_module_is_independent(tmp_path):
    """Deepcopy (EMA/SWA-style) of a QAT-prepared module works and shares nothing."""
    model = Classifier()
    trainer(tmp_path, [QATCallback(backend="inductor", module="net", convert_on_fit_end=False)], max_steps=2).fit(
        model, loader()
    )
    clone = copy.deepcopy(model)
    assert clone.net.fc1.weight is not model.net.fc1.weight
    assert _states_equal(_observer_state(clone), _observer_state(model))


def test_state_dict_holds_the_config_as_plain_values():
    callback = QATCallback(backend="inductor", module="net", start=2, freeze_bn_at=5, weight_bits=4, mode="dynamic")
    state = callback.state_dict()
    assert state["config"]["weight_bits"] == 4 and state["config"]["module"] == "net"
    assert state["schedule"] == {"start": 2, "freeze_observers_at": None, "freeze_bn_at": 5, "unit": "step"}
    assert state["conversion"]["mode"] == "dynamic" and callback.mode == "dynamic"
    plain = (type(None), bool, int, float, str)
    assert all(isinstance(v, plain) for part in state.values() for v in part.values())


# --------------------------------------------------------------------------------------------------------------------
# Reliability (issue 9): atomic artifact, resume after a crash, reused callback, settings on resume, NaN, ...
# --------------------------------------------------------------------------------------------------------------------


def _failing_replace(monkeypatch, suffix: str) -> None:
    """A full disk when the artifact ending in ``suffix`` is moved into place (everything else is written)."""
    import errno
    import os

    from lightning_compress.engine import io

    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(io.os, "replace", replace)


def test_artifact_write_error_names_save_path_and_keeps_checkpoints(tmp_path, monkeypatch):
    from lightning_compress.engine.io import ArtifactWriteError

    _failing_replace(monkeypatch, "int8.pt2")
    save_path = tmp_path / "out" / "int8.pt2"
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    callback = QATCallback(backend="inductor", module="net", latency="off", save_path=str(save_path), verbose=False)
    with pytest.raises(ArtifactWriteError, match=r"Cannot write `save_path`=.*int8\.pt2.*No space left on device"):
        trainer(tmp_path, [callback, saver], max_epochs=1, enable_checkpointing=True).fit(Classifier(), loader())
    assert list(save_path.parent.iterdir()) == []  # nothing partial, no temporary file
    Classifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # the checkpoint is intact


_CRASH_IN_CONVERSION = """
import os, sys
sys.path.insert(0, {tests!r})
import lightning_compress.callbacks.qat as qat
from lightning.pytorch.callbacks import ModelCheckpoint
from helpers import TinyClassifier, loader, trainer

qat.convert_to_int8 = lambda *args, **kwargs: os.kill(os.getpid(), 9)  # killed during the fit-end conversion
saver = ModelCheckpoint(dirpath={ckpt!r}, save_last=True)
callback = qat.QATCallback(backend="inductor", module="net", monitor="val_acc", latency="off", verbose=False)
fit = trainer({root!r}, [callback, saver], max_epochs=1, enable_checkpointing=True)
fit.fit(TinyClassifier(), loader(), loader(64))
"""


@pytest.mark.slow  # a fresh interpreter imports lightning and trains (~8 s)
def test_kill_during_fit_end_conversion_then_resume_completes_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parents[1])
    script = _CRASH_IN_CONVERSION.format(tests=tests, ckpt=str(tmp_path / "ckpt"), root=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    callback = QATCallback(backend="inductor", module="net", monitor="val_acc", latency="off", verbose=False)
    fit = trainer(tmp_path, [callback, FailIfTrained()], max_epochs=1, num_sanity_val_steps=0)
    fit.fit(TinyClassifier(), loader(), loader(64), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert callback.quantized_model is not None and 0.0 <= callback.results["int8_val_acc"] <= 1.0
    assert callback.quantized_model(torch.randn(5, 16)).shape == (5, 4)


def test_finished_fit_resumed_converts_with_the_example_kept_in_the_checkpoint(tmp_path):
    """The same resume without a subprocess: no batch runs, the checkpoint's example is exported."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = QATCallback(backend="inductor", module="net", convert_on_fit_end=False, verbose=False)
    trainer(tmp_path, [first, saver], max_epochs=1, enable_checkpointing=True).fit(TinyClassifier(), loader())
    example = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]["example"]
    assert example["args"][0].shape == (8, 16) and example["kwargs"] == {}  # a few rows only
    callback = QATCallback(backend="inductor", module="net", latency="off", verbose=False)
    fit = trainer(tmp_path, [callback, FailIfTrained()], max_epochs=1, num_sanity_val_steps=0)
    fit.fit(TinyClassifier(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert callback.quantized_model is not None and callback.results["int8_bytes"] > 0


class _WithExampleArray(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.example_input_array = torch.zeros(1, 16)


def test_example_input_array_is_used_for_a_submodule_target(tmp_path):
    """No batch ever reaches `net` (max_steps=0, no validation): `example_input_array` runs through `forward`."""
    callback = QATCallback(backend="inductor", module="net", latency="off", verbose=False)
    trainer(tmp_path, [callback], max_steps=0).fit(_WithExampleArray(), loader())
    assert callback.quantized_model is not None
    assert callback.quantized_model(torch.randn(3, 16)).shape == (3, 4)  # a batch of 1 exported as a dynamic batch


def test_validation_batches_are_caught_too(tmp_path):
    callback = QATCallback(backend="inductor", module="net", latency="off", verbose=False)
    fit = trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=0)
    fit.fit(TinyClassifier(), loader(), loader(64))
    assert callback.quantized_model is not None


class _EightFeatures(TinyClassifier):
    def __init__(self):
        super().__init__()
        from helpers import TinyNet

        self.net = TinyNet(features=8)


def test_reused_callback_forgets_the_previous_fit(tmp_path):
    callback = QATCallback(backend="inductor", module="net", latency="off", verbose=False)
    trainer(tmp_path, [callback], max_epochs=1).fit(TinyClassifier(), loader())
    assert callback.quantized_model is not None and callback.results
    eight = DataLoader(classification_data(128, features=8), batch_size=32)
    trainer(tmp_path, [callback], max_epochs=1).fit(_EightFeatures(), eight)  # exported with its own batch
    assert callback.quantized_model(torch.randn(3, 8)).shape == (3, 4)
    callback.convert_on_fit_end = False
    trainer(tmp_path, [callback], max_epochs=1).fit(TinyClassifier(), loader())
    assert callback.results == {} and callback.quantized_model is None and callback.quantized_program is None


def test_training_batch_of_one_exports_a_dynamic_batch(tmp_path):
    callback = QATCallback(backend="inductor", module="net", monitor="val_acc", latency="off", verbose=False)
    fit = trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=8, num_sanity_val_steps=0)
    fit.fit(TwoInputModule(), two_input_loader(batch_size=1), two_input_loader(64))  # validated with batch 32
    assert callback.results["int8_val_acc"] >= 0.0


class _CompiledNet(Classifier):
    def __init__(self):
        super().__init__()
        self.net = torch.compile(self.net, backend="eager")


@pytest.mark.parametrize("module", ["net", None])
def test_compiled_submodule_is_unwrapped_for_export(tmp_path, module):
    callback = QATCallback(backend="inductor", module=module, monitor="val_acc", latency="off", verbose=False)
    trainer(tmp_path, [callback], max_epochs=1).fit(_CompiledNet(), loader(), loader(64))
    assert callback.results["top1_agreement"] > 0.8  # the int8 validation ran, with a batch of 64
    assert f"weight_scale/{'fc1' if module else 'net.fc1'}" in callback.results  # names without `_orig_mod`
    assert callback.quantized_model(torch.randn(3, 16)).shape == (3, 4)


def _qat_checkpoint(tmp_path, **kwargs):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    callback = QATCallback(backend="inductor", module="net", convert_on_fit_end=False, verbose=False, **kwargs)
    trainer(tmp_path, [callback, saver], max_epochs=1, enable_checkpointing=True).fit(Classifier(), loader())
    return tmp_path / "ckpt" / "last.ckpt"


def test_resume_with_changed_settings_names_each_change(tmp_path):
    ckpt = _qat_checkpoint(tmp_path)
    changed = QATCallback(
        backend="inductor", module="net", weight_bits=4, activation_observer="histogram", convert_on_fit_end=False
    )
    with pytest.raises(
        ValueError,
        match=r"`weight_bits`: 8 in the checkpoint, 4 now; `activation_observer`: 'moving_average' in the checkpoint,"
        r" 'histogram' now",
    ):
        trainer(tmp_path, [changed, FailIfTrained()], max_epochs=2).fit(Classifier(), loader(), ckpt_path=ckpt)


def test_resume_with_another_selection_is_refused(tmp_path):
    ckpt = _qat_checkpoint(tmp_path)
    other = QATCallback(backend="inductor", module="net", exclude=["fc2"], convert_on_fit_end=False)
    with pytest.raises(ValueError, match=r"holds QATCallback state for .*'exclude': None.* `module`, `include`"):
        trainer(tmp_path, [other, FailIfTrained()], max_epochs=2).fit(Classifier(), loader(), ckpt_path=ckpt)


class _NaNAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def test_nan_batch_fails_at_once_naming_the_layer_and_the_step(tmp_path):
    callback = QATCallback(backend="inductor", module="net", latency="off", verbose=False)
    with pytest.raises(FloatingPointError, match=r"range observed by layer 'fc1', 'fc2' is NaN or Inf at step 5"):
        trainer(tmp_path, [callback, _NaNAt(5)], max_epochs=2).fit(Classifier(), loader())


@pytest.mark.parametrize("ema", [False, True])
def test_weight_averaging_is_refused_at_setup(tmp_path, ema):
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    averager = WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)) if ema else WeightAveraging()
    callback = QATCallback(backend="inductor", module="net", latency="off", verbose=False)
    with pytest.raises(ValueError, match=r"QATCallback cannot be combined with WeightAveraging: .* second fit"):
        trainer(tmp_path, [averager, callback, FailIfTrained()], max_epochs=1).fit(Classifier(), loader())


def test_start_past_the_end_of_training_is_warned_and_reported(tmp_path):
    callback = QATCallback(backend="inductor", module="net", start=100, latency="off", verbose=False)
    expected = r"`start`=100 \(steps\), but training is estimated at 8 optimizer steps"
    with pytest.warns(UserWarning, match=expected), pytest.warns(UserWarning, match=r"QAT never started"):
        trainer(tmp_path, [callback], max_epochs=1).fit(Classifier(), loader())
    assert callback.results["qat_started"] == 0.0
    assert "QAT never started" in callback.compression_settings()["quantization"]
    started = QATCallback(backend="inductor", module="net", latency="off", verbose=False)
    trainer(tmp_path, [started], max_epochs=1).fit(Classifier(), loader())
    assert started.results["qat_started"] == 1.0 and started.compression_settings()["quantization"] == "qat"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"module": ["net"]}, r"`module` must be a non-empty string or None, got \['net'\]"),
        ({"latency_batch_sizes": 8}, r"`latency_batch_sizes` must be a list of positive integers or None, got 8"),
        ({"convert_on_fit_end": "no"}, r"`convert_on_fit_end` must be True or False, got 'no'"),
        ({"verbose": 1}, r"`verbose` must be True or False, got 1"),
        ({"monitor": ""}, r"`monitor` must be a non-empty string or None, got ''"),
        ({"save_path": 5}, r"`save_path` must be a file path \(a string\) or None, got 5"),
        ({"include": [3]}, r"`include` must be a list of regular expressions \(strings\), got 3"),
    ],
)
def test_arguments_of_the_wrong_type_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATCallback(backend="inductor", **kwargs)


def test_a_module_without_children_reads_none(tmp_path):
    class Flat(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    with pytest.raises(ValueError, match=r"Its submodules: none\."):
        trainer(tmp_path, [QATCallback(backend="inductor", module="net")]).fit(Flat(), loader())


def test_unwritable_save_path_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    callback = QATCallback(backend="inductor", module="net", save_path=str(tmp_path / "file" / "int8.pt2"))
    with pytest.raises(ValueError, match=r"`save_path`=.*int8\.pt2.*: its folder cannot be created"):
        trainer(tmp_path, [callback, FailIfTrained()]).fit(Classifier(), loader())
    with pytest.raises(ValueError, match=r"`save_path`=.* is a directory"):
        trainer(
            tmp_path, [QATCallback(backend="inductor", module="net", save_path=str(tmp_path)), FailIfTrained()]
        ).fit(Classifier(), loader())


# --------------------------------------------------------------------------------------------------------------------
# Backends: ONNX Runtime (the default), "auto", bad values
# --------------------------------------------------------------------------------------------------------------------


def test_onnxruntime_backend_is_the_default_and_runs_like_the_network(tmp_path):
    import onnxruntime

    from lightning_compress.engine.ort import OrtInt8Model, count_quantized_layers

    L.seed_everything(0)
    module = TwoInputModule()
    callback = QATCallback(module="net", monitor="val_acc", latency="off")
    assert callback.backend == "onnxruntime"
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, [callback], max_epochs=2, logger=logger).fit(module, two_input_loader(), two_input_loader(64))

    results = callback.results
    path = tmp_path / "tb" / "version_0" / "qat_int8.onnx"
    assert results["saved_to"] == str(path) and path.is_file()
    assert results["backend"] == "onnxruntime" and "backend_reason" not in results
    assert callback.quantized_program is None
    assert isinstance(callback.quantized_model, OrtInt8Model)
    # the .onnx file is a plain ONNX model: a fresh session loads it, and its graph computes int8
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "side"]
    assert sum(count_quantized_layers(path).values()) == 3
    module.eval()
    x, side = torch.randn(5, 16), torch.randn(5, 8)
    with torch.no_grad():
        fake = module.net(x, side, scale=2.0)
        int8 = callback.quantized_model(x, side, scale=2.0)  # the network's own call (scale was baked in)
        assert torch.equal(callback.quantized_model(side=side, x=x, scale=2.0), int8)
        assert torch.equal(load_quantized(path)(x, side, scale=2.0), int8)
    assert int8.shape == (5, 4)
    assert torch.allclose(int8, fake, atol=0.05 * fake.abs().max().item())
    assert results["top1_agreement"] >= 0.95
    assert results["int8_val_acc"] == pytest.approx(results["fake_quant_val_acc"], abs=0.05)
    assert {"int8_bytes", "float_bytes", "size_ratio", "int8_vs_fake_quant_sqnr_db", "sqnr/main"} <= set(results)
    assert results["int8_bytes"] == path.stat().st_size
    assert callback.compression_settings()["backend"] == "onnxruntime"
    assert callback.state_dict()["config"]["backend"] == "onnxruntime"


def test_onnxruntime_backend_on_a_residual_cnn_agrees_with_the_fake_quant_model(tmp_path):
    L.seed_everything(0)
    module = ResidualModule()
    callback = QATCallback(module="net", monitor="val_acc", latency="off", freeze_bn_at=4)
    trainer(tmp_path, [callback], max_epochs=2).fit(module, image_loader(), image_loader(48))
    assert callback.quantized_model.num_quantized_layers == len(fake_quant_modules(module.net))
    assert callback.results["top1_agreement"] >= 0.95
    module.eval()
    x = next(iter(image_loader()))[0]
    with torch.no_grad():
        fake, int8 = module(x), callback.quantized_model(x)
    assert (fake.argmax(1) == int8.argmax(1)).float().mean() >= 0.9


def test_auto_backend_times_both_and_reports_the_choice_and_why(tmp_path):
    L.seed_everything(0)
    callback = QATCallback(
        backend="auto", module="net", latency="off", latency_batch_sizes=[8], save_path=str(tmp_path / "m.pt2")
    )
    trainer(tmp_path, [callback], max_epochs=1).fit(Classifier(), loader(), loader(64))
    results = callback.results
    assert results["backend"] in ("onnxruntime", "inductor")
    reason = results["backend_reason"]
    # every candidate is named in the reason, with its speed-up at the timed batch size
    assert "at batch 8" in reason and "fp32" in reason
    assert "onnxruntime int8" in reason and "inductor int8" in reason
    suffix = ".onnx" if results["backend"] == "onnxruntime" else ".pt2"
    assert results["saved_to"] == str(tmp_path / f"m{suffix}") and (tmp_path / f"m{suffix}").is_file()
    assert (callback.quantized_program is None) == (results["backend"] == "onnxruntime")
    with torch.no_grad():
        assert callback.quantized_model(torch.randn(3, 16)).shape == (3, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "tensorrt"}, r"`backend` must be one of 'inductor', 'onnxruntime', 'auto', got 'tensorrt'"),
        ({"weight_bits": 4}, r"`backend`='onnxruntime' runs 8-bit weights only, got `weight_bits`=4.*'inductor'"),
        ({"backend": "auto", "weight_bits": 4}, r"`backend`='auto' runs 8-bit weights only"),
        ({"save_path": "int8.pt2"}, r"`save_path`='int8.pt2' has the suffix '.pt2', but `backend`='onnxruntime'"),
        ({"backend": "inductor", "save_path": "a.onnx"}, r"`save_path`='a.onnx' has the suffix '.onnx'"),
    ],
)
def test_bad_backend_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATCallback(**kwargs)


def test_resume_with_another_backend_is_refused(tmp_path):
    callback = QATCallback(backend="inductor", module="net")
    state = callback.state_dict()
    with pytest.raises(ValueError, match=r"`backend`: 'inductor' in the checkpoint, 'onnxruntime' now"):
        QATCallback(module="net").load_state_dict(state)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_onnxruntime_backend_on_the_demo_transformer(tmp_path, mode):
    """nn.Transformer with an explicit causal mask, token inputs: ORT int8 agrees with the fake-quant model."""
    L.seed_everything(0)
    module = TransformerModule()
    callback = QATCallback(module="model", mode=mode, monitor="val_nll", latency="off")
    trainer(tmp_path, [callback], max_epochs=1).fit(module, token_loader(), token_loader())
    inputs, target = next(iter(token_loader()))
    module.eval()
    with torch.no_grad():
        int8 = callback.quantized_model(inputs[:5], target[:5])
    assert int8.shape == (5 * 8, 50)
    assert callback.quantized_model.mode == mode and callback.quantized_model.num_quantized_layers > 0
    assert callback.results["top1_agreement"] >= 0.95
    assert callback.results["int8_val_nll"] == pytest.approx(callback.results["fake_quant_val_nll"], rel=0.05)


def test_whole_lightning_module_as_target_with_onnxruntime(tmp_path):
    """``module=None`` with ONNX Runtime: calibration and measurement record the LightningModule's own forward."""
    L.seed_everything(0)
    model = Classifier()
    callback = QATCallback(monitor="val_acc", latency="off")
    trainer(tmp_path, [callback], max_epochs=1).fit(model, loader(), loader(64))
    assert callback.results["backend"] == "onnxruntime"
    assert callback.results["top1_agreement"] >= 0.95
    assert "forward" not in vars(model)
    with torch.no_grad():
        assert callback.quantized_model(torch.randn(3, 16)).shape == (3, 4)


class _StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


def test_a_model_that_cannot_be_converted_fails_after_the_first_batch_not_after_training(tmp_path):
    """The fit-end export is tried on the first caught batch (a stripped float copy), so an export failure stops
    the fit at step 1 instead of after the whole training. (The ONNX exporter traces the branch instead of failing,
    so the pt2e backend shows it.)"""
    counter = _StepCounter()
    callback = QATCallback(backend="inductor", latency="off")
    with pytest.raises(Int8ConversionError, match=r"could not capture `NotExportable`"):
        trainer(tmp_path, [callback, counter], max_epochs=5).fit(NotExportable(), loader())
    assert counter.steps <= 1


def test_monitor_never_logged_fails_at_the_first_validation_without_a_sanity_check(tmp_path):
    counter = _StepCounter()
    callback = QATCallback(monitor="val_f1", latency="off")
    with pytest.raises(ValueError, match=r"`monitor`='val_f1' is not logged"):
        trainer(tmp_path, [callback, counter], max_epochs=5, num_sanity_val_steps=0).fit(
            Classifier(), loader(), loader(64)
        )
    assert counter.steps == 8  # one epoch of 256/32 batches, then the first validation


# --------------------------------------------------------------------------------------------------------------------
# Sharded strategies: what cannot work is refused in setup (the 2-process runs: tests/integration/test_quant_fsdp.py)
# --------------------------------------------------------------------------------------------------------------------


def _set_up_under(strategy, callback, module=None):
    from types import SimpleNamespace

    fake_trainer = SimpleNamespace(strategy=strategy, callbacks=[], is_global_zero=True)
    callback.setup(fake_trainer, module or Classifier(), "fit")


def _model_parallel(tensor_parallel_size: int):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy.__new__(ModelParallelStrategy)  # as after `setup_environment`, with its mesh
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: tensor_parallel_size)}
    return strategy


def test_fsdp1_and_tensor_parallelism_are_refused_at_setup_naming_what_works():
    from lightning.pytorch.strategies import FSDPStrategy

    callback = QATCallback(module="net", convert_on_fit_end=False, verbose=False)
    with pytest.raises(ValueError, match=r"QATCallback does not support `strategy`=FSDPStrategy \(FSDP1.*FSDP2"):
        _set_up_under(FSDPStrategy.__new__(FSDPStrategy), callback)
    with pytest.raises(ValueError, match=r"`tensor_parallel_size` must be 1, got 2"):
        _set_up_under(_model_parallel(2), callback)


def test_under_model_parallel_the_setup_keeps_a_meta_copy_that_gathered_weights_fill():
    callback = QATCallback(module="net", convert_on_fit_end=False, verbose=False)
    model = Classifier()
    _set_up_under(_model_parallel(1), callback, model)
    assert callback._full.active
    skeleton = callback._full._skeleton
    assert all(p.is_meta for p in skeleton.parameters())  # no memory for the weights
    assert isinstance(skeleton.net.fc1, FakeQuantModule)  # copied after the swap: the observers are in it
    whole = callback._full.gather(model)  # no process group: the module's own state dict
    assert torch.equal(whole.net.fc1.weight, model.net.fc1.weight) and whole.net.fc1.weight is not model.net.fc1.weight
    assert whole.state_dict().keys() == model.state_dict().keys()
    whole.configure_model()  # an inner Trainer's call: nothing to shard again


def test_layers_sharded_before_the_swap_are_refused():
    from torch.distributed.fsdp import FSDPModule

    model = Classifier()
    model.net.fc1.__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})  # what `fully_shard` does to a layer
    callback = QATCallback(module="net", convert_on_fit_end=False, verbose=False)
    with pytest.raises(ValueError, match=r"\['fc1'\] are already sharded with `fully_shard`.*Call `fully_shard` after"):
        _set_up_under(_model_parallel(1), callback, model)


def test_a_model_built_on_meta_gets_fresh_observers_when_lightning_materializes_it(recwarn):
    """Large FSDP2 models are built on the ``meta`` device; Lightning materializes them after ``configure_model``."""
    from lightning.fabric.utilities.init import _materialize_distributed_module

    with torch.device("meta"):
        model = Classifier()
    QATCallback(module="net", verbose=False).prepare(model)
    _materialize_distributed_module(model, torch.device("cpu"))  # what ModelParallelStrategy.setup does
    assert not [w for w in recwarn if "initialization incomplete" in str(w.message)]
    for layer in (model.net.fc1, model.net.fc2):
        assert bool(layer.fake_quant_enabled) and layer.is_fake_quant_enabled
        observer = layer.observer
        assert not observer.is_initialized and not bool(observer.initialized) and not observer.is_frozen
        assert observer.min_val == float("inf") and observer.max_val == float("-inf")
        assert bool(torch.isfinite(layer.weight).all()) and layer.weight.abs().sum() > 0
