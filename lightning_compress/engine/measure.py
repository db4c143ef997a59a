"""Fidelity and speed measurements for quantized models: SQNR, top-1 agreement, latency.

All functions are pure (no logging); the callbacks decide what to log. Timing uses medians of repeated calls,
with ``torch.set_num_threads`` fixed (and restored) so that numbers are comparable between runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_compress.engine.convert import Int8Model, compile_int8, model_size_bytes, save_and_size
from lightning_compress.engine.fake_quant import (
    FakeQuantModule,
    activation_qparams,
    fake_quant_modules,
    fake_quantize_weight,
    set_fake_quant_enabled,
    weight_scales,
)
from lightning_compress.engine.fallback import metric_drop
from lightning_compress.engine.validation import check_positive_int

__all__ = [
    "Evaluation",
    "Int8Report",
    "batched_top1_agreement",
    "compare_latency",
    "latency_report",
    "layers_left_float",
    "measure_int8",
    "measure_latency",
    "num_threads",
    "output_sensitivity",
    "per_layer_sqnr",
    "sqnr_db",
    "top1_agreement",
    "weight_sqnr",
]


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||² / ||ref - test||²)`` in dB.

    Higher is better; ``inf`` when identical. Rule of thumb: int8 per-channel layers give 30-45 dB.

    Raises:
        ValueError: If the shapes differ.
    """
    if reference.shape != test.shape:
        raise ValueError(
            f"`reference` and `test` must have the same shape, got {tuple(reference.shape)} and {tuple(test.shape)}."
        )
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def top1_agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Fraction of rows whose argmax (over the last dimension) is the same in both, in [0, 1]."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"`logits_a` and `logits_b` must have the same shape, got {tuple(logits_a.shape)} and "
            f"{tuple(logits_b.shape)}."
        )
    return (logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean().item()


def _call(model: Callable[..., Any], inputs: Any, kwargs: dict[str, Any] | None = None) -> Any:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return model(*args, **(kwargs or {}))


def _float_forward(module: FakeQuantModule, x: Tensor) -> Tensor:
    """What ``module`` computes without fake quantization: its float type's ``forward`` (a subclass's own, with its
    padding), which calls the layer op on the float weight and input."""
    return module._float_type.forward(module, x)


def per_layer_sqnr(
    float_model: nn.Module | None,
    quant_model: nn.Module,
    inputs: Any,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """SQNR (dB) of the output of each fake-quant layer of ``quant_model``.

    Two views, chosen by ``float_model``:

    * ``float_model=None`` (*local* error): each fake-quant module's output is compared with the float
      computation of the same module on the *same* input (forward hooks), i.e. the error that layer adds.
    * ``float_model`` given (*accumulated* error): the output of each fake-quant module is compared with the
      output of the module of the same name in ``float_model`` (e.g. a float copy), i.e. the error propagated up
      to that layer.

    Both models are run in eval mode under ``torch.no_grad()`` (their previous mode is restored), so observers do
    not move. An int8 ``ExportedProgram`` has no per-layer modules: compare its final outputs with ``sqnr_db``.

    Args:
        float_model: ``None``, or the float model with the same module names.
        quant_model: A model prepared by ``prepare_qat``.
        inputs: Positional input(s) of ``forward`` (a Tensor or a tuple).
        kwargs: Keyword arguments of ``forward``.

    Returns:
        SQNR in dB per fake-quant module name, in model order.
    """
    layers = fake_quant_modules(quant_model)
    if not layers:
        raise ValueError("`quant_model` has no fake-quant layers: prepare it with `prepare_qat` first.")
    results: dict[str, float] = {}
    float_outputs: dict[str, Tensor] = {}

    def local_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            assert isinstance(module, FakeQuantModule)
            results[name] = sqnr_db(_float_forward(module, args[0]), output)

        return hook

    def record_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            float_outputs[name] = output

        return hook

    def compare_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if name in float_outputs:
                results[name] = sqnr_db(float_outputs[name], output)

        return hook

    if float_model is None:
        models = [quant_model]
        hooks = [(m, local_hook(n)) for n, m in layers.items()]
    else:
        reference = dict(float_model.named_modules())
        missing = [n for n in layers if n not in reference]
        if missing:
            raise ValueError(f"`float_model` has no module named {missing}; it must have the same structure.")
        models = [float_model, quant_model]  # the float model runs first and records its outputs
        hooks = [(reference[n], record_hook(n)) for n in layers] + [(m, compare_hook(n)) for n, m in layers.items()]
    modes = [m.training for m in models]
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            for m in models:
                m.eval()
                _call(m, inputs, kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return {n: results[n] for n in layers if n in results}


def _output_tensor(output: Any) -> Tensor:
    """Every floating-point tensor of a model's output (a tensor, tuple, dict or ``ModelOutput``), flat, in one."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError(f"The model's output holds no floating-point tensor, got {type(output).__name__}.")
    return torch.cat([t.detach().reshape(-1).float() for t in leaves])


def output_sensitivity(
    quant_model: nn.Module,
    inputs: Any,
    kwargs: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """SQNR (dB) of the *model's output* with only one layer fake-quantized, for each fake-quant layer.

    Where ``per_layer_sqnr`` measures the error a layer adds at its own output, this measures what that error does
    to the result, after everything downstream has amplified or absorbed it (an early layer's error travels through
    the whole network). The lowest value marks the layer that keeping in float helps most, which is how PTQ's
    accuracy-aware fallback orders its candidates. One forward pass per layer, plus one in float; the observers must
    already hold ranges (calibrate first), and do not move (eval mode, no gradients). The model's fake-quant switches
    and train/eval mode are restored.

    Args:
        quant_model: A model prepared by ``prepare_qat`` and calibrated.
        inputs: Positional input(s) of ``forward`` (a Tensor or a tuple).
        kwargs: Keyword arguments of ``forward``.
        progress: Called with each layer's name before its pass (a progress bar).

    Returns:
        Output SQNR in dB per fake-quant module name, in model order (``inf`` where the layer changes nothing).
    """
    layers = fake_quant_modules(quant_model)
    if not layers:
        raise ValueError("`quant_model` has no fake-quant layers: prepare it with `prepare_qat` first.")
    enabled = {name: layer.is_fake_quant_enabled for name, layer in layers.items()}
    training = quant_model.training
    results: dict[str, float] = {}
    try:
        quant_model.eval()
        with torch.no_grad():
            set_fake_quant_enabled(quant_model, False)
            reference = _output_tensor(_call(quant_model, inputs, kwargs))
            for name, layer in layers.items():
                if progress is not None:
                    progress(name)
                layer.set_fake_quant_enabled(True)
                results[name] = sqnr_db(reference, _output_tensor(_call(quant_model, inputs, kwargs)))
                layer.set_fake_quant_enabled(False)
    finally:
        for name, layer in layers.items():
            layer.set_fake_quant_enabled(enabled[name])
        quant_model.train(training)
    return results


def weight_sqnr(model: nn.Module) -> dict[str, float]:
    """SQNR (dB) of each fake-quant layer's weight against its fake-quantized version (what the int8 model stores)."""
    return {
        name: sqnr_db(m.weight, fake_quantize_weight(m.weight, m.quant_config.weight_bits))
        for name, m in fake_quant_modules(model).items()
    }


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily ``torch.set_num_threads(n)`` (``None``: leave as is); the previous value is restored."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(check_positive_int("num_threads", n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _summary(times_ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "std_ms": statistics.pstdev(times_ms),
        "repeats": float(len(times_ms)),
    }


def _timed(fn: Callable[..., Any], inputs: Any, kwargs: dict[str, Any] | None) -> float:
    start = time.perf_counter()
    _call(fn, inputs, kwargs)
    return (time.perf_counter() - start) * 1000.0


def measure_latency(
    fn: Callable[..., Any],
    inputs: Any,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = 1,
    kwargs: dict[str, Any] | None = None,
    no_grad: bool = True,
) -> dict[str, float]:
    """Time ``fn(*inputs, **kwargs)`` (by default under ``torch.no_grad()``).

    Args:
        fn: A model or any callable (e.g. from ``compile_int8``).
        inputs: Positional input(s) (a Tensor or a tuple).
        warmup: Untimed calls first (compilation, allocator warm-up).
        repeats: Timed calls.
        threads: ``torch.set_num_threads`` during the measurement (restored after); ``None`` leaves it.
        kwargs: Keyword arguments of ``fn``.
        no_grad: Run under ``torch.no_grad()`` (inference); ``False`` to time e.g. a training step.

    Returns:
        ``median_ms``, ``mean_ms``, ``min_ms``, ``max_ms``, ``std_ms`` and ``repeats``.
    """
    check_positive_int("warmup", warmup, allow_zero=True)
    check_positive_int("repeats", repeats)
    with num_threads(threads), torch.set_grad_enabled(not no_grad):
        for _ in range(warmup):
            _call(fn, inputs, kwargs)
        times = [_timed(fn, inputs, kwargs) for _ in range(repeats)]
    return _summary(times)


def compare_latency(
    fn_a: Callable[..., Any],
    fn_b: Callable[..., Any],
    inputs: Any,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = 1,
    kwargs: dict[str, Any] | None = None,
    no_grad: bool = True,
) -> dict[str, Any]:
    """Time two callables on the same inputs, *alternating* a and b so that machine noise hits both alike.

    Arguments are those of ``measure_latency``.

    Returns:
        ``{"a": {...}, "b": {...}, "ratio": median_b / median_a, "speedup": median_a / median_b}`` where ``a``/``b``
        are the summaries of ``measure_latency`` (``speedup > 1`` means b is faster).
    """
    check_positive_int("warmup", warmup, allow_zero=True)
    check_positive_int("repeats", repeats)
    times_a: list[float] = []
    times_b: list[float] = []
    with num_threads(threads), torch.set_grad_enabled(not no_grad):
        for _ in range(warmup):
            _call(fn_a, inputs, kwargs)
            _call(fn_b, inputs, kwargs)
        for _ in range(repeats):
            times_a.append(_timed(fn_a, inputs, kwargs))
            times_b.append(_timed(fn_b, inputs, kwargs))
    a, b = _summary(times_a), _summary(times_b)
    return {"a": a, "b": b, "ratio": b["median_ms"] / a["median_ms"], "speedup": a["median_ms"] / b["median_ms"]}


def batched_top1_agreement(outputs_a: list[Tensor], outputs_b: list[Tensor]) -> float | None:
    """Top-1 agreement of two runs over the same batches (``None`` when the outputs are not class scores)."""
    if not outputs_a or len(outputs_a) != len(outputs_b) or outputs_a[0].dim() < 2:
        return None
    return top1_agreement(torch.cat(outputs_a), torch.cat(outputs_b))


def _with_batch_size(tree: Any, batch_size: int) -> Any:
    """Repeat/trim every tensor along dim 0 to ``batch_size``."""

    def resize(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        reps = -(-batch_size // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size]

    return torch.utils._pytree.tree_map(resize, tree)


def _int8_callable(int8: Any) -> Any:
    """The int8 network of a pt2e ``Int8Model`` (``.module()``) or of an ORT model (the model itself)."""
    return int8.module() if isinstance(int8, Int8Model) else int8


def latency_report(
    float_model: nn.Module,
    int8: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch_sizes: list[int],
    mode: str,
) -> dict[str, float]:
    """Median CPU latency (ms, 1 thread, alternated, after warm-up) of float vs int8 at each batch size.

    ``int8`` is a pt2e ``Int8Model`` or an ONNX Runtime ``OrtInt8Model`` (run by its session in both modes).
    ``mode="compiled"`` compiles the pt2e int8 program with Inductor (where its int8 kernels are; an eager q/dq graph
    is slower than float) and compares the int8 model with both eager and compiled float. ``mode="eager"`` compares
    eager runs. An ONNX Runtime int8 model is also compared with the float model run by ONNX Runtime. Each batch
    size leads with ``speedup_vs_fastest_float/batch_<n>``: the smallest of the speedups against the float runtimes
    measured (the honest headline: an int8 model that only beats eager PyTorch is not faster than float).
    """
    float_model = copy.deepcopy(float_model).eval()
    pt2e = isinstance(int8, Int8Model)
    if mode == "compiled":
        int8_fn: Any = compile_int8(int8, dynamic=False) if pt2e else int8
        float_compiled: Any = torch.compile(float_model, dynamic=False)
    else:
        int8_fn = _int8_callable(int8)
    ort_float = None
    if not pt2e:  # ONNX Runtime runs float too: int8 must beat that, not only eager PyTorch
        from lightning_compress.engine.ort import OrtConversionError, export_onnx

        with contextlib.suppress(OrtConversionError):
            ort_float = export_onnx(float_model, args, example_kwargs=kwargs)
    report: dict[str, float] = {}
    for bs in batch_sizes:
        batch_args, batch_kwargs = _with_batch_size(args, bs), _with_batch_size(kwargs, bs)
        if pt2e and not int8.dynamic_batch and bs != _batch_of(args):
            continue
        result = compare_latency(float_model, int8_fn, batch_args, kwargs=batch_kwargs, warmup=3, repeats=15)
        # The headline first: against the fastest float runtime measured (each pair alternated on its own)
        speedups = [result["speedup"]]
        pairs: dict[str, float] = {
            f"float_ms/batch_{bs}": result["a"]["median_ms"],
            f"int8_ms/batch_{bs}": result["b"]["median_ms"],
            f"speedup/batch_{bs}": result["speedup"],
        }
        if mode == "compiled":
            compiled = compare_latency(float_compiled, int8_fn, batch_args, kwargs=batch_kwargs, warmup=3, repeats=15)
            pairs[f"float_compiled_ms/batch_{bs}"] = compiled["a"]["median_ms"]
            pairs[f"speedup_vs_compiled_float/batch_{bs}"] = compiled["speedup"]
            speedups.append(compiled["speedup"])
        if ort_float is not None:
            ort = compare_latency(ort_float, int8_fn, batch_args, kwargs=batch_kwargs, warmup=3, repeats=15)
            pairs[f"onnxruntime_fp32_ms/batch_{bs}"] = ort["a"]["median_ms"]
            pairs[f"speedup_vs_onnxruntime_fp32/batch_{bs}"] = ort["speedup"]
            speedups.append(ort["speedup"])
        report[f"speedup_vs_fastest_float/batch_{bs}"] = min(speedups)
        report.update(pairs)
    return report


def _batch_of(args: tuple[Any, ...]) -> int:
    for arg in args:
        if isinstance(arg, Tensor) and arg.dim() > 0:
            return int(arg.shape[0])
    return 1


# --------------------------------------------------------------------------------------------------------------------
# One measurement of an int8 model (what the QAT and PTQ callbacks report)
# --------------------------------------------------------------------------------------------------------------------


class Evaluation(NamedTuple):
    """A run of the user's evaluation with one network in place.

    Attributes:
        metrics: The metrics it logged, by name.
        outputs: The network's tensor outputs, one per batch (for top-1 agreement).
    """

    metrics: dict[str, float]
    outputs: list[Tensor]


@dataclass
class Int8Report:
    """What ``measure_int8`` measured about an int8 model and the model it was compared with.

    Attributes:
        float_bytes: Size of the float model's serialized ``state_dict``.
        int8_bytes: Size of the saved int8 artifact.
        saved_to: Where the artifact was saved.
        conversion_seconds: Time the conversion took.
        reference: What the int8 model is compared with: ``"float"`` or ``"fake_quant"`` (the QAT model).
        output_sqnr_db: SQNR (dB) of the int8 outputs against the reference's on the example inputs (``None``: not
            measured).
        layer_sqnr_db: Per-layer SQNR (dB) of the fake-quant simulation, by layer name.
        activation_scales: The uint8 input scale of each fake-quant layer (the one the fake-quant op uses).
        weight_scales: The mean per-channel weight scale of each fake-quant layer.
        monitor: The metric compared (``None``: none).
        reference_metric: ``monitor`` for the reference model.
        int8_metric: ``monitor`` for the int8 model.
        metric_drop: How much worse the int8 model is, in the metric's units (positive = worse).
        top1_agreement: Share of validation rows where both models predict the same class.
        latency_ms: Median CPU latencies and speed-ups by batch size (keys of ``latency_report``).
        int8_layers: Linear/Conv layers that compute with int8 weights, counted from the artifact itself (``None``:
            not counted).
        float_layers: Selected Linear/Conv modules that stayed float in the artifact, with the likely reason.
    """

    float_bytes: int
    int8_bytes: int
    saved_to: str = ""
    conversion_seconds: float = 0.0
    reference: str = "float"
    output_sqnr_db: float | None = None
    layer_sqnr_db: dict[str, float] = field(default_factory=dict)
    activation_scales: dict[str, float] = field(default_factory=dict)
    weight_scales: dict[str, float] = field(default_factory=dict)
    monitor: str | None = None
    reference_metric: float | None = None
    int8_metric: float | None = None
    metric_drop: float | None = None
    top1_agreement: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    int8_layers: int | None = None
    float_layers: dict[str, str] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        """``int8_bytes / float_bytes``."""
        return self.int8_bytes / self.float_bytes

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """The report as flat scalars, e.g. ``{"int8_bytes": ..., "sqnr/fc1": ..., "int8_val_acc": ...}``.

        Args:
            prefix: Put in front of every key (e.g. ``"compress/quant/"``).

        Examples:
            >>> report = Int8Report(float_bytes=400, int8_bytes=100, layer_sqnr_db={"fc": 35.0})
            >>> report.to_metrics()
            {'float_bytes': 400.0, 'int8_bytes': 100.0, 'size_ratio': 0.25, 'conversion_seconds': 0.0, 'sqnr/fc': 35.0}
        """
        out: dict[str, float] = {
            "float_bytes": float(self.float_bytes),
            "int8_bytes": float(self.int8_bytes),
            "size_ratio": self.size_ratio,
            "conversion_seconds": self.conversion_seconds,
        }
        if self.int8_layers is not None:
            out["int8_layers"] = float(self.int8_layers)
        if self.output_sqnr_db is not None:
            out[f"int8_vs_{self.reference}_sqnr_db"] = self.output_sqnr_db
        out.update({f"sqnr/{name}": value for name, value in self.layer_sqnr_db.items()})
        out.update({f"activation_scale/{name}": value for name, value in self.activation_scales.items()})
        out.update({f"weight_scale/{name}": value for name, value in self.weight_scales.items()})
        if self.monitor is not None and self.reference_metric is not None and self.int8_metric is not None:
            out[f"{self.reference}_{self.monitor}"] = self.reference_metric
            out[f"int8_{self.monitor}"] = self.int8_metric
            if self.metric_drop is not None:
                out[f"{self.monitor}_drop"] = self.metric_drop
        if self.top1_agreement is not None:
            out["top1_agreement"] = self.top1_agreement
        out.update(self.latency_ms)
        return {f"{prefix}{key}": value for key, value in out.items()}


_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _ort_layer_scopes(int8: Any) -> tuple[list[str], list[str]]:
    """The node-name scopes (``"/net/fc1/"``) of the ONNX layers with a weight: those that compute with int8 weights,
    and all of them (a module with no layer node in the graph computed nothing that was used)."""
    from lightning_compress.engine.ort import _INT8_OPS, _LAYER_OPS, _as_proto

    graph = _as_proto(int8.onnx_bytes).graph
    initializers = {i.name: i.data_type for i in graph.initializer}
    int8_dq = {
        n.output[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and initializers.get(n.input[0]) in (2, 3)  # UINT8, INT8
    }
    weighted = [
        node
        for node in graph.node
        if node.op_type in _INT8_OPS
        or (
            node.op_type in _LAYER_OPS
            and len(node.input) > 1
            and (node.input[1] in int8_dq or node.input[1] in initializers)
        )
    ]
    scope = [node.name.rsplit("/", 1)[0] + "/" for node in weighted]
    quantized = [
        s for s, node in zip(scope, weighted, strict=True) if node.op_type in _INT8_OPS or node.input[1] in int8_dq
    ]
    return quantized, scope


def _in_scope(name: str, scope: list[str]) -> bool:
    """Whether an ONNX node scope (``["net", "layers.0", "linear1"]``) is that of module ``name``.

    The TorchScript exporter names a scope after each *called* module, unqualified (``torch.onnx.utils``' rule): a
    ``ModuleList`` that is only iterated has none, so the scope is a subsequence of the module's ancestors' names,
    ending with its own, and holding every indexed one (``layers.0``) that tells repeated blocks apart.
    """
    from lightning_compress.engine.ort import _unqualified

    atoms = f"net.{name}".split(".")  # the network is the `net` attribute of the exported wrapper (ort._Call)
    lineage = [_unqualified(".".join(atoms[: i + 1])) for i in range(len(atoms))]
    if not scope or scope[-1] != lineage[-1] or not {x for x in lineage if "." in x} <= set(scope):
        return False
    found = iter(lineage)
    return all(part in found for part in scope if part in lineage)


def layers_left_float(int8: Any, float_model: nn.Module) -> dict[str, str]:
    """The Linear/Conv modules of ``float_model`` that the conversion was to quantize but that stayed float in the
    int8 artifact, each with the likely reason.

    "To quantize": every ``nn.Linear``/``nn.ConvNd`` (subclasses included) that the graph uses, outside the modules
    the conversion kept in float on purpose (``Int8Model.skipped``, ``OrtInt8Model.float_layers``) and outside
    ``nn.MultiheadAttention`` (computed in float by both backends; docs/limits.md). For ONNX Runtime's dynamic mode
    only Linear layers count (it quantizes MatMul/Gemm only). "Int8": read from the artifact (``quantized_layers`` of
    the program; the ONNX graph's int8 layers, matched to modules by their node scopes).

    Args:
        int8: A pt2e ``Int8Model`` or an ``OrtInt8Model``.
        float_model: The float network it was converted from (module names as in the conversion).

    Returns:
        ``{module name: reason}``, in definition order; empty when every selected layer is int8.
    """
    pt2e = isinstance(int8, Int8Model)
    kept = tuple(int8.skipped if pt2e else getattr(int8, "float_layers", ()))
    types = (nn.Linear,) if not pt2e and getattr(int8, "mode", "") == "dynamic" else _LAYER_TYPES
    attention = [n for n, m in float_model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    outside = [*kept, *attention]
    # names as in the converted graph: the conversion exports a copy without `torch.compile` wrappers
    modules = {name.replace("_orig_mod.", ""): module for name, module in float_model.named_modules()}
    outside = [k.replace("_orig_mod.", "") for k in outside if k]
    selected = {
        name: module
        for name, module in modules.items()
        if name and isinstance(module, types) and not any(name == k or name.startswith(f"{k}.") for k in outside)
    }
    if pt2e:
        selected = {name: module for name, module in selected.items() if name not in int8.unused}
        done = set(int8.quantized_layers)
        quantized = {name for name in selected if name in done}
    else:
        int8_scopes, all_scopes = ([s.strip("/").split("/") for s in group] for group in _ort_layer_scopes(int8))
        quantized = {name for name in selected if any(_in_scope(name, scope) for scope in int8_scopes)}
        used = {name for name in selected if any(_in_scope(name, scope) for scope in all_scopes)}
        selected = {name: module for name, module in selected.items() if name in used}
    left: dict[str, str] = {}
    for name, module in selected.items():
        if name in quantized:
            continue
        parent = next((t for t in _LAYER_TYPES if isinstance(module, t)), nn.Module)
        if type(module) is not parent:
            left[name] = (
                f"{type(module).__name__}, a subclass of nn.{parent.__name__}: the quantizer's patterns match "
                f"nn.{parent.__name__} itself"
            )
        else:
            left[name] = f"{type(module).__name__}: no int8 pattern matched its op (or its output is unused)"
    return left


def _check_int8_result(report: Int8Report, float_model: nn.Module) -> None:
    """Warn when selected layers stayed float, and when the artifact is not smaller than the fp32 model."""
    if report.float_layers:
        listed = "; ".join(f"`{n}` ({why})" for n, why in report.float_layers.items())
        warnings.warn(
            f"int8 conversion: {report.int8_layers} layer(s) of the artifact are int8, but {len(report.float_layers)} "
            "Linear/Conv layer(s) selected for int8 stayed float: " + listed + ".",
            stacklevel=3,
        )
    if report.int8_bytes >= report.float_bytes:
        reasons = []
        if report.float_layers:
            reasons.append(f"{len(report.float_layers)} selected layer(s) stayed float (above)")
        if not report.int8_layers:
            reasons.append("no layer of the artifact is int8")
        embeddings = sum(m.weight.numel() for m in float_model.modules() if isinstance(m, nn.Embedding))
        total = sum(p.numel() for p in float_model.parameters()) or 1
        if embeddings / total > 0.2:
            reasons.append(f"embedding tables ({embeddings / total:.0%} of the parameters) are float")
        reasons.append("the artifact also stores the graph and its metadata, which dominate for small models")
        warnings.warn(
            f"The int8 artifact ({report.int8_bytes:,} bytes) is not smaller than the fp32 state_dict "
            f"({report.float_bytes:,} bytes, {report.size_ratio:.2f}x). Likely: {'; '.join(reasons)}.",
            stacklevel=3,
        )


def measure_int8(
    int8: Any,
    float_model: nn.Module,
    path: str | os.PathLike[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    fake_quant_model: nn.Module | None = None,
    layer_sqnr: Mapping[str, float] | None = None,
    monitor: str | None = None,
    reference_evaluation: Evaluation | None = None,
    int8_evaluation: Evaluation | None = None,
    higher_is_better: bool = True,
    latency: str = "off",
    batch_sizes: Sequence[int] = (),
) -> Int8Report:
    """Save the int8 artifact and measure it against its reference: sizes, SQNR, scales, metric, agreement, latency.

    The reference is the fake-quant model when ``fake_quant_model`` is given (QAT), else the float model (PTQ).

    Args:
        int8: The converted model: a pt2e ``Int8Model`` (saved as a compressed ``.pt2``) or an ONNX Runtime
            ``OrtInt8Model`` (saved as ``.onnx``).
        float_model: The float model (its ``state_dict`` size; timed against the int8 model).
        path: Where to save the artifact (``save_int8``, or
            ``OrtInt8Model.save``), atomically.
        args: Positional example inputs (output SQNR, latency).
        kwargs: Keyword example inputs.
        fake_quant_model: A model prepared by ``prepare_qat``, in eval
            mode: output SQNR of the int8 model against it, its per-layer SQNR and its activation/weight scales.
        layer_sqnr: Per-layer SQNR measured by the caller (used when ``fake_quant_model`` is not given).
        monitor: The name of the compared metric, looked up in both evaluations.
        reference_evaluation: The reference model's run of the user's evaluation.
        int8_evaluation: The int8 model's run of the same evaluation.
        higher_is_better: The direction of ``monitor`` (the sign of the drop).
        latency: ``"compiled"``, ``"eager"`` or ``"off"`` (see ``latency_report``).
        batch_sizes: Batch sizes to time.

    Returns:
        An ``Int8Report``.
    """
    if isinstance(int8, Int8Model):
        sizes = save_and_size(int8, float_model, Path(path))
    else:
        sizes = {"int8_bytes": float(int8.save(path)), "float_bytes": float(model_size_bytes(float_model))}
    int8_net = _int8_callable(int8)
    report = Int8Report(
        float_bytes=int(sizes["float_bytes"]),
        int8_bytes=int(sizes["int8_bytes"]),
        saved_to=str(path),
        conversion_seconds=int8.timings.get("total", 0.0),
        reference="fake_quant" if fake_quant_model is not None else "float",
        layer_sqnr_db=dict(layer_sqnr or {}),
        monitor=monitor,
        int8_layers=int(int8.num_quantized_layers),
        float_layers=layers_left_float(int8, float_model),
    )
    _check_int8_result(report, float_model)
    if fake_quant_model is not None:
        was_training = fake_quant_model.training
        try:
            with torch.no_grad():
                fake_quant_model.eval()  # observers move in training mode only
                reference_out, int8_out = fake_quant_model(*args, **kwargs), int8_net(*args, **kwargs)
        finally:
            fake_quant_model.train(was_training)
        if isinstance(reference_out, Tensor) and isinstance(int8_out, Tensor):
            report.output_sqnr_db = sqnr_db(reference_out.cpu(), int8_out.cpu())
        report.layer_sqnr_db = per_layer_sqnr(None, fake_quant_model, args, kwargs)
        report.activation_scales = {name: scale for name, (scale, _) in activation_qparams(fake_quant_model).items()}
        report.weight_scales = {name: float(s.mean()) for name, s in weight_scales(fake_quant_model).items()}
    if reference_evaluation is not None and int8_evaluation is not None:
        if monitor is not None:
            report.reference_metric = reference_evaluation.metrics.get(monitor)
            report.int8_metric = int8_evaluation.metrics.get(monitor)
            if report.reference_metric is not None and report.int8_metric is not None:
                report.metric_drop = metric_drop(report.reference_metric, report.int8_metric, higher_is_better)
        report.top1_agreement = batched_top1_agreement(reference_evaluation.outputs, int8_evaluation.outputs)
    if latency != "off":
        report.latency_ms = latency_report(float_model, int8, args, kwargs, list(batch_sizes), latency)
    return report
