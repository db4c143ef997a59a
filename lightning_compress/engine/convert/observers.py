"""Calibration observers of the conversion: fixed ranges carried over from QAT, and percentile clipping."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.engine.config import DEFAULT_PERCENTILE
from lightning_compress.engine.convert.export import _module_path
from lightning_compress.engine.fake_quant import ACTIVATION_EPS

_QUANTIZED_OPS = {
    "aten.linear.default",
    "aten.conv1d.default",
    "aten.conv2d.default",
    "aten.conv3d.default",
    "aten.conv1d.padding",
    "aten.conv2d.padding",
    "aten.conv3d.padding",
}


@functools.cache
def _fixed_observer_type() -> type[nn.Module]:
    from torchao.quantization.pt2e.observer import MinMaxObserver

    class FixedRangeObserver(MinMaxObserver):
        """A ``MinMaxObserver`` whose range was set from a fake-quant observer: calibration does not move it."""

        def forward(self, x_orig: Tensor) -> Tensor:
            return x_orig

    return FixedRangeObserver


@functools.cache
def _percentile_observer_type() -> Any:
    from torchao.quantization.pt2e.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        """torchao's running histogram, with the range clipped at a percentile instead of an L2 search."""

        def __init__(self, *args: Any, percentile: float = DEFAULT_PERCENTILE, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.percentile = percentile

        def _non_linear_param_search(self) -> tuple[Tensor, Tensor]:
            cdf = torch.cumsum(self.histogram, 0)
            total = cdf[-1]
            tail = total * (100.0 - self.percentile) / 100.0
            last = self.bins - 1
            lo = torch.searchsorted(cdf, tail.reshape(1), right=True).clamp(max=last)
            hi = torch.searchsorted(cdf, (total - tail).reshape(1), right=False).clamp(max=last)
            width = (self.max_val - self.min_val) / self.bins
            new_min = (self.min_val + lo.float() * width).reshape(())
            new_max = torch.minimum(self.min_val + (hi.float() + 1.0) * width, self.max_val).reshape(())
            return new_min, new_max

    return PercentileObserver


def _carry_ranges(prepared: torch.fx.GraphModule, ranges: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Replace the input observers of the quantized Linear/Conv ops of fake-quant modules by fixed-range ones."""
    per_observer: dict[str, list[str]] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_function" or str(node.target) not in _QUANTIZED_OPS or not node.args:
            continue
        source = node.args[0]
        name = _module_path(node)
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or name not in ranges:
            continue
        if "activation_post_process" not in str(source.target):
            continue
        per_observer.setdefault(str(source.target), []).append(name)
    fixed_type = _fixed_observer_type()
    carried: dict[str, Any] = {}
    for target, names in per_observer.items():
        old = prepared.get_submodule(target)
        new = fixed_type(
            dtype=old.dtype,
            qscheme=old.qscheme,
            quant_min=old.quant_min,
            quant_max=old.quant_max,
            eps=float(getattr(old, "eps", ACTIVATION_EPS)),
        )
        lo = min(ranges[n][0] for n in names)
        hi = max(ranges[n][1] for n in names)
        new.min_val = torch.tensor(lo)
        new.max_val = torch.tensor(hi)
        setattr(prepared, target, new)
        for n in names:
            carried[n] = (lo, hi)
    return carried


def _calibrated_observers(prepared: torch.fx.GraphModule) -> list[str]:
    """Activation observers that calibration sets (not weight observers, not ranges carried from fake quant)."""
    names = []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or "activation_post_process" not in str(node.target):
            continue
        if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr":
            continue  # a weight
        if type(prepared.get_submodule(str(node.target))).__name__ == "FixedRangeObserver":
            continue
        names.append(str(node.target))
    return names
