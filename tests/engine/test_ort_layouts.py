"""ONNX Runtime int8 on module layouts that real models use (Hugging Face BERT, LitGPT): layers held in an
``nn.ModuleList`` and attention written by hand with an additive mask. Plain PyTorch, small, fast."""

from __future__ import annotations

import math

import onnx
import torch
from test_fake_quant import train_steps
from torch import Tensor, nn

from lightning_compress.engine.fake_quant import fake_quant_modules, freeze_observers, prepare_qat
from lightning_compress.engine.measure import sqnr_db
from lightning_compress.engine.ort import _scope, convert_to_onnx_int8


class Block(nn.Module):
    """Hand-written single-head attention with an additive mask (``-inf``-like where masked), as in HF BERT."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        return x + self.out((scores + additive_mask).softmax(-1) @ self.value(x))


class Encoder(nn.Module):
    """Blocks in an ``nn.ModuleList`` (never called itself, so it has no scope in the exported graph)."""

    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.layer = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        additive = (1.0 - attention_mask[:, None, :].float()) * torch.finfo(torch.float32).min
        x = self.embed(input_ids)
        for block in self.layer:
            x = block(x, additive)
        return self.head(x.mean(1))


def _inputs(batch: int = 16, length: int = 10) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[::2, length // 2 :] = 0  # padded rows: their masked scores hold float32's minimum
    return {"input_ids": torch.randint(0, 50, (batch, length), generator=g), "attention_mask": mask}


def test_scope_skips_containers_that_are_never_called() -> None:
    assert _scope("net.layer.0.query") == "/net/layer/layer.0/query/"
    assert _scope("net.layer.0.query", {"net.layer"}) == "/net/layer.0/query/"


def test_qat_layers_inside_a_module_list_are_seeded_and_int8() -> None:
    torch.manual_seed(0)
    model, kw = Encoder(), _inputs()
    prepare_qat(model)
    train_steps(model, kw["input_ids"], kw["attention_mask"], steps=3)
    freeze_observers(model.eval())
    int8 = convert_to_onnx_int8(model, (), kw, mode="static", calibration=[kw])
    assert len(fake_quant_modules(model)) == 9  # 4 per block and the head
    assert set(int8.seeded_layers) == set(fake_quant_modules(model))
    assert int8.num_quantized_layers == 9 and int8.float_layers == ()


def test_static_int8_keeps_a_hand_written_attention_mask_float() -> None:
    torch.manual_seed(0)
    model, kw = Encoder().eval(), _inputs()
    int8 = convert_to_onnx_int8(model, (), kw, mode="static", calibration=[kw])
    assert int8.quantized_layers == {"MatMul": 8, "Gemm": 1}
    with torch.no_grad():
        reference = model(**kw)
    # with only the weight layers int8 (40 dB here); quantizing the attention's Softmax, score MatMuls and mask Add
    # as well (what happened when no torch attention module told the converter): 22 dB here, 0.2 dB on MiniLM
    assert sqnr_db(reference, int8(**kw)) > 30.0
    # keyword, positional and mixed calls, another batch size and another length
    short = {k: v[:3, :7] for k, v in kw.items()}
    torch.testing.assert_close(int8(short["input_ids"], attention_mask=short["attention_mask"]), int8(**short))
    assert int8(short["input_ids"], short["attention_mask"]).shape == (3, 3)


class ReLU6Head(nn.Module):
    """Conv -> BN -> ReLU6 -> global pool -> Linear, as at the end of EfficientNet-Lite and MobileNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Linear(16, 5)
        self.bn.running_var.fill_(4.0)  # pre-activations well beyond 6: the clamp matters

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(nn.functional.relu6(self.bn(self.conv(x))).mean((2, 3)))


def test_a_float_layer_after_relu6_keeps_the_clamp() -> None:
    # ORT drops a quantized Clip (its uint8 grid clamps to [0, 6]); when the layer after it is kept float and its
    # input unquantized, the Clip must stay, or ReLU6 disappears from the graph
    torch.manual_seed(0)
    model, x = ReLU6Head().eval(), torch.randn(16, 3, 12, 12) * 4
    int8 = convert_to_onnx_int8(model, x[:2], mode="static", calibration=[x], float_layers=["fc"])
    assert int8.quantized_layers == {"Conv": 1} and int8.float_layers == ("fc",)
    graph = onnx.load_from_string(int8.onnx_bytes).graph
    assert any(n.op_type == "Clip" for n in graph.node)
    with torch.no_grad():
        reference = model(x)
    assert sqnr_db(reference, int8(x)) > 25.0
