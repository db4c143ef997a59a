"""A real int8 model, built from a *copy* of a float or fake-quant model, through torchao's pt2e flow.

``torch.export`` (dynamic batch) → ``prepare_pt2e`` with ``X86InductorQuantizer`` → calibration → ``convert_pt2e``
→ unused float tensors dropped → ``torch.export`` again, so the result is a ``torch.export.ExportedProgram`` that
:func:`save_int8` / :func:`load_int8` store with ``torch.export.save`` / ``torch.export.load``.

The input model is never modified. When it was prepared by :func:`~lightning_compress.engine.fake_quant.prepare_qat`,
the conversion starts from a stripped float copy, reuses the input ranges learned by the fake-quant observers
(instead of re-calibrating them) and keeps in float what QAT kept in float, so the int8 model computes what the
fake-quant model simulated.

The converted program holds quantize/dequantize ops around float kernels: run eagerly (``program.module()``) it is
correct but 1.5-6x *slower* than fp32; :func:`compile_int8` lowers it with Inductor (``freezing=True``) to the real
int8 kernels. torchao is imported lazily (only when converting).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import itertools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_compress.engine.config import DEFAULT_PERCENTILE, ConversionConfig
from lightning_compress.engine.fake_quant import (
    ACTIVATION_EPS,
    activation_ranges,
    fake_quant_modules,
    fake_quantize_weight,
    is_prepared,
    strip_qat,
    weight_qparams,
)

__all__ = [
    "Int8ConversionError",
    "Int8Embedding",
    "Int8Model",
    "ModelCall",
    "QuantizedModule",
    "check_exportable",
    "compile_int8",
    "convert_to_int8",
    "int8_weights",
    "load_int8",
    "load_quantized",
    "model_size_bytes",
    "save_int8",
]

_QUANTIZED_OPS = {
    "aten.linear.default",
    "aten.conv1d.default",
    "aten.conv2d.default",
    "aten.conv3d.default",
    "aten.conv1d.padding",
    "aten.conv2d.padding",
    "aten.conv3d.padding",
}

_EXPORT_HINT = (
    "The int8 conversion needs a model that torch.export can capture as one graph. Common fixes: replace Python "
    "control flow on tensor *values* (`if x.sum() > 0:`, `.item()`, `.tolist()`) with tensor ops or `torch.cond`; "
    "make sure `example_inputs`/`example_kwargs` are exactly what `forward` takes (in Lightning, set "
    "`example_input_array`); avoid ops export cannot trace (NumPy calls, data-dependent shapes); or keep the "
    "offending submodule out of the exported model."
)


class Int8ConversionError(RuntimeError):
    """The model could not be converted; the message says why and what to change."""


@dataclass
class Int8Model:
    """The result of :func:`convert_to_int8`.

    Attributes:
        program: The int8 ``ExportedProgram`` (save it with :func:`save_int8`, run it with ``program.module()`` or
            :func:`compile_int8`).
        mode: ``"static"``, ``"dynamic"`` or ``"weight_only"``.
        dynamic_batch: Whether the program accepts any batch size (else only the example's shapes).
        skipped: Module names kept in float.
        carried_ranges: Input ranges taken over from fake-quant observers, by module name.
        calibration_batches: Batches run through the observers (0 when all ranges were carried or not needed).
        timings: Seconds spent per phase (``export``, ``prepare``, ``calibrate``, ``convert``, ``reexport``,
            ``total``).
        notes: Things the caller may want to log (fallbacks, what was skipped and why).
    """

    program: torch.export.ExportedProgram
    mode: str
    dynamic_batch: bool
    skipped: tuple[str, ...] = ()
    carried_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    calibration_batches: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    signature: tuple[ArgSpec, ...] | None = None

    def module(self) -> QuantizedModule:
        """The program as an eager :class:`QuantizedModule`, called like the float network (slow q/dq reference
        computation; see :func:`compile_int8`)."""
        return QuantizedModule(self.program, self.signature)

    def size_bytes(self) -> int:
        """Size of the saved artifact, in bytes."""
        return model_size_bytes(self.program)


# --------------------------------------------------------------------------------------------------------------------
# The int8 program called like the network it came from
# --------------------------------------------------------------------------------------------------------------------

#: Name of the artifact member that stores the call signature of the converted network.
SIGNATURE_FILE = "lightning_compress/signature.json"
_DEFAULT_TYPES = (type(None), bool, int, float, str)


class ArgSpec(NamedTuple):
    """One parameter of the converted network's ``forward``, as stored with the int8 artifact.

    Attributes:
        name: The parameter name.
        keyword_only: Whether it can only be passed by keyword.
        has_default: Whether it has a default that could be stored (``None``, a bool, number or string).
        default: That default (``None`` when there is none).
    """

    name: str
    keyword_only: bool = False
    has_default: bool = False
    default: Any = None


def call_signature(model: nn.Module) -> tuple[ArgSpec, ...] | None:
    """The parameters of ``model.forward`` (``None`` when it takes ``*args``/``**kwargs``: calls pass through)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    specs = []
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return None
        storable = p.default is not p.empty and isinstance(p.default, _DEFAULT_TYPES)
        specs.append(ArgSpec(p.name, p.kind == p.KEYWORD_ONLY, storable, p.default if storable else None))
    return tuple(specs)


def _in_structure(program: torch.export.ExportedProgram) -> tuple[int, tuple[str, ...]]:
    """How many positional arguments, and which keyword arguments, the program was exported with."""
    spec = program.call_spec.in_spec
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    args_spec, kwargs_spec = children
    return int(args_spec.num_children), tuple(kwargs_spec.context or ())


class QuantizedModule(nn.Module):
    """An int8 ``ExportedProgram`` as an ``nn.Module`` called exactly like the network it was converted from.

    ``program.module()`` only accepts the call structure of the export example (the same arguments positional, the
    same ones by keyword); this module binds any call of the original ``forward`` signature (positional or keyword,
    defaults filled in) to that structure. Arguments that were constants at export time (e.g. ``scale=2.0``) must
    keep their exported value. ``train()``/``eval()`` only set the flag: the int8 graph always computes inference.

    Args:
        program: The int8 program (from :func:`convert_to_int8` or :func:`load_int8`).
        signature: The parameters of the original ``forward`` (:func:`call_signature`); ``None``: calls are passed
            to the program as they are.

    Attributes:
        program: The ``ExportedProgram``.
        graph: ``program.module()``, the eager q/dq graph.
    """

    graph: nn.Module

    def __init__(self, program: torch.export.ExportedProgram, signature: Sequence[ArgSpec] | None = None) -> None:
        super().__init__()
        self.program = program
        self.graph = program.module()
        self.signature = None if signature is None else tuple(ArgSpec(*spec) for spec in signature)
        self._positional, self._keywords = _in_structure(program)
        self.training = False

    def train(self, mode: bool = True) -> QuantizedModule:
        """Set the ``training`` flag only (the exported graph has no train mode)."""
        self.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call_args, call_kwargs = self._bind(args, kwargs)
        return self.graph(*call_args, **call_kwargs)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.signature is None:
            return args, kwargs
        specs = {spec.name: spec for spec in self.signature}
        positional = [spec.name for spec in self.signature if not spec.keyword_only]
        if len(args) > len(positional):
            raise TypeError(f"forward() takes {len(positional)} positional arguments but {len(args)} were given.")
        given = dict(zip(positional, args, strict=False))
        for name, value in kwargs.items():
            if name not in specs:
                raise TypeError(f"forward() got an unexpected keyword argument {name!r}.")
            if name in given:
                raise TypeError(f"forward() got multiple values for argument {name!r}.")
            given[name] = value

        def take(name: str) -> Any:
            if name in given:
                return given.pop(name)
            spec = specs.get(name)
            if spec is None or not spec.has_default:
                raise TypeError(f"forward() is missing the argument {name!r} (the int8 program was exported with it).")
            return spec.default

        call_args = tuple(take(name) for name in positional[: self._positional])
        call_kwargs = {name: take(name) for name in self._keywords}
        for name, value in given.items():  # passed now, absent from the export example: only its default works
            spec = specs[name]
            if not (spec.has_default and type(value) is type(spec.default) and value == spec.default):
                raise TypeError(
                    f"The int8 program was exported without the argument {name!r}; it can only take its default "
                    f"({spec.default!r}), got {value!r}. Convert with an example call that passes it."
                )
        return call_args, call_kwargs


# --------------------------------------------------------------------------------------------------------------------
# Export helpers
# --------------------------------------------------------------------------------------------------------------------


def _batch_dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``dynamic_shapes`` marking dim 0 of every tensor input (of size >= 2) as ``Dim.AUTO``, keyed by argument."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] >= 2:
            return {0: torch.export.Dim.AUTO}
        return None

    return {name: tree_map(spec, value) for name, value in bound.arguments.items()}


def _has_dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    """Whether dim 0 of the first user tensor input stayed symbolic."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, Tensor) and val.ndim >= 1:
                dim = val.shape[0]
                return isinstance(dim, torch.SymInt) and not bool(getattr(dim.node.expr, "is_number", True))
    return False


def _first_lines(err: BaseException, n: int = 3) -> str:
    """The first ``n`` lines of an error, plus the user code it points at (torch.export names it)."""
    lines = [line.rstrip() for line in str(err).strip().splitlines() if line.strip()]
    shown = lines[:n]
    marker = "The following call raised this error:"
    if marker in lines[n:]:
        i = lines.index(marker)
        shown += ["...", *lines[i : i + 3]]
    elif len(lines) > n:
        shown.append("...")
    return f"{type(err).__name__}: " + "\n    ".join(shown)


def _export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    notes: list[str],
) -> tuple[torch.export.ExportedProgram, Any]:
    """Export with a dynamic batch when asked and possible, else with static shapes (noted). Raises clearly."""
    dynamic_shapes = None
    if dynamic_batch:
        try:
            dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs)
        except TypeError as err:
            raise Int8ConversionError(
                f"`example_inputs`/`example_kwargs` do not match `{type(model).__name__}.forward`: {err}."
            ) from err
    if dynamic_shapes is not None:
        try:
            with _no_causal_mask_detection():
                program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
            if _has_dynamic_batch(program):
                return program, dynamic_shapes
            notes.append(
                "The batch dimension was specialized during export (an example batch of 1, or the model's code "
                "depends on the batch size): the int8 program only accepts the example's shapes."
            )
            return program, None
        except Exception as err:
            if "data-dependent" in str(err) or "DataDependent" in type(err).__name__:
                raise Int8ConversionError(
                    f"torch.export could not capture `{type(model).__name__}`:\n    {_first_lines(err)}\n{_EXPORT_HINT}"
                ) from err
            dynamic_error = err  # retried with static shapes, reported if that fails too
    else:
        dynamic_error = None
    try:
        with _no_causal_mask_detection():
            program = torch.export.export(model, args, kwargs)
    except Exception as err:
        raise Int8ConversionError(
            f"torch.export could not capture `{type(model).__name__}`:\n    {_first_lines(err)}\n{_EXPORT_HINT}"
        ) from err
    if dynamic_error is not None:
        notes.append(
            "The model could not be exported with a dynamic batch, so the int8 program only accepts the example's "
            f"shapes. Export said: {_first_lines(dynamic_error, 2)}"
        )
    return program, None


@contextlib.contextmanager
def _no_causal_mask_detection() -> Iterator[None]:
    """Let ``torch.export`` capture ``nn.Transformer*`` layers that are given an explicit attention mask.

    Their ``forward`` compares the mask with a causal one (``bool((mask == causal).all())``) only to choose a fast
    kernel (``is_causal`` is a hint: the mask itself is still applied). That comparison is control flow on tensor
    values, which export cannot trace; while exporting, the hint is taken as given (``None`` → ``False``), so the
    captured graph applies the mask as is and computes the same outputs.
    """
    import torch.nn.modules.transformer as transformer

    original = transformer._detect_is_causal_mask

    def as_given(mask: Tensor | None, is_causal: bool | None = None, size: int | None = None) -> bool:
        return bool(is_causal)

    transformer._detect_is_causal_mask = as_given
    try:
        yield
    finally:
        transformer._detect_is_causal_mask = original


def _module_path(node: torch.fx.Node) -> str | None:
    """Name of the innermost module a graph node comes from (``None`` for the top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len("L['self'].") :] if path.startswith("L['self'].") else path


def _drop_unused_tensors(gm: torch.fx.GraphModule) -> list[str]:
    """Delete parameters/buffers that no ``get_attr`` node reads (the float weights replaced by int8 constants)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = []
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
        dropped.append(name)
    gm.delete_all_unused_submodules()
    return dropped


# --------------------------------------------------------------------------------------------------------------------
# Calibration helpers
# --------------------------------------------------------------------------------------------------------------------


class ModelCall(NamedTuple):
    """One calibration item with both positional and keyword arguments: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _as_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A calibration item (a Tensor, a tuple/list of positional arguments, a dict of keywords or a
    :class:`ModelCall`) as (args, kwargs)."""
    if isinstance(batch, ModelCall):
        return tuple(batch.args), dict(batch.kwargs)
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    raise Int8ConversionError(
        "Each item of `calibration_data` must be the model's input: a Tensor, a tuple of positional arguments, a "
        f"dict of keyword arguments or a ModelCall(args, kwargs), got {type(batch).__name__}."
    )


def _import_torchao() -> None:
    """Import the torchao pt2e modules once, hiding the DeprecationWarnings torch's own mkldnn module emits then."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torchao.quantization.pt2e.quantize_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def _to_cpu(tree: Any) -> Any:
    return tree_map(lambda v: v.cpu() if isinstance(v, Tensor) else v, tree)


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


def _quantizer(mode: str, skip: Sequence[str], observer: str, percentile: float) -> Any:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.quantizer import QuantizationConfig

    if mode == "static":
        config = xiq.get_default_x86_inductor_quantization_config()
        if observer != "histogram_l2":  # the default config's activation observer is torchao's histogram one
            if observer == "histogram":
                ctr = _percentile_observer_type().with_args(eps=ACTIVATION_EPS, percentile=percentile)
            else:
                kind = obs.MinMaxObserver if observer == "minmax" else obs.MovingAverageMinMaxObserver
                ctr = kind.with_args(eps=ACTIVATION_EPS)
            act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=ctr)
            config = QuantizationConfig(act, act, config.weight, config.bias, config.is_qat)
    elif mode == "dynamic":
        config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=True)
    else:
        base = xiq.get_default_x86_inductor_quantization_config()
        config = QuantizationConfig(None, None, base.weight, None, False)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(config)
    for name in skip:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` whose table is stored as int8 with one scale per row; looked-up rows are dequantized."""

    qweight: Tensor
    scale: Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        weight = embedding.weight.detach().float()
        scale, _ = weight_qparams(weight, 8)
        self.register_buffer("qweight", torch.clamp(torch.round(weight / scale[:, None]), -128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.embedding_dim = embedding.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


def _quantize_embeddings(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """Swap the plain ``nn.Embedding`` modules of ``model`` (not inside a ``skip`` name) for :class:`Int8Embedding`."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Embedding or module.max_norm is not None:
            continue  # ``max_norm`` renormalizes the float table in place on lookup: keep those float
        if any(name == s or name.startswith(f"{s}.") for s in skip):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Embedding(module))
        names.append(name)
    return names


def _float_islands(model: nn.Module) -> list[str]:
    """What a fake-quant model computes in float: Linear/Conv modules not swapped, and attention blocks."""
    prepared = fake_quant_modules(model)
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or name in prepared or not isinstance(module, layer_types):
            continue
        if any(name.startswith(f"{kept}.") for kept in names):
            continue  # already covered by an enclosing attention block
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def convert_to_int8(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | Tensor,
    example_kwargs: dict[str, Any] | None = None,
    calibration_data: Iterable[Any] | None = None,
    skip: Sequence[str] = (),
    config: ConversionConfig | None = None,
    **settings: Any,
) -> Int8Model:
    """Build an int8 ``ExportedProgram`` from a copy of ``model`` (which is left untouched).

    Args:
        model: A float model, or one prepared with :func:`~lightning_compress.engine.fake_quant.prepare_qat`. For a
            prepared model the conversion: starts from a stripped float copy; reuses the learned input ranges of
            the fake-quant modules (when their observers have seen data and fake quantization is enabled); bakes
            4-bit weights onto their grid; and keeps in float the Linear/Conv modules and attention blocks that QAT
            kept in float.
        example_inputs: Positional arguments of ``forward`` (a single Tensor is accepted too). Use a batch of at
            least 2 so the batch dimension can stay dynamic.
        example_kwargs: Keyword arguments of ``forward``.
        calibration_data: For ``"static"``: an iterable of model inputs (a Tensor, a tuple of positional
            arguments, a dict of keyword arguments or a :class:`ModelCall` with both, per item) used to calibrate
            the activation ranges not taken over from fake-quant observers (at most ``calibration_batches`` items).
            When ``None``, ``example_inputs`` is the only calibration batch (noted).
        skip: Module names kept in float (with everything inside them), e.g. for accuracy-aware fallback.
        config: How to convert (mode, observer, percentile, calibration batches, embeddings, dynamic batch); see
            :class:`~lightning_compress.engine.config.ConversionConfig`. Default: ``ConversionConfig()`` (static).
        **settings: Fields of :class:`~lightning_compress.engine.config.ConversionConfig` that replace those of
            ``config``, e.g. ``mode="dynamic"`` or ``observer="minmax"``.

    Returns:
        An :class:`Int8Model` with the ``program`` and what happened (timings, notes, carried ranges).

    Raises:
        ValueError: On a bad ``mode``, an unknown ``skip`` name or a bad ``example_inputs``.
        Int8ConversionError: If torch.export cannot capture the model (the message quotes the export error and says
            what to change), or the pt2e conversion fails.
    """
    config = ConversionConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    mode = config.mode
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise ValueError(
            f"`example_inputs` must be a tuple of positional arguments (or one Tensor), got "
            f"{type(example_inputs).__name__}."
        )
    kwargs = dict(example_kwargs or {})
    if isinstance(skip, str):
        skip = [skip]
    modules = dict(model.named_modules())
    unknown = [s for s in skip if s not in modules]
    if unknown:
        names = [n for n, m in modules.items() if n and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        raise ValueError(f"`skip` names no module: {unknown}. Linear/Conv module names: {', '.join(names)}.")

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    skip_all = list(dict.fromkeys(skip))
    ranges: dict[str, tuple[float, float]] = {}

    float_model = copy.deepcopy(model).cpu()  # the int8 kernels are x86 CPU ones
    args: tuple[Any, ...] = _to_cpu(example_inputs)
    kwargs = _to_cpu(kwargs)
    if is_prepared(model):
        fq = fake_quant_modules(model)
        enabled = {n for n, m in fq.items() if m.is_fake_quant_enabled}
        ranges = {n: r for n, r in activation_ranges(model).items() if n in enabled}
        if mode == "static" and not any(m.quant_config.quantize_activations for m in fq.values()):
            notes.append(
                "QAT simulated weight-only quantization (`quantize_activations=False`) but `mode='static'` also "
                "quantizes activations: consider `mode='weight_only'`."
            )
        islands = [n for n in _float_islands(model) if n not in skip_all]
        if islands:
            notes.append(f"Kept in float as during QAT: {', '.join(islands)}.")
            skip_all += islands
        copies = fake_quant_modules(float_model)
        with torch.no_grad():
            for module in copies.values():
                if module.quant_config.weight_bits != 8 and module.is_fake_quant_enabled:
                    module.weight.copy_(fake_quantize_weight(module.weight, module.quant_config.weight_bits))
        strip_qat(float_model)
    float_model.eval()
    for p in float_model.parameters():
        p.requires_grad_(False)
    if config.quantize_embeddings:
        embeddings = _quantize_embeddings(float_model, skip_all)
        if embeddings:
            notes.append(f"Embedding tables stored as int8 (per row): {', '.join(embeddings)}.")

    t = time.perf_counter()
    exported, dynamic_shapes = _export(float_model, args, kwargs, config.dynamic_batch, notes)
    timings["export"] = time.perf_counter() - t

    _import_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    try:
        t = time.perf_counter()
        with warnings.catch_warnings():
            # X86InductorQuantizer warns for every pooling op whose input it leaves in float; nothing to act on.
            warnings.filterwarnings("ignore", message=r".*is not quantized, skip annotate.*")
            prepared = prepare_pt2e(exported.module(), _quantizer(mode, skip_all, config.observer, config.percentile))
        timings["prepare"] = time.perf_counter() - t
        carried = _carry_ranges(prepared, ranges) if mode == "static" and ranges else {}

        t = time.perf_counter()
        batches = 0
        with torch.no_grad():
            prepared(*args, **kwargs)  # also observes the weights
            if mode == "static" and calibration_data is not None:
                for item in itertools.islice(calibration_data, config.calibration_batches):
                    item_args, item_kwargs = _to_cpu(_as_call(item))
                    try:
                        prepared(*item_args, **item_kwargs)
                    except Exception as err:
                        raise Int8ConversionError(
                            f"Calibration batch {batches} could not be run through the model:\n    "
                            f"{_first_lines(err)}\nEach item of `calibration_data` must be the model's input (a "
                            "Tensor, a tuple of positional arguments or a dict of keyword arguments), with the same "
                            "shapes as `example_inputs` except the batch size."
                        ) from err
                    batches += 1
        if mode == "static" and calibration_data is None:
            batches = 1
            if _calibrated_observers(prepared):
                notes.append(
                    "Calibrated on `example_inputs` only: pass `calibration_data` (a few dozen batches) for "
                    "representative activation ranges."
                )
        timings["calibrate"] = time.perf_counter() - t

        t = time.perf_counter()
        converted = convert_pt2e(prepared)
        _drop_unused_tensors(converted)
        timings["convert"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            program = torch.export.export(converted, args, kwargs, dynamic_shapes=dynamic_shapes)
        except Exception as err:
            if dynamic_shapes is None:
                raise
            notes.append(
                "The int8 graph could not be exported with a dynamic batch, so it only accepts the example's "
                f"shapes. Export said: {_first_lines(err, 2)}"
            )
            dynamic_shapes = None
            program = torch.export.export(converted, args, kwargs)
        program.example_inputs = None  # else torch.export.save stores the example batch in the artifact
        timings["reexport"] = time.perf_counter() - t
    except Int8ConversionError:
        raise
    except Exception as err:
        raise Int8ConversionError(
            f"The pt2e int8 conversion ({mode!r}) failed after export:\n    {_first_lines(err)}\nTry `mode='dynamic'` "
            "or `'weight_only'`, or `skip` the module where it fails."
        ) from err
    timings["total"] = time.perf_counter() - t_start
    return Int8Model(
        signature=call_signature(model),
        program=program,
        mode=mode,
        dynamic_batch=dynamic_shapes is not None,
        skipped=tuple(skip_all),
        carried_ranges=carried,
        calibration_batches=batches if mode == "static" else 0,
        timings=timings,
        notes=notes,
    )


def check_exportable(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | Tensor,
    example_kwargs: dict[str, Any] | None = None,
) -> None:
    """Fail early, with the reason and what to change, if ``torch.export`` cannot capture ``model`` (eval mode).

    A cheap check to run before a long training whose end product is an int8 model: the model is exported once
    (no quantization, no copy; its train/eval mode is restored).

    Raises:
        Int8ConversionError: If the model cannot be exported with these inputs.
    """
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        _export(model, args, dict(example_kwargs or {}), dynamic_batch=False, notes=[])
    finally:
        model.train(was_training)


def _program_of(obj: torch.export.ExportedProgram | Int8Model) -> torch.export.ExportedProgram:
    if isinstance(obj, Int8Model):
        return obj.program
    if isinstance(obj, torch.export.ExportedProgram):
        return obj
    raise ValueError(f"Expected an ExportedProgram or an Int8Model, got {type(obj).__name__}.")


def save_int8(program: torch.export.ExportedProgram | Int8Model, path: str | os.PathLike[str]) -> int:
    """Save the int8 program with ``torch.export.save`` (conventionally ``*.pt2``); returns the file size in bytes.

    An :class:`Int8Model` also stores the call signature of the converted network (for :func:`load_quantized`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    signature = program.signature if isinstance(program, Int8Model) else None
    extra = {SIGNATURE_FILE: json.dumps([spec._asdict() for spec in signature])} if signature is not None else None
    torch.export.save(_program_of(program), path, extra_files=extra)
    return path.stat().st_size


def _load(path: str | os.PathLike[str]) -> tuple[torch.export.ExportedProgram, tuple[ArgSpec, ...] | None]:
    _import_torchao()  # registers the quantized_decomposed ops the graph calls
    extra = {SIGNATURE_FILE: ""}
    program = torch.export.load(Path(path), extra_files=extra)
    stored = extra.get(SIGNATURE_FILE)
    signature = tuple(ArgSpec(**spec) for spec in json.loads(stored)) if stored else None
    return program, signature


def load_int8(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """Load the ``ExportedProgram`` saved by :func:`save_int8` (for :func:`compile_int8` or :func:`int8_weights`;
    to run it, :func:`load_quantized` gives a module called like the original network)."""
    return _load(path)[0]


def load_quantized(path: str | os.PathLike[str]) -> QuantizedModule:
    """Load a saved int8 artifact (``.pt2``) as a module called exactly like the network it was converted from.

    Example::

        int8 = load_quantized("lightning_logs/version_0/qat_int8.pt2")
        logits = int8(images)  # same arguments as the float network's forward

    Args:
        path: A file written by :func:`save_int8` (the QAT and PTQ callbacks write one at fit end).

    Returns:
        A :class:`QuantizedModule` (eager int8 reference computation; :func:`compile_int8` for speed).
    """
    return QuantizedModule(*_load(path))


def model_size_bytes(obj: nn.Module | torch.export.ExportedProgram | Int8Model | str | os.PathLike[str]) -> int:
    """Serialized size in bytes.

    Args:
        obj: an ``nn.Module`` (size of ``torch.save(state_dict)``), an ``ExportedProgram``/:class:`Int8Model`
            (size of ``torch.export.save``), or the path of a saved file (its size).
    """
    if isinstance(obj, (str, os.PathLike)):
        return os.path.getsize(obj)
    buffer = io.BytesIO()
    if isinstance(obj, nn.Module):
        torch.save(obj.state_dict(), buffer)
    else:
        torch.export.save(_program_of(obj), buffer)
    return buffer.getbuffer().nbytes


def int8_weights(program: torch.export.ExportedProgram | Int8Model) -> dict[str, Tensor]:
    """The int8 tensors (quantized weights) stored in the program, by name."""
    prog = _program_of(program)
    tensors = {**prog.state_dict, **prog.constants}
    return {k: v for k, v in tensors.items() if isinstance(v, Tensor) and v.dtype == torch.int8}


def compile_int8(program: torch.export.ExportedProgram | Int8Model, dynamic: bool | None = False) -> Callable[..., Any]:
    """Compile the int8 program with Inductor (``freezing=True``), which lowers q/dq patterns to int8 kernels.

    The first call compiles (seconds to a minute); calls run under ``torch.no_grad()``.

    Args:
        program: The program from :func:`convert_to_int8` or :func:`load_int8`.
        dynamic: Passed to ``torch.compile``. ``False`` (default) compiles for the shapes of the first call (and
            recompiles for new ones), which also works for conv→flatten→linear models where dynamic compilation
            fails.
    """
    _import_torchao()  # registers the quantized_decomposed ops and the x86 int8 lowerings

    import torch._inductor.config as inductor_config

    module = _program_of(program).module()
    compiled = torch.compile(module, dynamic=dynamic)

    def run(*args: Any, **kwargs: Any) -> Any:
        # Compilation happens lazily (first call, new shapes), so freezing is patched in around every call rather
        # than set globally; ``torch.compile(options={"freezing": True})`` does not freeze the weights.
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return run


def save_and_size(int8: Int8Model, float_model: nn.Module, path: Path) -> dict[str, float]:
    """Save the int8 program, and compare its size on disk with the float model's serialized state_dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    int8_bytes = save_int8(int8, path)
    float_bytes = model_size_bytes(float_model)
    return {"float_bytes": float_bytes, "int8_bytes": int8_bytes, "size_ratio": int8_bytes / float_bytes}
