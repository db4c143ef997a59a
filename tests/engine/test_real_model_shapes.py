"""Shapes of real models users bring (issue 13), reduced to a few lines each: an unused Linear -> tanh branch (a
Hugging Face BERT pooler when only ``last_hidden_state`` is read), ``nn.Conv2d`` subclasses (EfficientNet-Lite's
``Conv2dSame``), ``nn.TransformerEncoder``; conversion in every mode, honest int8 counts, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_compress.engine.convert import Int8ConversionError, convert_to_int8, quantized_layers
from lightning_compress.engine.convert import pipeline as pipeline_module
from lightning_compress.engine.fake_quant import prepare_qat
from lightning_compress.engine.measure import sqnr_db


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
