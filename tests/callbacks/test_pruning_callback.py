import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from helpers import ResumableLoader, TinyClassifier, TinyNet, classification_data, loader, trainer
from lightning_compress import IterativePruningCallback
from lightning_compress.engine.config import PruningConfig
from lightning_compress.engine.pruner import GradualPruner

PRUNED = ["net.fc1.weight", "net.fc2.weight"]


def _selected(model):
    return {n: p for n, p in model.named_parameters() if n in PRUNED}


def _sparsity(model):
    weights = _selected(model).values()
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


class StepRecorder(Callback):
    """Records, before every training batch, the sparsity and whether previously pruned weights are still zero."""

    def __init__(self):
        self.sparsity: dict[int, float] = {}
        self.revived = 0
        self._zero_masks: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for name, weight in _selected(pl_module).items():
            if name in self._zero_masks:
                self.revived += int((weight[self._zero_masks[name]] != 0).sum())
            self._zero_masks[name] = weight.detach() == 0
        self.sparsity[trainer.global_step] = _sparsity(pl_module)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reaches_exact_target_and_never_revives(tmp_path, optimizer):
    L.seed_everything(0)
    model = TinyClassifier(optimizer=optimizer)
    biases_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in PRUNED}
    recorder = StepRecorder()
    callback = IterativePruningCallback(target_sparsity=0.85, start_step=2, end_step=20, update_every_n_steps=3)
    trainer(tmp_path, [callback, recorder], max_epochs=4).fit(model, loader())
    assert recorder.revived == 0  # momentum and weight decay never bring a pruned weight back
    assert recorder.sparsity[0] == 0.0 and recorder.sparsity[1] == 0.0  # nothing before start_step
    assert all(recorder.sparsity[s] == pytest.approx(round(0.85 * 1280) / 1280) for s in range(20, 32))
    assert _sparsity(model) == round(0.85 * 1280) / 1280
    for name, param in model.named_parameters():
        if name not in PRUNED:  # biases and BatchNorm untouched by the pruner (they trained, but have no zeros)
            assert int((param == 0).sum()) <= int((biases_before[name] == 0).sum())


def test_parameters_and_keys_unchanged_and_deepcopy_works(tmp_path):
    model = TinyClassifier()
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    trainer(tmp_path, [IterativePruningCallback(target_sparsity=0.5, end_step=8)], max_epochs=1).fit(model, loader())
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    assert list(model.state_dict()) == keys_before
    clone = copy.deepcopy(model)
    assert torch.equal(clone.net.fc1.weight, model.net.fc1.weight)
    assert not model.net.fc1._forward_pre_hooks and not model.net.fc1._forward_hooks


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    recorder = StepRecorder()
    callback = IterativePruningCallback(target_sparsity=0.5, end_step=4, update_every_n_steps=1)
    model = TinyClassifier()
    fit = trainer(tmp_path, [callback, recorder], max_epochs=2, accumulate_grad_batches=4)
    fit.fit(model, loader())
    assert fit.global_step == 4  # 16 batches, 4 optimizer steps
    assert sorted(recorder.sparsity) == [0, 1, 2, 3]
    assert recorder.sparsity[3] == pytest.approx(0.5 - 0.5 * (1 - 3 / 4) ** 3, abs=1 / 1280)  # cubic, step 3 of 4
    assert _sparsity(model) == 0.5


def test_end_step_none_uses_fraction_of_estimated_steps(tmp_path):
    callback = IterativePruningCallback(target_sparsity=0.6, end_fraction=0.5)
    model = TinyClassifier()
    trainer(tmp_path, [callback], max_epochs=4).fit(model, loader())  # 32 steps
    assert callback.pruner.config.end_step == 16
    assert callback.pruner.config.update_every_n_steps == 1
    assert _sparsity(model) == pytest.approx(0.6, abs=1 / 1280)


