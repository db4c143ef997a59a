"""Training-time fake quantization by module swap.

``prepare_qat`` replaces ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules, in place, by ``FakeQuantLinear`` /
``FakeQuantConv1d`` / ... that **reuse the very same** ``weight`` and ``bias`` ``Parameter`` objects. Nothing
else changes: the model's ``forward`` is untouched (multi-input and keyword-argument models just work), an optimizer
built before the swap keeps working, ``copy.deepcopy`` works, and the parameters keep their state_dict keys
(``fc1.weight`` stays ``fc1.weight``). The only new state_dict entries are small fixed-shape buffers:
``<name>.fake_quant_enabled`` and ``<name>.activation_observer.*``.

What is simulated matches torchao's ``X86InductorQuantizer`` (the backend ``lightning_compress.engine.convert``
uses to build the real int8 model):

* weights: per-output-channel symmetric, ``scale = max|w| / ((qmax - qmin) / 2)`` recomputed from the current weight
  on every forward, int8 range [-128, 127] (4-bit: [-8, 7]); zero weights (e.g. pruned ones) stay exactly zero;
* input activations: per-tensor affine uint8 [0, 255], range tracked by an observer while the module is training.

Gradients are straight-through: identity for the weights, and for the inputs identity inside the quantization range
and zero for clipped values (``torch.fake_quantize_per_tensor_affine``).

A *subclass* of Linear/Conv that keeps the parent's ``forward`` gets a fake-quant subclass of both. One with its
own ``forward`` (TensorFlow-style "same" padding: pad, then convolve) keeps it: that ``forward`` runs under a
``TorchFunctionMode`` that fake-quantizes the input and weight of its ``F.linear``/``F.convNd`` call on the module's
own ``weight``, so the padding and whatever else it does stay exactly as written; a ``forward`` that never makes
such a call (it convolves with a weight computed from ``weight``) is warned about once and runs in float.
``nn.MultiheadAttention``'s ``out_proj`` (a ``NonDynamicallyQuantizableLinear`` that
``F.multi_head_attention_forward`` uses through ``.weight`` without calling it) is left alone, so attention
internals stay in float during QAT; the ``linear1``/``linear2`` of ``nn.TransformerEncoderLayer`` are quantized.
While a transformer layer holds fake-quant modules its inference fast path (which would read the float weights
directly) is disabled.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.overrides import TorchFunctionMode

from lightning_compress.engine.config import ACTIVATION_OBSERVERS, WEIGHT_RANGES, QuantConfig
from lightning_compress.engine.selection import select_modules
from lightning_compress.engine.validation import check_choice

__all__ = [
    "ACTIVATION_EPS",
    "ActivationObserver",
    "FakeQuantConv1d",
    "FakeQuantConv2d",
    "FakeQuantConv3d",
    "FakeQuantLinear",
    "FakeQuantModule",
    "activation_qparams",
    "activation_ranges",
    "check_finite_ranges",
    "fake_quant_modules",
    "fake_quantize_input",
    "fake_quantize_weight",
    "freeze_batchnorm_stats",
    "freeze_observers",
    "is_prepared",
    "prepare_qat",
    "quant_config_dict",
    "quant_state_keys",
    "set_fake_quant_enabled",
    "strip_qat",
    "sync_observers",
    "weight_qparams",
    "weight_scales",
]

#: Smallest scale, as in ``get_default_x86_inductor_quantization_config`` (``eps=2**-12``).
ACTIVATION_EPS = 2.0**-12
#: Input activations: uint8, per-tensor affine (what ``X86InductorQuantizer`` uses).
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255
#: Number of bins of the ``"histogram"`` observer.
HISTOGRAM_BINS = 2048

# --------------------------------------------------------------------------------------------------------------------
# Quantization math (shared with convert/measure)
# --------------------------------------------------------------------------------------------------------------------


def _weight_scale(weight: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric scale ``max|w| / ((qmax - qmin) / 2)`` (at least ``2**-12``), float32."""
    qmin, qmax = WEIGHT_RANGES[bits]
    w = weight.detach()
    amax = w.abs().amax(dim=tuple(range(1, w.ndim))) if w.ndim > 1 else w.abs()
    return torch.clamp(amax.float() / ((qmax - qmin) / 2), min=ACTIVATION_EPS)


