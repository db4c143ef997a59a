"""The ONNX Runtime int8 model quantizes what QAT simulated and what PTQ was told to, nothing more."""

import pytest
import torch
from torch import nn

from lightning_compress.engine.config import QuantConfig
from lightning_compress.engine.fake_quant import prepare_qat
from lightning_compress.engine.ort import convert_to_onnx_int8


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_qat_int8_leaves_float_what_qat_kept_float(mode):
    torch.manual_seed(0)
    net = Encoder()
    prepare_qat(net, QuantConfig())  # linear1, linear2, head; MultiheadAttention's in_proj/out_proj stay float
    x = torch.randn(8, 6, 32)
    net(x)
    int8 = convert_to_onnx_int8(net.eval(), x, mode=mode)
    assert sum(int8.quantized_layers.values()) == 3


def test_dynamic_float_layers_hold_for_gemm_nodes():
    """quantize_dynamic rewrites a Gemm as `<name>_MatMul` before excluding nodes: the kept-float head stays float."""
    net, x = Encoder().eval(), torch.randn(8, 6, 32)
    everything = convert_to_onnx_int8(net, x, mode="dynamic")
    without_head = convert_to_onnx_int8(net, x, mode="dynamic", float_layers=["head"])
    assert sum(everything.quantized_layers.values()) - sum(without_head.quantized_layers.values()) == 1


def test_latency_of_an_ort_int8_model_leads_with_the_fastest_float_runtime():
    from lightning_compress.engine.measure import latency_report

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16)
    report = latency_report(net, convert_to_onnx_int8(net, x), (x,), {}, [1, 8], mode="eager")
    for bs in (1, 8):
        keys = [k for k in report if k.endswith(f"/batch_{bs}")]
        assert keys[0] == f"speedup_vs_fastest_float/batch_{bs}"  # the headline comes first
        assert report[keys[0]] == min(report[f"speedup/batch_{bs}"], report[f"speedup_vs_onnxruntime_fp32/batch_{bs}"])
        assert report[f"onnxruntime_fp32_ms/batch_{bs}"] > 0