def _weights_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _callback(end_step=30):
    return IterativePruningCallback(target_sparsity=0.8, start_step=3, end_step=end_step, update_every_n_steps=4)


@pytest.mark.parametrize(
    ("checkpoint_step", "end_step"), [(5, 30), (14, 30), (16, 30), (27, 30), (5, None), (14, None)]
)
def test_resume_from_any_step_is_bitwise_identical(tmp_path, checkpoint_step, end_step):
    """Mid-epoch and mid-update-interval checkpoints too (with a dataloader that resumes mid-epoch); with
    ``end_step=None`` the length of training is read without disturbing the resumed dataloader."""
    L.seed_everything(0)
    full = TinyClassifier()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=checkpoint_step, save_top_k=-1)
    full_callback = _callback(end_step)
    trainer(tmp_path, [full_callback, saver], enable_checkpointing=True).fit(
        full, ResumableLoader(classification_data())
    )
    ckpt = next((tmp_path / "ckpt").glob(f"*step={checkpoint_step}.ckpt"))

    L.seed_everything(0)
    resumed = TinyClassifier()
    resumed_callback = _callback(end_step)
    trainer(tmp_path, [resumed_callback]).fit(resumed, ResumableLoader(classification_data()), ckpt_path=ckpt)
    assert _weights_equal(full, resumed)
    assert all(torch.equal(full_callback.pruner.masks[n], resumed_callback.pruner.masks[n]) for n in PRUNED)