def weight_qparams(weight: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric ``(scale, zero_point)`` of ``weight``, as torchao's ``PerChannelMinMaxObserver``.

    Args:
        weight: A Linear/Conv weight; channel axis 0.
        bits: 8 or 4.

    Returns:
        ``scale`` (float32, one per output channel) and ``zero_point`` (int32 zeros).
    """
    scale = _weight_scale(weight, bits)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def _fast_path(x: Tensor) -> bool:
    """Whether the elementwise-op formulation below is used for ``x`` (float32 on CPU).

    ATen's CPU fake-quantize kernels are scalar loops: on a 128x16x14x14 activation the fused
    ``fake_quantize_per_tensor_affine`` takes ~1.6 ms where the same arithmetic as 5 vectorized elementwise ops takes
    ~0.25 ms; forward plus backward of a QAT step spent 15-20% of its time there. The results are bitwise identical
    (``x * (1 / scale)`` rounded half to even, shifted by the zero point, clamped, scaled back: the kernel's own
    formula; ``tests/engine/test_fake_quant.py`` checks equality, ties and clamped values included). Other devices and
    dtypes keep the fused ATen ops (their kernels are fast, and they store a 1-byte mask for the backward).
    """
    return x.device.type == "cpu" and x.dtype == torch.float32


class _WeightFakeQuant(torch.autograd.Function):
    """``torch.fake_quantize_per_channel_affine`` (zero points 0) with a pure straight-through gradient.

    The ATen op zeroes the gradient of values it clamps. With ``scale = max|w| / 127.5`` the largest positive weight
    of each channel maps to 127.5, rounds to 128 and is clamped to 127, so it would never get a gradient; weights are
    in range by construction, so passing every gradient through is the right estimator.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
        if _fast_path(weight):
            s = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            return weight.mul(torch.reciprocal(s)).round_().clamp_(qmin, qmax).mul_(s)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, qmin, qmax)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


def fake_quantize_weight(weight: Tensor, bits: int = 8) -> Tensor:
    """Round ``weight`` to its per-channel symmetric grid (straight-through gradient). Zeros stay zeros."""
    qmin, qmax = WEIGHT_RANGES[bits]
    out = _WeightFakeQuant.apply(weight, _weight_scale(weight, bits), qmin, qmax)
    assert isinstance(out, Tensor)
    return out


#: Middle and half-width of the uint8 range, for the in-range mask of the input fake quantization.
_ACT_MID = (ACTIVATION_QMAX + ACTIVATION_QMIN) / 2.0
_ACT_HALF = (ACTIVATION_QMAX - ACTIVATION_QMIN) / 2.0


class _InputFakeQuant(torch.autograd.Function):
    """``torch.fake_quantize_per_tensor_affine`` (uint8, tensor qparams) as vectorized ops, for float32 on CPU.

    Forward: ``q = round(x * (1 / scale)) + zero_point``; output ``(clamp(q, 0, 255) - zero_point) * scale``.
    Backward: the ATen op's straight-through estimator, the gradient where ``0 <= q <= 255`` and zero elsewhere. The
    mask is kept as float32 (``clamp(128.5 - |q - 127.5|, 0, 1)``, exactly 1 or 0 because ``q`` is integral): 4
    bytes per element instead of ATen's 1-byte bool, because comparisons producing bools and the bool-times-float
    product are several times slower on CPU than these float ops.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        q = x.mul(torch.reciprocal(scale)).round_().add_(zero_point)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(q.sub(_ACT_MID).abs_().neg_().add_(_ACT_HALF + 1.0).clamp_(0.0, 1.0))
        return q.clamp_(ACTIVATION_QMIN, ACTIVATION_QMAX).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def fake_quantize_input(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """uint8 per-tensor affine fake quantization of ``x``; ``scale``/``zero_point`` of shape ``(1,)``.

    Computes exactly ``torch.fake_quantize_per_tensor_affine(x, scale, zero_point.int(), 0, 255)`` (values and
    gradient), faster on CPU. ``zero_point`` may be float or int32.
    """
    if _fast_path(x):
        out = _InputFakeQuant.apply(x, scale, zero_point.float())
        assert isinstance(out, Tensor)
        return out
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), ACTIVATION_QMIN, ACTIVATION_QMAX)


def _activation_qparams(min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor affine uint8 ``(scale, zero_point)``, the formula of torch/torchao observers (``eps=2**-12``)."""
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((max_pos - min_neg) / float(ACTIVATION_QMAX - ACTIVATION_QMIN), min=ACTIVATION_EPS)
    zero_point = ACTIVATION_QMIN - torch.round(min_neg / scale).to(torch.int32)
    return scale.reshape(1), torch.clamp(zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX).reshape(1)


# --------------------------------------------------------------------------------------------------------------------
# Observer
# --------------------------------------------------------------------------------------------------------------------


