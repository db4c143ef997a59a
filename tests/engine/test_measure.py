"""Fidelity and latency measurements (lightning_compress.engine.measure). No timed assertions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_fake_quant import LeNet5, TwoInputNet, mlp, train_steps
from torch import nn

from lightning_compress.engine.config import QuantConfig
from lightning_compress.engine.convert import convert_to_int8, load_quantized
from lightning_compress.engine.fake_quant import (
    activation_qparams,
    activation_ranges,
    fake_quant_modules,
    prepare_qat,
    set_fake_quant_enabled,
    strip_qat,
)
from lightning_compress.engine.measure import (
    Evaluation,
    Int8Report,
    compare_latency,
    measure_int8,
    measure_latency,
    num_threads,
    output_sensitivity,
    per_layer_sqnr,
    sqnr_db,
    top1_agreement,
    weight_sqnr,
)


def test_sqnr_db_values() -> None:
    ref = torch.ones(100)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)
    assert sqnr_db(ref, ref * 0.99) == pytest.approx(40.0)
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError, match=r"`reference` and `test` must have the same shape, got \(3,\) and \(4,\)\."):
        sqnr_db(torch.ones(3), torch.ones(4))


def test_top1_agreement() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [0.0, 1.0]])
    assert top1_agreement(a, b) == 0.75
    assert top1_agreement(a, a) == 1.0
    with pytest.raises(ValueError, match="`logits_a` and `logits_b` must have the same shape"):
        top1_agreement(a, b[:2])


def test_per_layer_sqnr_local_and_accumulated() -> None:
    torch.manual_seed(0)
    model = LeNet5()
    float_model = copy.deepcopy(model)
    prepare_qat(model)
    x = torch.randn(16, 1, 28, 28)
    train_steps(model, x, steps=1)
    model.train()
    ranges = activation_ranges(model)

    local = per_layer_sqnr(None, model, x)
    assert list(local) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert all(v > 25 for v in local.values())
    accumulated = per_layer_sqnr(float_model, model, x)
    assert list(accumulated) == list(local)
    assert accumulated["conv1"] == pytest.approx(local["conv1"])  # first layer: same input
    assert accumulated["fc3"] <= local["fc3"] + 1e-6  # errors accumulate
    assert model.training and activation_ranges(model) == ranges  # mode restored, observers untouched

    stripped = strip_qat(copy.deepcopy(model))
    with pytest.raises(ValueError, match="has no fake-quant layers"):
        per_layer_sqnr(None, stripped, x)
    with pytest.raises(ValueError, match=r"`float_model` has no module named \['conv1'"):
        per_layer_sqnr(nn.Sequential(), model, x)


class _Branches(nn.Module):
    """Two layers whose outputs reach the result with very different weights: ``muted``'s is scaled by 1e-6."""

    def __init__(self) -> None:
        super().__init__()
        self.loud, self.muted = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.loud(x) + 1e-6 * self.muted(x), "ids": torch.zeros(2, dtype=torch.long)}


def test_output_sensitivity_measures_each_layer_alone_at_the_output() -> None:
    torch.manual_seed(0)
    model = _Branches()
    layers = prepare_qat(model)
    x = torch.randn(32, 8)
    model.train()
    with torch.no_grad():
        model(x)  # calibrate
    layers["muted"].set_fake_quant_enabled(False)  # a state the measurement must give back
    sensitivity = output_sensitivity(model, x)
    assert list(sensitivity) == ["loud", "muted"]
    # by hand: only that layer int8, against all float (an integer output is left out of the comparison)
    with torch.no_grad():
        model.eval()
        set_fake_quant_enabled(model, False)
        reference = model(x)["out"]
        for name in ("loud", "muted"):
            fake_quant_modules(model)[name].set_fake_quant_enabled(True)
            assert sensitivity[name] == pytest.approx(sqnr_db(reference, model(x)["out"]))
            fake_quant_modules(model)[name].set_fake_quant_enabled(False)
    # the two layers add errors of the same order locally, but only one of them reaches the output
    set_fake_quant_enabled(model, True)
    local = per_layer_sqnr(None, model, x)
    assert abs(local["loud"] - local["muted"]) < 15 and sensitivity["muted"] > sensitivity["loud"] + 60
    model.train()
    layers["muted"].set_fake_quant_enabled(False)
    output_sensitivity(model, x)
    assert model.training and layers["loud"].is_fake_quant_enabled and not layers["muted"].is_fake_quant_enabled
    with pytest.raises(ValueError, match="has no fake-quant layers"):
        output_sensitivity(strip_qat(model), x)


def test_per_layer_sqnr_multi_input_and_kwargs() -> None:
    torch.manual_seed(0)
    model = TwoInputNet()
    prepare_qat(model)
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    model.train()
    model(x, y)
    result = per_layer_sqnr(None, model, (x, y), kwargs={"scale": 0.5})
    assert set(result) == {"a", "b", "out"}


def test_weight_sqnr() -> None:
    torch.manual_seed(0)
    model8, model4 = mlp(), mlp()
    prepare_qat(model8)
    prepare_qat(model4, QuantConfig(weight_bits=4))
    s8, s4 = weight_sqnr(model8), weight_sqnr(model4)
    assert list(s8) == ["0", "2", "4"]
    assert all(v > 35 for v in s8.values())
    assert all(10 < s4[n] < s8[n] for n in s8)