def test_resume_with_plain_dataloader_at_epoch_end(tmp_path):
    L.seed_everything(0)
    full = TinyClassifier()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path, [_callback(), saver], enable_checkpointing=True).fit(full, loader())
    L.seed_everything(0)
    resumed = TinyClassifier()
    trainer(tmp_path, [_callback()]).fit(resumed, loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1-step=16.ckpt")
    assert _weights_equal(full, resumed)


def test_checkpoint_loads_strictly_into_plain_model_and_keeps_masks_compact(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(tmp_path, [_callback(), saver], enable_checkpointing=True).fit(TinyClassifier(), loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    plain = TinyNet()
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}
    plain.load_state_dict(state, strict=True)
    assert (plain.fc1.weight == 0).float().mean() > 0.7
    (state_key,) = [k for k in checkpoint["callbacks"] if k.startswith("IterativePruningCallback")]
    packed = checkpoint["callbacks"][state_key]["masks"]["net.fc1.weight"]
    assert packed.dtype == torch.uint8 and packed.numel() == 1024 // 8
    # and it loads through Lightning's own API with the callback-free class
    reloaded = TinyClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(reloaded.net.fc1.weight, plain.fc1.weight)


def test_two_instances_coexist(tmp_path):
    first = IterativePruningCallback(target_sparsity=0.5, end_step=8, include=["fc1.weight"])
    second = IterativePruningCallback(target_sparsity=0.25, end_step=8, include=["fc2.weight"])
    model = TinyClassifier()
    trainer(tmp_path, [first, second], max_epochs=2).fit(model, loader())
    assert (model.net.fc1.weight == 0).float().mean() == 0.5
    assert (model.net.fc2.weight == 0).float().mean() == 0.25
    assert first.state_key != second.state_key


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
@pytest.mark.parametrize(("scope", "structure"), [("global", "unstructured"), ("local", "channel")])
def test_criteria_scopes_structures(tmp_path, criterion, scope, structure):
    callback = IterativePruningCallback(
        target_sparsity=0.5, end_step=8, criterion=criterion, scope=scope, structure=structure
    )
    model = TinyClassifier()
    trainer(tmp_path, [callback], max_epochs=2).fit(model, loader())
    for name, weight in _selected(model).items():
        rows = (weight != 0).reshape(weight.shape[0], -1).any(dim=1)
        if structure == "channel":  # the output layer (fc2: the logits) is never channel-pruned
            expected = 0 if name == "net.fc2.weight" else round(0.5 * weight.shape[0])
            assert int((~rows).sum()) == expected, name
        elif scope == "local":
            assert (weight == 0).float().mean() == 0.5


def test_lottery_ticket_rewinding_really_rewinds(tmp_path):
    L.seed_everything(0)
    model = TinyClassifier()
    initial = model.net.fc1.weight.detach().clone()  # step 0 values, a copy (not an alias)
    callback = IterativePruningCallback(
        target_sparsity=0.5, schedule="constant", start_step=6, end_step=7, rewind_to_step=0, scope="local"
    )
    trainer(tmp_path, [callback], max_steps=6).fit(model, loader())
    weight = model.net.fc1.weight.detach()
    kept = weight != 0
    assert torch.equal(weight[kept], initial[kept])  # survivors are back at their step-0 values
    assert (weight == 0).float().mean() == 0.5

    plain = IterativePruningCallback(target_sparsity=0.5, schedule="constant", start_step=6, end_step=7, scope="local")
    L.seed_everything(0)
    control = TinyClassifier()
    trainer(tmp_path, [plain], max_steps=6).fit(control, loader())
    kept = control.net.fc1.weight != 0
    assert not torch.equal(control.net.fc1.weight[kept], initial[kept])


class MultiInputModule(L.LightningModule):
    """Lightning's demo Transformer: forward(inputs, target, mask=None) with several tensors."""

    def __init__(self):
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=50, ninp=32, nhead=2, nhid=32, nlayers=1)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        output = self.model(inputs, target)
        return torch.nn.functional.nll_loss(output, target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_multi_input_transformer(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (64, 8), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, tokens.roll(1, 1)), batch_size=16)
    callback = IterativePruningCallback(target_sparsity=0.7, end_step=4, update_every_n_steps=1)
    module = MultiInputModule()
    trainer(tmp_path, [callback], max_epochs=2).fit(module, data)
    assert callback.pruner.weights, "selected Linear weights inside the Transformer"
    assert all("bias" not in name and "norm" not in name for name in callback.pruner.weights)
    total = sum(w.numel() for w in callback.pruner.weights.values())
    zeros = sum(int((w == 0).sum()) for w in callback.pruner.weights.values())
    assert zeros == round(0.7 * total)


def test_tensorboard_tags_layout_and_curve(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = IterativePruningCallback(target_sparsity=0.5, end_step=12, update_every_n_steps=2, monitor="val_acc")
    trainer(tmp_path, [callback], max_epochs=3, logger=logger).fit(TinyClassifier(), loader(), loader(64))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"compress/sparsity", "compress/target_sparsity", "compress/val_acc_vs_sparsity"} <= scalars
    assert {"compress/sparsity/net.fc1.weight", "compress/sparsity/net.fc2.weight"} <= scalars
    assert events.Scalars("compress/sparsity")[-1].value == pytest.approx(0.5)
    curve = events.Scalars("compress/val_acc_vs_sparsity")
    assert [e.step for e in curve] == [round(1000 * v) for v in (callback.history[i][1] for i in range(3))]
    images = set(events.Tags()["images"])
    assert {"compress/pruning/val_acc_vs_sparsity", "compress/pruning/per_layer_sparsity"} <= images
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    assert "compress/pruning/summary/text_summary" in events.Tags()["tensors"]
    final = {t for t in scalars if t.startswith("compress/final/")}
    keys = ("sparsity", "target_reached", "nonzero_params", "dense_bytes", "sparse_bytes")
    assert final == {f"compress/final/{k}" for k in keys}
    assert events.Scalars("compress/final/target_reached")[-1].value == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": 1.5}, r"`target_sparsity` must be in \[0, 1\), got 1.5"),
        ({"target_sparsity": 1.0}, r"`target_sparsity` must be in \[0, 1\), got 1.0"),
        ({"initial_sparsity": 0.95}, r"`initial_sparsity` must be <= `target_sparsity` \(0.9\), got 0.95"),
        ({"schedule": "step"}, r"`schedule` must be one of 'cubic', 'linear', 'exponential', 'constant', got 'step'"),
        ({"scope": "layer"}, r"`scope` must be one of 'global', 'local', got 'layer'"),
        (
            {"structure": "block"},
            r"`structure` must be one of 'unstructured', 'channel' or an 'N:M' pattern such as '2:4', got 'block'",
        ),
        ({"criterion": "l2"}, r"`criterion` must be one of 'magnitude', 'random', got 'l2'"),
        ({"start_step": 10, "end_step": 5}, r"`end_step` must be greater than `start_step` \(10\), got 5"),
        ({"update_every_n_steps": 0}, r"`update_every_n_steps` must be a positive integer, got 0"),
        ({"end_fraction": 0.0}, r"`end_fraction` must be in \(0, 1\], got 0.0"),
        ({"rewind_to_step": 5, "start_step": 2}, r"`rewind_to_step` must be <= `start_step` \(2\)"),
    ],
)
def test_bad_arguments_rejected_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IterativePruningCallback(**kwargs)