def _forgive_missing_buffers(module: nn.Module, prefix: str, missing_keys: list[str]) -> None:
    """Let a float-only state_dict load strictly into a prepared model.

    The fake-quant buffers may be absent from a checkpoint's model state: ``QATCallback`` keeps them in its own
    state so that checkpoints load into the plain model, and a float checkpoint is a fine start for QAT. Missing
    buffers keep their current values (an observer that has not seen data yet).
    """
    own = {prefix + name for name in module._buffers}
    missing_keys[:] = [key for key in missing_keys if key not in own]


class ActivationObserver(nn.Module):
    """Tracks the range of a layer's input while training; all state is in fixed-shape buffers.

    Buffers: ``min_val``/``max_val`` (0-dim; ``+inf``/``-inf`` until the first update), ``initialized`` and
    ``frozen`` (0-dim bool) and, for ``kind="histogram"``, ``histogram`` (2048 counts) with ``hist_min``/``hist_max``.
    A fresh observer of the same kind therefore loads any checkpointed one with ``strict=True``.

    Args:
        kind: ``"minmax"``, ``"moving_average"`` or ``"histogram"``.
        averaging_constant: Weight of the newest batch for ``"moving_average"``.
        percentile: Range kept by ``"histogram"``, in percent.
    """

    min_val: Tensor
    max_val: Tensor
    initialized: Tensor
    frozen: Tensor
    histogram: Tensor
    hist_min: Tensor
    hist_max: Tensor

    def __init__(self, kind: str = "moving_average", averaging_constant: float = 0.01, percentile: float = 99.99):
        super().__init__()
        self.kind = check_choice("activation_observer", kind, ACTIVATION_OBSERVERS)
        self.averaging_constant = float(averaging_constant)
        self.percentile = float(percentile)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("frozen", torch.tensor(False))
        if kind == "histogram":
            self.register_buffer("histogram", torch.zeros(HISTOGRAM_BINS))
            self.register_buffer("hist_min", torch.tensor(0.0))
            self.register_buffer("hist_max", torch.tensor(0.0))
        # Python mirrors of the bool buffers: reading a buffer in forward would synchronize a GPU every call.
        self._initialized = False
        self._frozen = False

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, initialized={self._initialized}, frozen={self._frozen}"

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _forgive_missing_buffers(self, prefix, args[2] if len(args) > 2 else kwargs["missing_keys"])
        self.refresh()

    def refresh(self) -> None:
        """Re-read the Python mirrors from the ``initialized``/``frozen`` buffers (after they were written directly)."""
        self._initialized = bool(self.initialized)
        self._frozen = bool(self.frozen)

    def set_frozen(self, frozen: bool = True) -> None:
        """Stop (or resume) updating the range."""
        self.frozen.fill_(frozen)
        self._frozen = bool(frozen)

    def set_range(self, min_val: float, max_val: float) -> None:
        """Set the range by hand (e.g. from a calibration); marks the observer initialized."""
        self.min_val.fill_(float(min_val))
        self.max_val.fill_(float(max_val))
        self.initialized.fill_(True)
        self._initialized = True

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        """Update the range with ``x`` (the caller decides when: only in training and when not frozen)."""
        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype != torch.float32:
            x = x.float()
        if self.kind == "histogram":
            self._update_histogram(x)
        else:
            batch_min, batch_max = torch.aminmax(x)
            if not self._initialized:
                self.min_val.copy_(batch_min)
                self.max_val.copy_(batch_max)
            elif self.kind == "minmax":
                torch.minimum(self.min_val, batch_min, out=self.min_val)
                torch.maximum(self.max_val, batch_max, out=self.max_val)
            else:
                c = self.averaging_constant
                self.min_val.add_(c * (batch_min - self.min_val))
                self.max_val.add_(c * (batch_max - self.max_val))
        self.initialized.fill_(True)
        self._initialized = True

    def _update_histogram(self, x: Tensor) -> None:
        batch_min, batch_max = torch.aminmax(x)
        if self._initialized:
            new_min = torch.minimum(self.hist_min, batch_min)
            new_max = torch.maximum(self.hist_max, batch_max)
            self.histogram.copy_(_rebin(self.histogram, self.hist_min, self.hist_max, new_min, new_max))
        else:
            new_min, new_max = batch_min, batch_max
            self.histogram.zero_()
        self.hist_min.copy_(new_min)
        self.hist_max.copy_(new_max)
        batch = _histc(x.reshape(-1), new_min, new_max, HISTOGRAM_BINS)
        batch /= x.numel()
        if self._initialized:  # running histogram: exponential moving average of the normalized batch histograms
            self.histogram.mul_(1.0 - self.averaging_constant).add_(batch, alpha=self.averaging_constant)
        else:
            self.histogram.copy_(batch)
        self._range_from_histogram()

    def _range_from_histogram(self) -> None:
        hist = self.histogram
        cdf = torch.cumsum(hist, 0)
        total = cdf[-1].clamp(min=1.0)
        tail = (100.0 - self.percentile) / 100.0
        width = (self.hist_max - self.hist_min) / HISTOGRAM_BINS
        lo = torch.searchsorted(cdf, (total * tail).reshape(1), right=True).clamp(max=HISTOGRAM_BINS - 1)
        hi = torch.searchsorted(cdf, (total * (1.0 - tail)).reshape(1), right=False).clamp(max=HISTOGRAM_BINS - 1)
        self.min_val.copy_((self.hist_min + lo.float() * width).reshape(()))
        self.max_val.copy_(torch.minimum(self.hist_min + (hi.float() + 1.0) * width, self.hist_max).reshape(()))

    def reset_parameters(self) -> None:
        """Forget every range seen (a fresh observer, not frozen).

        Lightning calls it after ``to_empty`` when it materializes a model built on the ``meta`` device (FSDP2,
        ``ModelParallelStrategy``), whose buffers are then uninitialized memory.
        """
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.initialized.fill_(False)
        self.frozen.fill_(False)
        if self.kind == "histogram":
            self.histogram.zero_()
            self.hist_min.zero_()
            self.hist_max.zero_()
        self.refresh()

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` (shape ``(1,)``) of the uint8 per-tensor affine quantization of the input."""
        return _activation_qparams(self.min_val, self.max_val)


def _histc(x: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Histogram of ``x`` over ``[lo, hi]`` with tensor bounds (no host synchronization)."""
    width = torch.clamp((hi - lo) / bins, min=torch.finfo(torch.float32).tiny)
    idx = ((x - lo) / width).long().clamp_(0, bins - 1)
    return torch.zeros(bins, device=x.device).index_add_(0, idx, torch.ones_like(x))


def _rebin(hist: Tensor, old_lo: Tensor, old_hi: Tensor, new_lo: Tensor, new_hi: Tensor) -> Tensor:
    """Move the counts of ``hist`` (over ``[old_lo, old_hi]``) to the same number of bins over ``[new_lo, new_hi]``."""
    bins = hist.numel()
    centers = old_lo + (torch.arange(bins, device=hist.device, dtype=torch.float32) + 0.5) * (old_hi - old_lo) / bins
    width = torch.clamp((new_hi - new_lo) / bins, min=torch.finfo(torch.float32).tiny)
    idx = ((centers - new_lo) / width).long().clamp_(0, bins - 1)
    return torch.zeros_like(hist).index_add_(0, idx, hist)


# --------------------------------------------------------------------------------------------------------------------
# Fake-quant modules
# --------------------------------------------------------------------------------------------------------------------

_ADDED_ATTRIBUTES = ("quant_config", "_fq_enabled", "_lc_warned_float")


class FakeQuantModule(nn.Module):
    """Mixin of the fake-quant Linear/Conv modules. Use ``prepare_qat`` rather than building them directly.

    Attributes:
        quant_config: The ``QuantConfig`` this module simulates.
        fake_quant_enabled: 0-dim bool buffer; when ``False`` the module computes exactly like the float one.
        activation_observer: The input ``ActivationObserver`` (absent when ``quantize_activations=False``).
    """

    quant_config: QuantConfig
    fake_quant_enabled: Tensor
    weight: Tensor
    _fq_enabled: bool
    _float_type: type[nn.Module]

    def _setup_fake_quant(self, config: QuantConfig) -> None:
        self.quant_config = config
        self.register_buffer("fake_quant_enabled", torch.tensor(True, device=self.weight.device))
        self._fq_enabled = True
        if config.quantize_activations:
            observer = ActivationObserver(config.activation_observer, config.averaging_constant, config.percentile)
            self.activation_observer = observer.to(self.weight.device)

    @property
    def observer(self) -> ActivationObserver | None:
        """The input observer, or ``None`` for weight-only fake quantization."""
        obs = self._modules.get("activation_observer")
        return obs if isinstance(obs, ActivationObserver) else None

    @property
    def is_fake_quant_enabled(self) -> bool:
        return self._fq_enabled

    def set_fake_quant_enabled(self, enabled: bool = True) -> None:
        """Turn fake quantization on or off; off means the module computes exactly like the float module."""
        self.fake_quant_enabled.fill_(enabled)
        self._fq_enabled = bool(enabled)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _forgive_missing_buffers(self, prefix, args[2] if len(args) > 2 else kwargs["missing_keys"])
        self._fq_enabled = bool(self.fake_quant_enabled)

    def reset_parameters(self) -> None:
        """The float layer's initialization, and the enable flag rewritten (after ``to_empty`` of a ``meta`` model)."""
        super().reset_parameters()  # type: ignore[misc]
        if "fake_quant_enabled" in self._buffers:
            self.fake_quant_enabled.fill_(self._fq_enabled)

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (straight-through gradient)."""
        return fake_quantize_weight(self.weight, self.quant_config.weight_bits)

    def quantize_input(self, x: Tensor) -> Tensor:
        """Observe ``x`` (when training and not frozen) and return it fake-quantized (once a range exists)."""
        observer = self.observer
        if observer is None:
            return x
        if self.training and not observer.is_frozen:
            observer(x)
        if not observer.is_initialized:
            return x  # no range yet (e.g. a validation run before the first training step): stay float
        scale, zero_point = observer.qparams()
        return fake_quantize_input(x, scale, zero_point)

    def _fq_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self._fq_enabled:
            return x, self.weight
        return self.quantize_input(x), self.quantized_weight()

    def extra_repr(self) -> str:
        cfg = self.quant_config
        return (
            f"{super().extra_repr()}, weight_bits={cfg.weight_bits}, "
            f"quantize_activations={cfg.quantize_activations}, enabled={self._fq_enabled}"
        )


class FakeQuantLinear(FakeQuantModule, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (per channel) and input (per tensor). Shares the original Parameters."""

    _float_type = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        x, w = self._fq_inputs(input)
        return F.linear(x, w, self.bias)


class FakeQuantConv1d(FakeQuantModule, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input. Shares the original Parameters."""

    _float_type = nn.Conv1d

    def forward(self, input: Tensor) -> Tensor:
        x, w = self._fq_inputs(input)
        return self._conv_forward(x, w, self.bias)


class FakeQuantConv2d(FakeQuantModule, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input. Shares the original Parameters."""

    _float_type = nn.Conv2d

    def forward(self, input: Tensor) -> Tensor:
        x, w = self._fq_inputs(input)
        return self._conv_forward(x, w, self.bias)


class FakeQuantConv3d(FakeQuantModule, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight and input. Shares the original Parameters."""

    _float_type = nn.Conv3d

    def forward(self, input: Tensor) -> Tensor:
        x, w = self._fq_inputs(input)
        return self._conv_forward(x, w, self.bias)


_FAKE_QUANT_TYPES: dict[type[nn.Module], type[FakeQuantModule]] = {
    nn.Linear: FakeQuantLinear,
    nn.Conv1d: FakeQuantConv1d,
    nn.Conv2d: FakeQuantConv2d,
    nn.Conv3d: FakeQuantConv3d,
}


_SUBCLASS_TYPES: dict[type[nn.Module], type[FakeQuantModule]] = {}

#: The functional ops of the swapped layer types (``F.conv2d is torch.conv2d``: what a ``TorchFunctionMode`` sees).
_LAYER_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})


class _SimulateOwnCall(TorchFunctionMode):
    """While a subclass's own ``forward`` runs: fake-quantize the input and weight of every ``F.linear``/``F.convNd``
    call made with the module's ``weight``; every other call passes through unchanged."""

    def __init__(self, module: FakeQuantModule) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _LAYER_FUNCTIONS:
            weight = args[1] if len(args) >= 2 else kwargs.get("weight")
            if weight is self.module.weight:
                self.calls += 1
                kwargs.pop("weight", None)
                x = args[0] if args else kwargs.pop("input")
                x, weight = self.module._fq_inputs(x)  # the mode is off inside its own handler: no recursion
                return func(x, weight, *args[2:], **kwargs)
        return func(*args, **kwargs)


def _forward_simulating_own_call(self: FakeQuantModule, *args: Any, **kwargs: Any) -> Any:
    """The subclass's own ``forward``, with its Linear/Conv call on ``self.weight`` fake-quantized."""
    own_forward = self._float_type.forward
    if not self._fq_enabled:
        return own_forward(self, *args, **kwargs)
    with _SimulateOwnCall(self) as mode:
        out = own_forward(self, *args, **kwargs)
    if mode.calls == 0 and not self.__dict__.get("_lc_warned_float"):
        self.__dict__["_lc_warned_float"] = True
        warnings.warn(
            f"{self._float_type.__name__}.forward made no F.linear/F.conv call with the module's own `weight` (it"
            " computes with another tensor), so QAT cannot simulate it: this layer trains in float.",
            UserWarning,
            stacklevel=2,
        )
    return out


def _fake_quant_type(cls: type[nn.Module]) -> type[FakeQuantModule] | None:
    """The fake-quant type for modules of type ``cls``: that of an exact Linear/ConvNd type, or, for a subclass, a
    fake-quant subclass of both (so ``strip_qat`` gives the subclass back) whose ``forward`` is the parent's
    fake-quant one when the subclass keeps the parent's (a marker type of a model zoo), else the subclass's own under
    ``_SimulateOwnCall`` (it may pad or scale around the op). Attention's ``out_proj``
    (``NonDynamicallyQuantizableLinear``, whose ``forward`` is never called) gets ``None``."""
    if cls in _FAKE_QUANT_TYPES:
        return _FAKE_QUANT_TYPES[cls]
    parent = next((p for p in _FAKE_QUANT_TYPES if issubclass(cls, p)), None)
    if parent is None or issubclass(cls, NonDynamicallyQuantizableLinear):
        return None
    if cls not in _SUBCLASS_TYPES:  # one type per subclass
        namespace: dict[str, Any] = {"_float_type": cls}
        if cls.forward is not parent.forward:
            namespace["forward"] = _forward_simulating_own_call
        _SUBCLASS_TYPES[cls] = type(f"FakeQuant{cls.__name__}", (_FAKE_QUANT_TYPES[parent], cls), namespace)
    return _SUBCLASS_TYPES[cls]


def _rebuild(module: nn.Module, new_type: type[nn.Module]) -> nn.Module:
    """A module of ``new_type`` sharing ``module``'s parameters, hooks and attributes (no re-initialization)."""
    new = new_type.__new__(new_type)
    state = dict(module.__dict__)
    # Containers that we add to (or remove from) must not be shared with the old module.
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = type(state[key])(state[key])
    state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])
    new.__dict__.update(state)
    return new


# --------------------------------------------------------------------------------------------------------------------
# Model-level functions
# --------------------------------------------------------------------------------------------------------------------


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantModule]:
    """The fake-quant modules of ``model``, by name (empty if it is not prepared)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantModule)}


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one fake-quant module."""
    return any(isinstance(m, FakeQuantModule) for m in model.modules())


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module shared under several names is replaced everywhere)."""
    for parent in list(model.modules()):
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, FakeQuantModule]:
    """Swap Linear/Conv modules of ``model``, in place, for fake-quant modules sharing their Parameters.

    Idempotent: modules that are already fake-quant are kept as they are (with their observer state) and are
    returned too; calling it twice never double-wraps.

    Args:
        model: The model to prepare (modified in place; its ``forward`` is not touched).
        config: What to simulate; defaults to ``QuantConfig()`` (int8 weights, uint8 inputs, moving-average ranges).
        include: Regular expressions over module names (see ``lightning_compress.engine.selection``); default:
            every ``nn.Linear``/``nn.ConvNd`` and their subclasses (a subclass's own ``forward`` is kept, its layer
            call fake-quantized); ``MultiheadAttention.out_proj`` is never swapped.
        exclude: Regular expressions of module names to keep in float (e.g. the first conv or the classifier).

    Returns:
        The fake-quant modules of the selection, by name.

    Raises:
        ValueError: If a pattern matches no module or nothing is left to quantize (the message lists the names).
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ValueError(f"`config` must be a QuantConfig, got {type(config).__name__}.")
    if isinstance(model, FakeQuantModule):
        raise ValueError("`model` is itself a fake-quant layer; pass the model that contains it.")
    selected = select_modules(model, include, exclude)
    _refuse_sharded(selected)
    prepared: dict[str, FakeQuantModule] = {}
    for name, module in selected.items():
        if isinstance(module, FakeQuantModule):
            prepared[name] = module
            continue
        fq_type = _fake_quant_type(type(module))
        if fq_type is None:
            continue  # attention's out_proj (NonDynamicallyQuantizableLinear): its forward is never called
        new = _rebuild(module, fq_type)
        assert isinstance(new, FakeQuantModule)
        new._setup_fake_quant(config)
        _replace_module(model, module, new)
        prepared[name] = new
    if not prepared:
        names = ", ".join(f"{n} ({type(m).__name__})" for n, m in selected.items())
        raise ValueError(
            f"None of the selected modules can be fake-quantized: only nn.Linear/nn.Conv1d/2d/3d modules and their"
            f" subclasses are swapped (not MultiheadAttention's out_proj). Selected: {names}."
        )
    _set_transformer_fastpath(model, enabled=False)
    return prepared


def _refuse_sharded(selected: Mapping[str, nn.Module]) -> None:
    """A layer already sharded by ``fully_shard`` (FSDP2) cannot be swapped: its class is FSDP's own subclass."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [n for n, m in selected.items() if isinstance(m, FSDPModule) and not isinstance(m, FakeQuantModule)]
    if sharded:
        raise ValueError(
            f"Layers {sharded[:3]} are already sharded with `fully_shard` (FSDP2): `prepare_qat` must swap them first."
            " Call `fully_shard` after it (QATCallback prepares in `setup`, before Lightning's `configure_model`)."
        )


def strip_qat(model: nn.Module) -> nn.Module:
    """Swap every fake-quant module of ``model`` back, in place, to the plain float module (same Parameters).

    Observer buffers disappear, so the state_dict of the result loads with ``strict=True`` into a freshly built
    plain model. To keep the prepared model, strip a ``copy.deepcopy`` of it.

    Returns:
        ``model`` itself.
    """
    if isinstance(model, FakeQuantModule):
        raise ValueError("`model` is itself a fake-quant layer; pass the model that contains it.")
    for module in fake_quant_modules(model).values():
        plain = _rebuild(module, module._float_type)
        plain._buffers.pop("fake_quant_enabled", None)
        plain._modules.pop("activation_observer", None)
        for attr in _ADDED_ATTRIBUTES:
            plain.__dict__.pop(attr, None)
        _replace_module(model, module, plain)
    _set_transformer_fastpath(model, enabled=True)
    return model


def _fastpath_blocker(module: nn.Module, args: Any) -> None:
    """No-op forward pre-hook: its mere presence turns off ``TransformerEncoderLayer``'s fused inference path."""
    return None


def _set_transformer_fastpath(model: nn.Module, enabled: bool) -> None:
    """Disable (or restore) the fused transformer inference paths, which read float weights and skip our forwards."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            hooks = module._forward_pre_hooks
            ours = [k for k, h in hooks.items() if h is _fastpath_blocker]
            if enabled or not is_prepared(module):
                for k in ours:
                    del hooks[k]
            elif not ours:
                module.register_forward_pre_hook(_fastpath_blocker)
        elif isinstance(module, nn.TransformerEncoder):
            if not enabled and is_prepared(module) and getattr(module, "use_nested_tensor", False):
                module.__dict__["_lc_use_nested_tensor"] = True
                module.use_nested_tensor = False
            elif enabled and module.__dict__.pop("_lc_use_nested_tensor", False):
                module.use_nested_tensor = True


def _observers(model: nn.Module) -> Iterator[tuple[str, ActivationObserver]]:
    for name, module in fake_quant_modules(model).items():
        if module.observer is not None:
            yield name, module.observer


def input_observers(model: nn.Module) -> list[tuple[str, ActivationObserver]]:
    """The activation observers of a prepared model, by layer name (collect once, check every step)."""
    return list(_observers(model))


def check_finite_ranges(model: nn.Module | Sequence[tuple[str, ActivationObserver]], step: int | None = None) -> None:
    """Raise if an observed input range is NaN or Inf (a NaN/Inf batch, weight or activation went through).

    Cheap enough for every step: the ranges of all layers are checked with one host synchronization, not a pass
    over the activations.

    Args:
        model: A model prepared by ``prepare_qat``, or its ``input_observers`` (collected once: walking the
            modules every step is Python work the training step does not need).
        step: Where training is, named in the error.

    Raises:
        FloatingPointError: Naming the layers whose range is not finite, and ``step``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> _ = prepare_qat(model)
        >>> _ = model.train()(torch.full((2, 4), float("nan")))
        >>> check_finite_ranges(model, step=3)
        Traceback (most recent call last):
        ...
        FloatingPointError: The input range observed by layer '0' is NaN or Inf at step 3: ...
    """
    pairs = _observers(model) if isinstance(model, nn.Module) else model
    observers = [(name, obs) for name, obs in pairs if obs.is_initialized]
    if not observers:
        return
    finite = torch.isfinite(torch.stack([torch.stack([obs.min_val, obs.max_val]) for _, obs in observers]))
    if bool(finite.all()):
        return
    bad = [name for (name, _), ok in zip(observers, finite.all(dim=1).tolist(), strict=True) if not ok]
    where = f" at step {step}" if step is not None else ""
    raise FloatingPointError(
        f"The input range observed by layer {', '.join(map(repr, bad))} is NaN or Inf{where}: a NaN or Inf value"
        " reached it (a bad batch, or diverging weights: lower the learning rate, clip gradients, check the data)."
    )


def freeze_observers(model: nn.Module, frozen: bool = True) -> None:
    """Stop (``frozen=True``) or resume updating the activation ranges of every fake-quant module.

    The state is the ``activation_observer.frozen`` buffer, so it is saved in checkpoints.
    """
    for _, observer in _observers(model):
        observer.set_frozen(frozen)


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off in every fake-quant module (off: exactly the float computation).

    Observers do not update while disabled. The state is the ``fake_quant_enabled`` buffer (checkpointed).
    """
    for module in fake_quant_modules(model).values():
        module.set_fake_quant_enabled(enabled)


def _keep_bn_in_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of ``freeze_batchnorm_stats``: whatever ``train()`` did, normalize with running stats."""
    module.training = False


def freeze_batchnorm_stats(model: nn.Module, frozen: bool = True) -> list[str]:
    """Make every BatchNorm of ``model`` use (and stop updating) its running statistics, even after ``model.train()``.

    Implemented with a forward pre-hook that puts the BN module back in eval mode before each call; BN parameters
    still train. Nothing is added to the state_dict (so checkpoints keep loading into plain models): after
    restoring a checkpoint, call this again (the QAT callback keeps the flag in its own state). ``frozen=False``
    removes the hooks (the next ``model.train()`` restores training mode).

    Returns:
        The names of the BatchNorm modules affected.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        hooks = module._forward_pre_hooks
        ours = [k for k, h in hooks.items() if h is _keep_bn_in_eval]
        if frozen and not ours:
            module.register_forward_pre_hook(_keep_bn_in_eval)
            module.eval()
        elif not frozen:
            for k in ours:
                del hooks[k]
        names.append(name)
    return names


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The current ``(min, max)`` input range of each fake-quant module whose observer has seen data."""
    return {name: (float(obs.min_val), float(obs.max_val)) for name, obs in _observers(model) if obs.is_initialized}


def activation_qparams(model: nn.Module) -> dict[str, tuple[float, int]]:
    """The uint8 ``(scale, zero_point)`` each fake-quant module applies to its input now, by module name.

    These are the values the fake-quant op uses (and the int8 conversion carries over): the observed range widened
    to include 0, divided into 255 steps (``scale >= 2**-12``). Modules whose observer has seen no data are left
    out.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> _ = prepare_qat(model)
        >>> model[0].observer.set_range(0.5, 3.0)  # a range that excludes 0 is widened to [0, 3]
        >>> scale, zero_point = activation_qparams(model)["0"]
        >>> round(scale * 255, 6), zero_point
        (3.0, 0)
    """
    out = {}
    for name, obs in _observers(model):
        if obs.is_initialized:
            scale, zero_point = obs.qparams()
            out[name] = (float(scale), int(zero_point))
    return out


def weight_scales(model: nn.Module) -> dict[str, Tensor]:
    """The per-output-channel weight scales each fake-quant module uses now (computed from the current weights)."""
    return {
        name: weight_qparams(m.weight, m.quant_config.weight_bits)[0] for name, m in fake_quant_modules(model).items()
    }


def quant_state_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """The keys of a (checkpoint) state_dict that fake quantization added: observer buffers and enable flags.

    Everything else is the float model's state. A callback can move these entries out of the saved model state
    (so the checkpoint loads into a plain model with ``strict=True``) and put them back before a resume.
    """
    return [k for k in state_dict if k.endswith(".fake_quant_enabled") or ".activation_observer." in k]


def quant_config_dict(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``QuantConfig`` of each fake-quant module, as plain dicts (for logging/hparams)."""
    return {name: m.quant_config.to_dict() for name, m in fake_quant_modules(model).items()}


def sync_observers(model: nn.Module, group: Any = None) -> None:
    """Make activation ranges identical on every process of a ``torch.distributed`` job (no-op when not initialized).

    ``min_val`` is all-reduced with MIN and ``max_val`` with MAX (the union of the ranges seen by the ranks); the
    ``"histogram"`` observers are first brought to a common histogram range and their counts summed. Call it on
    every rank at the same point (e.g. before freezing observers or before conversion).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for _, obs in _observers(model):
        flag = obs.initialized.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if obs.kind == "histogram":
            lo = torch.where(obs.initialized, obs.hist_min, torch.full_like(obs.hist_min, float("inf")))
            hi = torch.where(obs.initialized, obs.hist_max, torch.full_like(obs.hist_max, float("-inf")))
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
            if bool(flag):
                local = obs.histogram if obs.is_initialized else torch.zeros_like(obs.histogram)
                hist = _rebin(local, obs.hist_min, obs.hist_max, lo, hi) if obs.is_initialized else local
                dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
                obs.histogram.copy_(hist / hist.sum().clamp(min=1e-12))
                obs.hist_min.copy_(lo)
                obs.hist_max.copy_(hi)
                obs._range_from_histogram()
        else:
            dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX, group=group)
        obs.initialized.fill_(bool(flag))
        obs.refresh()
