"""Numbers that do not mislead: the sign of a loss drop for QAT, and what CompressionReport compares with."""

import lightning as L
import pytest
import torch

from helpers import TinyClassifier, loader, trainer
from lightning_compress import CompressionReport, IterativePruningCallback, QATCallback


class LossLogger(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


def test_qat_monitor_mode_min_makes_a_worse_loss_a_positive_drop(tmp_path):
    torch.manual_seed(0)
    callback = QATCallback(monitor="val_loss", monitor_mode="min", latency="off", verbose=False)
    trainer(tmp_path, [callback], max_epochs=2).fit(LossLogger(), loader(), loader(64, seed=1))
    results = callback.results
    assert results["val_loss_drop"] == pytest.approx(results["int8_val_loss"] - results["fake_quant_val_loss"])
    with pytest.raises(ValueError, match=r"`monitor_mode` must be one of 'max', 'min', got 'up'"):
        QATCallback(monitor_mode="up")


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append((trainer.global_step, float(trainer.callback_metrics["val_acc"])))


def test_report_baseline_is_the_last_validation_before_compression_started(tmp_path):
    torch.manual_seed(0)
    recorder = Recorder()
    pruning = IterativePruningCallback(target_sparsity=0.8, start_step=17, end_step=24, verbose=False)
    qat = QATCallback(start=20, monitor="val_acc", latency="off", verbose=False)
    report = CompressionReport(monitor="val_acc", latency_batch_sizes=[], hparams=False, verbose=False)
    fit = trainer(tmp_path, [recorder, pruning, qat, report], max_epochs=4, num_sanity_val_steps=0)
    fit.fit(TinyClassifier(), loader(), loader(64, seed=1))  # 8 steps per epoch: validations at 8, 16, 24, 32
    assert report.results["val_acc_before_step"] == 16  # pruning starts at step 17
    assert report.results["val_acc_before"] == dict(recorder.seen)[16]
    assert report.results["val_acc_before"] != qat.results["fake_quant_val_acc"]  # not the compressed model's


def test_report_says_when_no_validation_came_before_compression(tmp_path):
    pruning = IterativePruningCallback(target_sparsity=0.5, end_step=4, verbose=False)
    report = CompressionReport(monitor="val_acc", latency_batch_sizes=[], hparams=False, verbose=False)
    fit = trainer(tmp_path, [pruning, report], max_epochs=1, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="no validation ran before compression started"):
        fit.fit(TinyClassifier(), loader(), loader(64, seed=1))
    assert "val_acc_before_step" not in report.results


def test_qat_dynamic_trains_like_dynamic_int8_runs(tmp_path):
    """Dynamic int8 quantizes activations with each batch's own range: training fake-quantizes the weights only."""
    from lightning_compress.engine.fake_quant import fake_quant_modules

    model = TinyClassifier()
    callback = QATCallback(mode="dynamic", latency="off", verbose=False, convert_on_fit_end=False)
    trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    layers = fake_quant_modules(model.net)
    assert layers and not any(m.quant_config.quantize_activations for m in layers.values())
    static = QATCallback(latency="off", verbose=False, convert_on_fit_end=False)
    trainer(tmp_path / "static", [static], max_epochs=1).fit(other := TinyClassifier(), loader())
    assert all(m.quant_config.quantize_activations for m in fake_quant_modules(other.net).values())