class FailIfTrained(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step ran before the configuration error")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": ["decoder"]}, r"`include` pattern 'decoder' matches no parameter name\. .*net\.fc1\.weight"),
        ({"exclude": ["weight"]}, r"leaves no parameter to compress"),
        ({"monitor": "val_accuracy"}, r"`monitor`='val_accuracy' is not logged .* `val_acc`"),
    ],
)
def test_bad_configuration_rejected_before_training(tmp_path, kwargs, match):
    callback = IterativePruningCallback(end_step=10, **kwargs)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [callback, FailIfTrained()]).fit(TinyClassifier(), loader(), loader(64))


def test_monitor_without_validation_loop(tmp_path):
    class NoValidation(TinyClassifier):
        validation_step = None  # type: ignore[assignment]

    callback = IterativePruningCallback(end_step=10, monitor="val_acc")
    with pytest.raises(ValueError, match=r"`monitor`='val_acc' needs a validation loop"):
        trainer(tmp_path, [callback, FailIfTrained()]).fit(NoValidation(), loader())


def test_infinite_training_needs_end_step(tmp_path):
    with pytest.raises(ValueError, match=r"`end_step`=None needs a finite training length"):
        trainer(tmp_path, [IterativePruningCallback(), FailIfTrained()], max_epochs=-1).fit(TinyClassifier(), loader())


