"""ONNX artifacts take the shapes the network takes: dynamic sequence lengths and image sizes where the network runs
at another size (checked against eager), fixed ones stated in the error."""

import pytest
import torch
from torch import nn

from lightning_compress.demos.models import LeNet5
from lightning_compress.engine.ort import convert_to_onnx_int8, export_onnx, load_onnx


class PooledCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class TinyLM(nn.Module):
    """Token ids and a padding mask of the same length, learned positions up to 32."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(50, 16), nn.Embedding(32, 16), nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.out(hidden * mask.unsqueeze(-1))


def test_a_pooled_cnn_takes_other_image_sizes():
    torch.manual_seed(0)
    net = PooledCNN().eval()
    int8 = convert_to_onnx_int8(net, torch.randn(8, 1, 12, 12))
    assert int8.input_shapes == {"x": ["batch", 1, "dim_12", "dim_12"]}
    other = torch.randn(3, 1, 20, 16)
    with torch.no_grad():
        assert torch.allclose(int8(other), net(other), atol=0.1)


def test_a_language_model_takes_other_sequence_lengths_with_keywords(tmp_path):
    torch.manual_seed(0)
    lm = TinyLM().eval()
    ids, mask = torch.randint(0, 50, (4, 10)), torch.ones(4, 10)
    float_model = export_onnx(lm, (ids,), tmp_path / "lm.onnx", example_kwargs={"mask": mask})
    assert float_model.input_shapes == {"ids": ["batch", "dim_10"], "mask": ["batch", "dim_10"]}
    short, short_mask = torch.randint(0, 50, (2, 3)), torch.ones(2, 3)  # e.g. one token at a time, or less padding
    with torch.no_grad():
        expected = lm(short, short_mask)
    assert torch.allclose(load_onnx(tmp_path / "lm.onnx")(short, mask=short_mask), expected, atol=1e-5)
    assert convert_to_onnx_int8(lm, (ids,), {"mask": mask})(short, mask=short_mask).shape == (2, 3, 50)


def test_sizes_the_network_cannot_take_stay_fixed_and_the_error_says_so():
    int8 = convert_to_onnx_int8(LeNet5().eval(), torch.randn(4, 1, 28, 28))  # flatten -> Linear: 28x28 only
    assert int8.input_shapes == {"x": ["batch", 1, 28, 28]}
    with pytest.raises(ValueError, match=r"shape \(2, 1, 20, 20\), but this ONNX model takes \(batch, 1, 28, 28\)"):
        int8(torch.randn(2, 1, 20, 20))
    assert int8(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_embedding_tables_are_int8_by_default_in_the_onnx_artifact():
    torch.manual_seed(0)
    lm = TinyLM().eval()
    ids, mask = torch.randint(0, 50, (4, 10)), torch.ones(4, 10)
    with_tables = convert_to_onnx_int8(lm, (ids,), {"mask": mask}, mode="dynamic")
    float_tables = convert_to_onnx_int8(lm, (ids,), {"mask": mask}, mode="dynamic", quantize_embeddings=False)
    assert with_tables.size_bytes < 0.75 * float_tables.size_bytes  # tables 50x16 and 32x16 in int8
    with torch.no_grad():
        reference = lm(ids, mask)
    assert float((with_tables(ids, mask=mask) - reference).abs().max()) < 0.05 * float(reference.abs().max())