def test_measure_latency_structure_and_threads_restored() -> None:
    model = mlp().eval()
    before = torch.get_num_threads()
    result = measure_latency(model, torch.randn(4, 16), warmup=1, repeats=5)
    assert set(result) == {"median_ms", "mean_ms", "min_ms", "max_ms", "std_ms", "repeats"}
    assert result["repeats"] == 5 and result["median_ms"] > 0 and result["min_ms"] <= result["median_ms"]
    assert torch.get_num_threads() == before
    kw = measure_latency(TwoInputNet().eval(), (torch.randn(2, 8), torch.randn(2, 4)), repeats=2, kwargs={"scale": 2.0})
    assert kw["median_ms"] > 0
    training_step = measure_latency(lambda x: model(x).sum().backward(), torch.randn(4, 16), repeats=2, no_grad=False)
    assert training_step["median_ms"] > 0 and model[0].weight.grad is not None
    with pytest.raises(ValueError, match=r"`repeats` must be a positive integer, got 0\."):
        measure_latency(model, torch.randn(4, 16), repeats=0)


def test_compare_latency_alternates_and_reports_ratio() -> None:
    calls: list[str] = []

    def fn_a(x: torch.Tensor) -> torch.Tensor:
        calls.append("a")
        return x * 2

    def fn_b(x: torch.Tensor) -> torch.Tensor:
        calls.append("b")
        return x + 1

    result = compare_latency(fn_a, fn_b, torch.ones(3), warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert set(result) == {"a", "b", "ratio", "speedup"}
    assert result["ratio"] == pytest.approx(result["b"]["median_ms"] / result["a"]["median_ms"])
    assert result["speedup"] == pytest.approx(1 / result["ratio"])


def test_num_threads_context_manager() -> None:
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with num_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"`num_threads` must be a positive integer, got 0\."), num_threads(0):
        pass


# --------------------------------------------------------------------------------------------------------------------
# One measurement of an int8 model: Int8Report, measure_int8
# --------------------------------------------------------------------------------------------------------------------


def test_measure_int8_against_the_fake_quant_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp()
    prepare_qat(model)
    x = torch.randn(64, 16)
    train_steps(model, x, steps=5)
    model.eval()
    int8 = convert_to_int8(model, (x,))
    with torch.no_grad():
        fake_out, int8_out = model(x), int8.module()(x)
    fake = Evaluation({"val_acc": 0.90}, [fake_out])
    quantized = Evaluation({"val_acc": 0.88}, [int8_out])
    report = measure_int8(
        int8,
        strip_qat(copy.deepcopy(model)),
        tmp_path / "int8.pt2",
        (x,),
        {},
        fake_quant_model=model,
        monitor="val_acc",
        reference_evaluation=fake,
        int8_evaluation=quantized,
        latency="eager",
        batch_sizes=[4],
    )
    assert report.reference == "fake_quant" and report.saved_to == str(tmp_path / "int8.pt2")
    assert torch.equal(load_quantized(report.saved_to)(x), int8_out)
    assert report.int8_bytes == (tmp_path / "int8.pt2").stat().st_size  # (tiny net: metadata outweighs it)
    assert report.size_ratio == report.int8_bytes / report.float_bytes
    assert report.metric_drop == pytest.approx(0.02) and report.top1_agreement is not None
    assert report.activation_scales == {name: scale for name, (scale, _) in activation_qparams(model).items()}
    metrics = report.to_metrics(prefix="q/")
    assert metrics["q/fake_quant_val_acc"] == 0.90 and metrics["q/int8_val_acc"] == 0.88
    assert metrics["q/val_acc_drop"] == pytest.approx(0.02) and "q/int8_vs_fake_quant_sqnr_db" in metrics
    assert {"q/sqnr/0", "q/activation_scale/2", "q/weight_scale/4", "q/int8_ms/batch_4"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert not model.training  # the measurement leaves the model's mode as it was


def test_int8_report_against_float_with_given_layer_sqnr_and_a_lower_is_better_metric(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    x = torch.randn(16, 16)
    int8 = convert_to_int8(model, (x,), mode="dynamic")
    report = measure_int8(
        int8,
        model,
        tmp_path / "a.pt2",
        (x,),
        {},
        layer_sqnr={"0": 30.0},
        monitor="val_loss",
        reference_evaluation=Evaluation({"val_loss": 0.5}, []),
        int8_evaluation=Evaluation({"val_loss": 0.6}, []),
        higher_is_better=False,
    )
    metrics = report.to_metrics()
    assert metrics["float_val_loss"] == 0.5 and metrics["val_loss_drop"] == pytest.approx(0.1)
    assert metrics["sqnr/0"] == 30.0 and "top1_agreement" not in metrics  # no outputs: no agreement
    assert not any(k.startswith(("activation_scale/", "int8_vs_")) for k in metrics)
    assert Int8Report(float_bytes=4, int8_bytes=1).to_metrics()["size_ratio"] == 0.25
