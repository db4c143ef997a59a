"""Shapes of real models users bring (issue 13), reduced to a few lines each: an unused Linear -> tanh branch (a
Hugging Face BERT pooler when only ``last_hidden_state`` is read), ``nn.Conv2d`` subclasses (EfficientNet-Lite's
``Conv2dSame``), ``nn.TransformerEncoder``; conversion in every mode, honest int8 counts, clear errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.engine.convert import Int8ConversionError, convert_to_int8, quantized_layers
from lightning_compress.engine.convert import pipeline as pipeline_module
from lightning_compress.engine.fake_quant import prepare_qat
from lightning_compress.engine.measure import layers_left_float, measure_int8, sqnr_db


class Encoder(nn.Module):
    """Returns (hidden states, pooled), like ``BertModel``; the pooler is Linear -> tanh on the first token."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.pooler = nn.Linear(8, 8)
        self.activation = nn.Tanh()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.layer(x)
        return hidden, self.activation(self.pooler(hidden[:, 0]))


class Classifier(nn.Module):
    """A head on the hidden states only: the pooler's result is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = Encoder()
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bert(x)[0].mean(1))


def _classifier() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Classifier().eval(), torch.randn(4, 3, 8)


def _qat_classifier() -> tuple[nn.Module, Tensor]:
    model, x = _classifier()
    prepare_qat(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)  # observers see data
    return model.eval(), x


# --------------------------------------------------------------------------------------------------------------------
# An unused branch (issue 13, item 1)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight_only"])
def test_unused_linear_activation_branch_converts_in_every_mode(mode: str) -> None:
    model, x = _classifier()
    int8 = convert_to_int8(model, (x,), mode=mode)
    with torch.no_grad():
        assert sqnr_db(model(x), int8.module()(x)) > 20
    assert any("not used" in note and "bert.pooler" in note for note in int8.notes)
    assert int8.unused == ("bert.pooler", "bert.activation") and layers_left_float(int8, model) == {}
    assert set(quantized_layers(int8)) == {"bert.layer", "head"}  # the dead pooler is gone, the rest is int8


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_unused_branch_converts_after_qat(mode: str) -> None:
    model, x = _qat_classifier()
    int8 = convert_to_int8(model, (x,), mode=mode)
    with torch.no_grad():
        assert sqnr_db(model(x), int8.module()(x)) > 20
    assert int8.num_quantized_layers == 2


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_unused_branch_converts_with_onnxruntime(mode: str) -> None:
    from lightning_compress.engine.ort import convert_to_onnx_int8

    model, x = _classifier()
    int8 = convert_to_onnx_int8(model, x, mode=mode)
    assert int8.num_quantized_layers == 2  # the exporter drops the unused pooler itself
    with torch.no_grad():
        assert sqnr_db(model(x), int8(x)) > 20


# --------------------------------------------------------------------------------------------------------------------
# What failed and where (issue 13, item 1)
# --------------------------------------------------------------------------------------------------------------------


def test_a_pt2e_failure_names_the_stage_the_node_the_module_and_only_untried_modes(monkeypatch) -> None:
    # without the dead-code pass, the quantizer fails on the pooler: the failure the message must explain
    monkeypatch.setattr(pipeline_module, "_eliminate_dead_code", lambda graph: [])
    model, x = _classifier()
    with pytest.raises(Int8ConversionError) as info:
        convert_to_int8(model, (x,), mode="dynamic")
    message = str(info.value)
    assert "preparing the graph" in message and "IndexError" in message
    assert "module `bert.pooler` (Linear)" in message and "graph node `linear_1`" in message
    assert "mode='static' or 'weight_only'" in message and "mode='dynamic' or" not in message
    assert "skip=['bert.pooler']" in message and "`exclude`" in message


def test_a_qat_failure_suggests_only_the_modes_qat_has(monkeypatch) -> None:
    monkeypatch.setattr(pipeline_module, "_eliminate_dead_code", lambda graph: [])
    model, x = _qat_classifier()
    with pytest.raises(Int8ConversionError, match=r"bert\.pooler") as info:
        convert_to_int8(model, (x,))
    message = str(info.value)
    assert "Still to try: mode='dynamic';" in message and "weight_only" not in message


def test_a_failure_after_prepare_names_its_stage(monkeypatch) -> None:
    def broken(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
        raise RuntimeError("boom")

    monkeypatch.setattr("torchao.quantization.pt2e.quantize_pt2e.convert_pt2e", broken)
    model, x = _classifier()
    with pytest.raises(Int8ConversionError, match=r"(?s)converting the calibrated graph.*RuntimeError: boom"):
        convert_to_int8(model, (x,), mode="weight_only")


# --------------------------------------------------------------------------------------------------------------------
# Conv subclasses and honest int8 counts (issue 13, item 2)
# --------------------------------------------------------------------------------------------------------------------


class PlainSubConv(nn.Conv2d):
    """A subclass with the parent's forward (a marker type, as model zoos define)."""


