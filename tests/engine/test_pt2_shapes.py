"""The ``"inductor"`` (pt2e) int8 program takes the shapes the network takes (issue 13 item 4): a dynamic batch, and
dynamic sequence lengths and image sizes where the network runs at another size (checked against eager), saved with
the ``.pt2``; sizes the network cannot take stay fixed, stated in the notes and in the error."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_compress.engine.config import ConversionConfig
from lightning_compress.engine.convert import load_quantized, save_int8
from lightning_compress.engine.convert.backend import convert_with_backend
from lightning_compress.engine.fake_quant import prepare_qat


class ConvNet(nn.Module):
    """Conv-BN-ReLU, global average pool, Linear: any image size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class TinyLM(nn.Module):
    """Token ids and a padding mask of the same length, learned positions up to 32."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(50, 16), nn.Embedding(32, 16)
        self.hidden, self.out = nn.Linear(16, 16), nn.Linear(16, 50)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.out(torch.relu(self.hidden(hidden)) * mask.unsqueeze(-1))


class FlatNet(nn.Module):
    """Conv then flatten -> Linear: 12x12 images only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 12 * 12, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _convert(model: nn.Module, args: tuple, kwargs: dict | None = None, calibration: list | None = None, **config):
    return convert_with_backend(
        "inductor", model, args, kwargs or {}, config=ConversionConfig(**config), calibration=calibration
    )


def test_a_conv_net_takes_another_image_size_after_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    net = ConvNet().eval()
    images = [torch.randn(8, 3, 28, 28) for _ in range(4)]
    int8 = _convert(net, (images[0],), calibration=images)
    assert int8.dynamic_batch
    assert int8.input_shapes == {"x": ["batch", 3, "dim_28", "dim_28"]}
    assert any("takes x: (batch, 3, dim_28, dim_28)" in note for note in int8.notes)
    save_int8(int8, tmp_path / "cnn.pt2")
    loaded = load_quantized(tmp_path / "cnn.pt2")
    assert loaded.input_shapes == int8.input_shapes
    other = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected, got = net(other), loaded(other)
    assert got.shape == (5, 4)
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max()) + 1e-3
    assert loaded(torch.randn(2, 3, 20, 24)).shape == (2, 4)  # sides independent
    with pytest.raises(ValueError, match=r"has shape \(2, 3, 20\), but this int8 program takes"):
        loaded(torch.randn(2, 3, 20))


def test_a_qat_conv_net_takes_another_image_size_close_to_fake_quant() -> None:
    torch.manual_seed(0)
    net = ConvNet()
    prepare_qat(net)
    net.train()
    images = torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        for _ in range(3):
            net(images)  # the observers see data
    net.eval()
    int8 = _convert(net, (images,))
    assert int8.input_shapes == {"x": ["batch", 3, "dim_28", "dim_28"]}
    other = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = net(other), int8.module()(other)
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max()) + 1e-3


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_language_model_takes_other_sequence_lengths_with_keywords(tmp_path, mode: str) -> None:
    torch.manual_seed(0)
    lm = TinyLM().eval()
    ids, mask = torch.randint(0, 50, (4, 10)), torch.ones(4, 10)
    int8 = _convert(lm, (ids,), {"mask": mask}, mode=mode)
    assert int8.input_shapes == {"ids": ["batch", "dim_10"], "mask": ["batch", "dim_10"]}
    save_int8(int8, tmp_path / "lm.pt2")
    loaded = load_quantized(tmp_path / "lm.pt2")
    for length in (1, 3, 17):  # one token at a time, less padding, longer
        short, short_mask = torch.randint(0, 50, (2, length)), torch.ones(2, length)
        with torch.no_grad():
            expected, got = lm(short, short_mask), loaded(short, mask=short_mask)
        assert got.shape == (2, length, 50)
        assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max()) + 1e-3


def test_a_net_fixed_to_its_image_size_keeps_a_dynamic_batch_and_says_so(tmp_path) -> None:
    torch.manual_seed(0)
    net = FlatNet().eval()
    int8 = _convert(net, (torch.randn(4, 1, 12, 12),))
    assert int8.dynamic_batch
    assert int8.input_shapes == {"x": ["batch", 1, 12, 12]}
    assert any("takes x: (batch, 1, 12, 12) (sizes [12] stay fixed" in note for note in int8.notes)
    save_int8(int8, tmp_path / "flat.pt2")
    loaded = load_quantized(tmp_path / "flat.pt2")
    assert loaded(torch.randn(7, 1, 12, 12)).shape == (7, 3)
    with pytest.raises(ValueError, match=r"shape \(2, 1, 16, 16\), but this int8 program takes \(batch, 1, 12, 12\)"):
        loaded(torch.randn(2, 1, 16, 16))


class ShapeConstant(nn.Module):
    """Runs at any length in eager, but reads the length as a Python int: export may bake it in; the check against
    eager at another size must catch a program that computes something else there."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        scale = 1.0 / int(x.shape[1])  # a size traced as a constant under export specializes the dim
        return self.fc(x * scale)


def test_a_size_the_export_specializes_stays_fixed() -> None:
    torch.manual_seed(0)
    net = ShapeConstant().eval()
    int8 = _convert(net, (torch.randn(4, 5, 6),))
    assert int8.dynamic_batch
    shape = int8.input_shapes["x"]
    assert shape[0] == "batch" and shape[2] == 6
    if shape[1] == "dim_5":  # kept dynamic only if the program computes what eager does at another length
        other = torch.randn(2, 9, 6)
        with torch.no_grad():
            assert torch.allclose(int8.module()(other), net(other), atol=0.05)
    else:
        assert shape[1] == 5


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_int8_runs_the_program_at_other_image_sizes(dynamic: bool) -> None:
    from lightning_compress.engine.convert import compile_int8

    torch.manual_seed(0)
    int8 = _convert(ConvNet().eval(), (torch.randn(8, 3, 28, 28),))
    compiled, reference = compile_int8(int8, dynamic=dynamic), int8.module()
    for side in (28, 32, 40):
        images = torch.randn(3, 3, side, side)
        with torch.no_grad():
            assert torch.allclose(compiled(images), reference(images), atol=1e-4)