def test_checkpoint_from_other_selection_is_rejected(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    callback = IterativePruningCallback(end_step=8)
    trainer(tmp_path, [callback, saver], enable_checkpointing=True, max_epochs=1).fit(TinyClassifier(), loader())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    other = GradualPruner({"net.fc1.weight": TinyClassifier().net.fc1.weight}, PruningConfig(end_step=8).resolve(None))
    with pytest.raises(ValueError, match=r"masks for \['net.fc2.weight'\]"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Failure modes found by trying the callback as a demanding user would (each test failed on the earlier main)
# ----------------------------------------------------------------------------------------------------------------
def test_reused_callback_starts_afresh_for_a_new_model(tmp_path):
    callback = IterativePruningCallback(target_sparsity=0.5, end_step=8)
    trainer(tmp_path, [callback], max_epochs=2).fit(TinyClassifier(), loader())
    first_masks = {n: m.clone() for n, m in callback.pruner.masks.items()}
    L.seed_everything(1)
    reused_model, fresh_model = TinyClassifier(), None
    trainer(tmp_path, [callback], max_epochs=2).fit(reused_model, loader())
    L.seed_everything(1)
    fresh_model = TinyClassifier()
    fresh = IterativePruningCallback(target_sparsity=0.5, end_step=8)
    trainer(tmp_path, [fresh], max_epochs=2).fit(fresh_model, loader())
    assert _weights_equal(reused_model, fresh_model)  # nothing of the first model's masks was applied
    assert any(not torch.equal(first_masks[n], callback.pruner.masks[n]) for n in first_masks)


def test_channel_pruning_keeps_the_output_layer_and_a_channel_per_layer(tmp_path):
    for scope in ("global", "local"):
        model = TinyClassifier()
        callback = IterativePruningCallback(
            target_sparsity=0.9, end_step=4, structure="channel", scope=scope, round_to=1, compact_on_fit_end=False
        )
        trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
        assert bool((model.net.fc2.weight != 0).any(dim=1).all()), scope  # the 4 logits all survive
        rows_alive = int((model.net.fc1.weight != 0).any(dim=1).sum())
        assert rows_alive == 64 - round(0.9 * 64), scope  # exactly round(s * C) channels pruned
        assert callback.results["channel_sparsity"] == round(0.9 * 64) / 64
        # group-complete: the bias, the BatchNorm affine and fc2's input columns of the pruned channels are zero
        dead = ~(model.net.fc1.weight != 0).any(dim=1)
        assert bool((model.net.fc1.bias[dead] == 0).all() and (model.net.bn.weight[dead] == 0).all())
        assert bool((model.net.bn.bias[dead] == 0).all() and (model.net.fc2.weight[:, dead] == 0).all())


class _StepsOnly(Callback):
    """Counts the training batches that ran."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, *args):
        self.batches += 1


def test_target_missed_by_early_stop_is_warned_and_logged(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    stopper = EarlyStopping(monitor="val_acc", mode="max", patience=0, stopping_threshold=0.0)  # stops at epoch 1
    callback = IterativePruningCallback(target_sparsity=0.8, end_step=100, verbose=False)
    with pytest.warns(UserWarning, match=r"training ended at step 8 .* below `target_sparsity`=0.8"):
        trainer(tmp_path, [callback, stopper], max_epochs=20).fit(TinyClassifier(), loader(), loader(64))
    assert callback.results["target_reached"] == 0.0
    assert callback.results["sparsity"] < 0.8


def test_ramp_longer_than_training_is_warned_at_fit_start(tmp_path):
    callback = IterativePruningCallback(target_sparsity=0.8, start_step=40, end_step=60, verbose=False)
    with pytest.warns(UserWarning, match=r"the ramp ends at step 60 .* estimated at 16 optimizer steps"):
        trainer(tmp_path, [callback], max_epochs=2).fit(TinyClassifier(), loader())


@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_weight_averaging_ends_with_the_target_sparsity(tmp_path, averaging):
    from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    if averaging == "swa":
        averager = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)  # averages from before the ramp end
    else:
        averager = WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9))
    model = TinyClassifier()
    callback = IterativePruningCallback(target_sparsity=0.7, end_step=24, update_every_n_steps=4, verbose=False)
    trainer(tmp_path, [callback, averager], max_epochs=4).fit(model, loader())
    total = sum(model.net.get_parameter(n.removeprefix("net.")).numel() for n in PRUNED)
    zeros = sum(int((model.net.get_parameter(n.removeprefix("net.")) == 0).sum()) for n in PRUNED)
    assert zeros == round(0.7 * total)


class _ManualGAN(TinyClassifier):
    """Two optimizers stepped by hand; records regrown pruned weights right after each ``opt.step()``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.regrown = 0
        self.masks = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            loss = nn.functional.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            pruner = self.trainer.callbacks[0].pruner
            self.regrown += sum(
                int((w[~pruner.masks[n]] != 0).sum()) for n, w in pruner.weights.items() if n in pruner.masks
            )

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.fc1.parameters(), lr=0.1), torch.optim.SGD(self.net.fc2.parameters(), lr=0.1)]


def test_manual_optimization_never_exposes_regrown_weights(tmp_path):
    model = _ManualGAN()
    callback = IterativePruningCallback(target_sparsity=0.6, end_step=6, update_every_n_steps=2, verbose=False)
    trainer(tmp_path, [callback], max_epochs=2).fit(model, loader())
    assert callback.results["sparsity"] == pytest.approx(0.6, abs=1 / 1280)
    assert model.regrown == 0


