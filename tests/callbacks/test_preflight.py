"""Preflight: QAT and PTQ run the whole fit-end int8 conversion once, on a copy, before training goes on, so that a
model that cannot be converted fails after one batch with the conversion's reason, not after the whole fit."""

import pytest
import torch

from helpers import TinyClassifier, loader, trainer
from lightning_compress import PostTrainingQuantCallback, QATCallback
from lightning_compress.engine.convert import Int8ConversionError
from lightning_compress.engine.convert import backend as backend_module


class CountingClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def _failing_conversion(calls):
    def convert(backend, model, *args, **kwargs):
        calls.append(backend)
        raise Int8ConversionError(f"prepare_pt2e failed at node `linear_1` (module `net.fc2`) [{backend}]")

    return convert


@pytest.mark.parametrize("make", [QATCallback, PostTrainingQuantCallback])
def test_an_unconvertible_model_fails_after_the_first_batch(tmp_path, monkeypatch, make):
    calls: list[str] = []
    monkeypatch.setattr(backend_module, "convert_with_backend", _failing_conversion(calls))
    model = CountingClassifier()
    with pytest.raises(Int8ConversionError, match=r"Preflight .*before training.*node `linear_1`"):
        trainer(tmp_path, [make(backend="inductor", latency="off", verbose=False)], max_epochs=5).fit(model, loader())
    assert model.steps <= 1 and calls == ["inductor"]  # 1 of 40 steps: the reason comes at once


def test_auto_fails_only_when_both_backends_fail_and_quotes_both(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(backend_module, "convert_with_backend", _failing_conversion(calls))
    with pytest.raises(Int8ConversionError, match=r"(?s)\[onnxruntime\].*And for the 'inductor' backend.*\[inductor\]"):
        trainer(tmp_path, [QATCallback(backend="auto", latency="off", verbose=False)]).fit(TinyClassifier(), loader())
    assert calls == ["onnxruntime", "inductor"]


def test_the_preflight_converts_for_real_and_writes_nothing(tmp_path, monkeypatch):
    seen = []
    real = backend_module.convert_with_backend

    def spy(backend, model, *args, **kwargs):
        seen.append((backend, type(real(backend, model, *args, **kwargs)).__name__))
        raise Int8ConversionError("stop here")

    monkeypatch.setattr(backend_module, "convert_with_backend", spy)
    callback = PostTrainingQuantCallback(latency="off", verbose=False, save_path=str(tmp_path / "out" / "m.onnx"))
    with pytest.raises(Int8ConversionError, match="stop here"):
        trainer(tmp_path, [callback]).fit(TinyClassifier(), loader())
    assert seen == [("onnxruntime", "OrtInt8Model")]  # a real int8 model was built ...
    assert not (tmp_path / "out" / "m.onnx").exists()  # ... and thrown away


def test_preflight_false_only_tries_the_export(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(backend_module, "convert_with_backend", _failing_conversion(calls))
    model = CountingClassifier()
    callback = QATCallback(latency="off", verbose=False, preflight=False, convert_on_fit_end=False)
    trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    assert calls == [] and model.steps == 8
    with pytest.raises(ValueError, match=r"`preflight` must be"):
        QATCallback(preflight="yes")


def test_the_preflight_leaves_training_unchanged(tmp_path):
    torch.manual_seed(0)
    with_check, without = TinyClassifier(), TinyClassifier()
    without.load_state_dict(with_check.state_dict())
    for model, flag in ((with_check, True), (without, False)):
        callback = QATCallback(latency="off", verbose=False, preflight=flag, convert_on_fit_end=True)
        trainer(tmp_path / str(flag), [callback], max_epochs=1).fit(model, loader())
    for (name, a), b in zip(with_check.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the trial conversion ran on a copy: weights, BN and observers untouched
