"""Engine support for post-training quantization: calibration observers and the early export check."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_compress.engine.convert import Int8ConversionError, check_exportable, convert_to_int8, int8_weights
from lightning_compress.engine.measure import sqnr_db


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _calibration_with_one_outlier() -> tuple[list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(256, 16, generator=g) for _ in range(8)]
    batches[3][0, 0] = 500.0  # one value in 32768: a range that keeps it wastes the uint8 grid on nothing
    return batches, torch.randn(64, 16, generator=g)


def test_observers_differ_on_an_outlier_as_documented() -> None:
    model = _linear_model()
    calibration, test_x = _calibration_with_one_outlier()
    with torch.no_grad():
        reference = model(test_x)
    sqnr = {}
    for observer in ("minmax", "moving_average", "histogram", "histogram_l2"):
        int8 = convert_to_int8(model, (test_x[:8],), mode="static", calibration_data=calibration, observer=observer)
        with torch.no_grad():
            sqnr[observer] = sqnr_db(reference, int8.module()(test_x))
    # min/max keeps the outlier: the other values fall on a handful of levels.
    assert sqnr["histogram"] > sqnr["minmax"] + 10.0, sqnr
    # The moving average only lets the outlier batch in with weight 0.01.
    assert sqnr["moving_average"] > sqnr["minmax"] + 10.0, sqnr
    assert sqnr["histogram"] > 15.0, sqnr
    # torchao's L2 search keeps an isolated outlier (clipping it would cost more squared error than the coarse grid).
    assert sqnr["histogram_l2"] < sqnr["histogram"] - 10.0, sqnr


def test_observer_is_ignored_outside_static_and_checked() -> None:
    model = _linear_model()
    x = torch.randn(8, 16)
    int8 = convert_to_int8(model, (x,), mode="dynamic", observer="minmax")
    assert int8.mode == "dynamic"
    with pytest.raises(ValueError, match=r"`observer` must be one of 'minmax', .*'histogram_l2', got 'percentile'"):
        convert_to_int8(model, (x,), observer="percentile")
    with pytest.raises(ValueError, match=r"`percentile` must be in \(50, 100\], got 40"):
        convert_to_int8(model, (x,), percentile=40)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum().item() > 0:  # Python control flow on a tensor value: export cannot capture it
            return self.fc(x)
        return x


def test_check_exportable() -> None:
    model = _linear_model().train()
    check_exportable(model, torch.randn(4, 16))
    assert model.training  # mode restored
    with pytest.raises(Int8ConversionError, match=r"torch.export could not capture `_DataDependent`"):
        check_exportable(_DataDependent(), (torch.randn(4, 4),))


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(1000, 64)
        self.positions = nn.Embedding(16, 64)
        self.fc = nn.Linear(64, 4)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.fc(h.mean(1))


def test_quantize_embeddings_stores_int8_rows_and_honours_skip() -> None:
    torch.manual_seed(0)
    model = _Embedder().eval()
    ids = torch.randint(0, 1000, (8, 16))
    with torch.no_grad():
        reference = model(ids)
    plain = convert_to_int8(model, (ids,), mode="dynamic", quantize_embeddings=False)
    int8 = convert_to_int8(model, (ids,), mode="dynamic")  # on by default (measured: see ConversionConfig)
    assert type(model.tokens) is nn.Embedding  # the input model is untouched
    shapes = sorted(tuple(t.shape) for t in int8_weights(int8).values())
    assert shapes == [(4, 64), (16, 64), (1000, 64)]
    assert int8.size_bytes() < 0.4 * plain.size_bytes()
    with torch.no_grad():
        assert sqnr_db(reference, int8.module()(ids)) > 30.0
    kept = convert_to_int8(model, (ids,), mode="dynamic", quantize_embeddings=True, skip=["tokens"])
    assert sorted(tuple(t.shape) for t in int8_weights(kept).values()) == [(4, 64), (16, 64)]