class _NaNAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def test_nan_batch_stops_training_at_the_next_mask_update(tmp_path):
    callback = IterativePruningCallback(target_sparsity=0.6, end_step=16, update_every_n_steps=4, verbose=False)
    with pytest.raises(FloatingPointError, match=r"entries of 'net\.fc1\.weight' are NaN or Inf at step 8"):
        trainer(tmp_path, [callback, _NaNAt(5)], max_epochs=4).fit(TinyClassifier(), loader())


def _checkpoint(tmp_path, callback):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer(tmp_path, [callback, saver], enable_checkpointing=True, max_epochs=1).fit(TinyClassifier(), loader())
    return tmp_path / "ckpt" / "last.ckpt"


def test_resume_with_changed_settings_names_each_change(tmp_path):
    ckpt = _checkpoint(tmp_path, IterativePruningCallback(target_sparsity=0.8, end_step=20, verbose=False))
    changed = IterativePruningCallback(target_sparsity=0.5, end_step=30, verbose=False)
    with pytest.raises(
        ValueError, match=r"`target_sparsity`: 0.8 in the checkpoint, 0.5 now; `end_step`: 20 in the checkpoint, 30 now"
    ):
        trainer(tmp_path, [changed, FailIfTrained()], max_epochs=3).fit(TinyClassifier(), loader(), ckpt_path=ckpt)


def test_resume_with_another_selection_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path, IterativePruningCallback(target_sparsity=0.8, end_step=20, verbose=False))
    other = IterativePruningCallback(target_sparsity=0.8, end_step=20, exclude=["fc2"], verbose=False)
    with pytest.raises(ValueError, match=r"holds IterativePruningCallback state for .*'exclude': None.* `include`"):
        trainer(tmp_path, [other, FailIfTrained()], max_epochs=3).fit(TinyClassifier(), loader(), ckpt_path=ckpt)


def test_resume_from_a_checkpoint_with_an_altered_mask_is_refused(tmp_path):
    callback = IterativePruningCallback(target_sparsity=0.8, end_step=4, verbose=False)
    ckpt = _checkpoint(tmp_path, callback)
    checkpoint = torch.load(ckpt, weights_only=True)
    state = checkpoint["callbacks"][callback.state_key]
    state["masks"]["net.fc1.weight"] = ~state["masks"]["net.fc1.weight"]  # inverted
    torch.save(checkpoint, ckpt)
    again = IterativePruningCallback(target_sparsity=0.8, end_step=4, verbose=False)
    with pytest.raises(ValueError, match=r"mask for 'net.fc1.weight' prunes \d+ weights that are not zero"):
        trainer(tmp_path, [again, FailIfTrained()], max_epochs=3).fit(TinyClassifier(), loader(), ckpt_path=ckpt)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": "abc"}, r"`seed` must be a non-negative integer, got 'abc'"),
        ({"verbose": "no"}, r"`verbose` must be True or False, got 'no'"),
        ({"monitor": ["val_acc"]}, r"`monitor` must be a non-empty string or None, got \['val_acc'\]"),
        ({"include": "fc1"}, r"`include` must be a list of regular expressions"),
        ({"end_step": 2.5}, r"`end_step` must be a non-negative integer, got 2.5"),
        ({"target_sparsity": "0.9"}, r"`target_sparsity` must be in \[0, 1\), got '0.9'"),
    ],
)
def test_arguments_of_the_wrong_type_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IterativePruningCallback(**kwargs)


def test_settings_are_read_only_attributes():
    callback = IterativePruningCallback(target_sparsity=0.7, include=["fc"])
    assert callback.target_sparsity == 0.7 and callback.include == ["fc"]
    with pytest.raises(AttributeError, match=r"`target_sparsity` is a setting of the frozen `config`"):
        callback.target_sparsity = 0.5