class Conv2dSame(nn.Conv2d):
    """EfficientNet's TensorFlow-style "same" padding: pads in ``forward``, then the parent's convolution."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias)


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2, padding=0)
        self.block = PlainSubConv(8, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.block(F.relu(self.stem(x))))
        return self.fc(self.conv(x).mean((2, 3)))


def _subclass_net() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return SubclassNet().eval(), torch.randn(4, 3, 16, 16)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_conv_subclasses_are_quantized_by_pt2e(mode: str, tmp_path) -> None:
    model, x = _subclass_net()
    int8 = convert_to_int8(model, (x,), mode=mode)
    assert set(int8.quantized_layers) == {"stem", "block", "conv", "fc"}  # was {"conv", "fc"}
    with torch.no_grad():
        assert sqnr_db(model(x), int8.module()(x)) > 20
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stayed float.*")
        report = measure_int8(int8, model, tmp_path / "a.pt2", (x,), {})
    assert report.int8_layers == 4 and report.float_layers == {} and report.to_metrics()["int8_layers"] == 4.0


def test_qat_swaps_conv_subclasses_and_converts_them_to_int8() -> None:
    from lightning_compress.engine.fake_quant import FakeQuantConv2d, strip_qat
    from lightning_compress.engine.ort import convert_to_onnx_int8

    model, x = _subclass_net()
    prepared = prepare_qat(model)
    # was ["conv", "fc"], then ["block", "conv", "fc"]: `stem` pads in its own forward, now simulated around its call
    assert sorted(prepared) == ["block", "conv", "fc", "stem"]
    assert isinstance(model.block, FakeQuantConv2d) and isinstance(model.block, PlainSubConv)
    assert isinstance(model.stem, FakeQuantConv2d) and isinstance(model.stem, Conv2dSame)
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    pt2e = convert_to_int8(model, (x,))
    assert set(pt2e.quantized_layers) == {"stem", "block", "conv", "fc"} and pt2e.skipped == ()
    assert layers_left_float(pt2e, strip_qat(copy.deepcopy(model))) == {}
    ort = convert_to_onnx_int8(model, x, mode="static")
    assert ort.num_quantized_layers == 4 and ort.float_layers == ()
    with torch.no_grad():
        assert sqnr_db(model(x), pt2e.module()(x)) > 20
        assert sqnr_db(model(x), ort(x)) > 20
    strip_qat(model)
    assert type(model.block) is PlainSubConv and type(model.stem) is Conv2dSame  # the user's types come back


def test_layers_the_artifact_leaves_float_are_counted_named_and_warned_about(tmp_path, monkeypatch) -> None:
    # the quantizer without the subclass relabelling: what the artifact held before, and how it must be reported
    monkeypatch.setattr(pipeline_module, "_match_layer_subclasses", lambda graph, model: [])
    model, x = _subclass_net()
    int8 = convert_to_int8(model, (x,))
    assert int8.num_quantized_layers == 2
    left = layers_left_float(int8, model)
    assert list(left) == ["stem", "block"] and "subclass of nn.Conv2d" in left["stem"]
    with pytest.warns(UserWarning, match=r"(?s)2 layer\(s\) of the artifact are int8.*`stem` \(Conv2dSame"):
        report = measure_int8(int8, model, tmp_path / "a.pt2", (x,), {})
    assert report.int8_layers == 2 and list(report.float_layers) == ["stem", "block"]


def test_the_onnxruntime_count_is_read_from_the_graph_and_matched_to_modules(tmp_path) -> None:
    from lightning_compress.engine.ort import convert_to_onnx_int8

    model, x = _subclass_net()
    int8 = convert_to_onnx_int8(model, x, mode="static")
    assert layers_left_float(int8, model) == {}
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)).eval()
    int8 = convert_to_onnx_int8(nested, torch.randn(4, 4), mode="dynamic")
    assert int8.num_quantized_layers == 2 and layers_left_float(int8, nested) == {}  # "0.0" and "1" matched
    dead, x = _classifier()
    assert layers_left_float(convert_to_onnx_int8(dead, x, mode="dynamic"), dead) == {}  # the unused pooler


def test_transformer_encoder_counts_only_what_is_int8() -> None:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    int8 = convert_to_int8(encoder, (torch.randn(2, 5, 16),), mode="dynamic")
    # the feed-forward Linears; attention (packed in_proj_weight, out_proj) stays float (docs/limits.md)
    assert int8.quantized_layers == ("layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2")
    assert layers_left_float(int8, encoder) == {}


# --------------------------------------------------------------------------------------------------------------------
# Size (issue 13, item 5)
# --------------------------------------------------------------------------------------------------------------------


def test_an_artifact_not_smaller_than_fp32_is_warned_about_with_sizes_and_reasons(tmp_path) -> None:
    model, x = _classifier()  # a tiny net: the graph and its metadata outweigh the weights
    int8 = convert_to_int8(model, (x,), mode="dynamic")
    with pytest.warns(UserWarning, match=r"is not smaller than the fp32 state_dict \([\d,]+ bytes, [\d.]+x\)"):
        report = measure_int8(int8, model, tmp_path / "a.pt2", (x,), {})
    assert report.int8_bytes >= report.float_bytes


def test_a_smaller_artifact_gives_no_size_warning(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    x = torch.randn(4, 256)
    int8 = convert_to_int8(model, (x,), mode="dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = measure_int8(int8, model, tmp_path / "a.pt2", (x,), {})
    assert report.size_ratio < 0.5 and report.int8_layers == 2
