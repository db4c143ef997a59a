"""``convert_to_int8``: the conversion pipeline, one step per function.

float copy (stripped of fake quantization, QAT ranges and float islands kept) → ``torch.export`` (dynamic batch, and
dynamic sequence/spatial sizes where the network runs at another size in eager and the export computes the same)
→ ``prepare_pt2e`` with ``X86InductorQuantizer`` → calibration → ``convert_pt2e`` → unused float tensors dropped →
``torch.export`` again.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_compress.engine.config import QAT_MODES, QUANT_MODES, ConversionConfig
from lightning_compress.engine.convert.artifact import Int8Model, call_signature
from lightning_compress.engine.convert.embedding import _quantize_embeddings
from lightning_compress.engine.convert.export import (
    Int8ConversionError,
    _batch_dynamic_shapes,
    _drop_unused_tensors,
    _eliminate_dead_code,
    _export,
    _failing_node,
    _first_lines,
    _module_path,
    _module_type,
    _sizes_taken,
    _to_cpu,
    describe_shapes,
    input_shapes,
)
from lightning_compress.engine.convert.observers import _calibrated_observers, _carry_ranges
from lightning_compress.engine.convert.quantizer import _import_torchao, _quantizer
from lightning_compress.engine.fake_quant import (
    activation_ranges,
    fake_quant_modules,
    fake_quantize_weight,
    is_prepared,
    strip_qat,
)


class ModelCall(NamedTuple):
    """One calibration item with both positional and keyword arguments: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _as_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A calibration item (a Tensor, a tuple/list of positional arguments, a dict of keywords or a
    ``ModelCall``) as (args, kwargs)."""
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


def _outer_unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``model``; nothing is modified."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
    return model


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """``model`` with every ``torch.compile`` wrapper (``OptimizedModule``) in it replaced, in place, by the module
    it wraps (a wrapper at the top is unwrapped in the return value). Use on a copy."""
    model = _outer_unwrapped(model)
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and isinstance(getattr(child, "_orig_mod", None), nn.Module):
                parent._modules[key] = unwrap_compiled(child)
    return model


def _check_call(
    model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None, skip: Sequence[str] | str
) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """The example call as (args, kwargs) on the CPU, and ``skip`` as a list of existing module names."""
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise ValueError(
            f"`example_inputs` must be a tuple of positional arguments (or one Tensor), got "
            f"{type(example_inputs).__name__}."
        )
    skip = [skip] if isinstance(skip, str) else list(skip)
    modules = dict(model.named_modules())
    unknown = [s for s in skip if s not in modules]
    if unknown:
        names = [n for n, m in modules.items() if n and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        raise ValueError(f"`skip` names no module: {unknown}. Linear/Conv module names: {', '.join(names) or 'none'}.")
    return _to_cpu(example_inputs), _to_cpu(dict(example_kwargs or {})), list(dict.fromkeys(skip))


def _float_copy(
    model: nn.Module,
    config: ConversionConfig,
    skip: list[str],
    notes: list[str],
    compact: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, dict[str, tuple[float, float]]]:
    """A float CPU copy to export, and the input ranges QAT learned (``skip`` gets what QAT kept in float)."""
    # (a CPU copy: the int8 kernels are x86 CPU ones; `torch.compile` wrappers removed: export would specialize)
    float_model = unwrap_compiled(copy.deepcopy(_outer_unwrapped(model)).cpu())
    ranges: dict[str, tuple[float, float]] = {}
    if is_prepared(float_model):
        fq = fake_quant_modules(float_model)
        enabled = {n for n, m in fq.items() if m.is_fake_quant_enabled}
        ranges = {n: r for n, r in activation_ranges(float_model).items() if n in enabled}
        if config.mode == "static" and not any(m.quant_config.quantize_activations for m in fq.values()):
            notes.append(
                "QAT simulated weight-only quantization (`quantize_activations=False`) but `mode='static'` also "
                "quantizes activations: consider `mode='weight_only'`."
            )
        islands = [n for n in _float_islands(float_model) if n not in skip]
        if islands:
            notes.append(f"Kept in float as during QAT: {', '.join(islands)}.")
            skip += islands
        with torch.no_grad():
            for module in fake_quant_modules(float_model).values():
                if module.quant_config.weight_bits != 8 and module.is_fake_quant_enabled:
                    module.weight.copy_(fake_quantize_weight(module.weight, module.quant_config.weight_bits))
        strip_qat(float_model)
    if compact is not None:  # the pruned channels removed; module names, and so the QAT ranges, unchanged
        float_model = compact(float_model)
        notes.append("Converted the compact network (pruned channels removed).")
    float_model.eval()
    for p in float_model.parameters():
        p.requires_grad_(False)
    if config.quantize_embeddings:
        embeddings = _quantize_embeddings(float_model, skip)
        if embeddings:
            notes.append(f"Embedding tables stored as int8 (per row): {', '.join(embeddings)}.")
    return float_model, ranges


def _calibrate(
    prepared: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    calibration_data: Iterable[Any] | None,
    config: ConversionConfig,
    notes: list[str],
) -> int:
    """Run the example (which also observes the weights) and the calibration batches; returns their number."""
    batches = 0
    with torch.no_grad():
        prepared(*args, **kwargs)
        if config.mode == "static" and calibration_data is not None:
            for item in itertools.islice(calibration_data, config.calibration_batches):
                item_args, item_kwargs = _to_cpu(_as_call(item))
                try:
                    prepared(*item_args, **item_kwargs)
                except Exception as err:
                    raise Int8ConversionError(
                        f"Calibration batch {batches} could not be run through the model:\n    "
                        f"{_first_lines(err)}\nEach item of `calibration_data` must be the model's input (a "
                        "Tensor, a tuple of positional arguments or a dict of keyword arguments), with the same "
                        "shapes as `example_inputs` except the batch size (and the sequence/spatial sizes the "
                        "network takes at other values)."
                    ) from err
                batches += 1
    if config.mode != "static":
        return 0
    if calibration_data is None:
        batches = 1
        if _calibrated_observers(prepared):
            notes.append(
                "Calibrated on `example_inputs` only: pass `calibration_data` (a few dozen batches) for "
                "representative activation ranges."
            )
    return batches


def _reexport(
    converted: torch.fx.GraphModule,
    float_model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_shapes: Any,
    sizes: dict[int, int],
    notes: list[str],
) -> tuple[torch.export.ExportedProgram, bool, dict[int, int]]:
    """Export the converted graph again, with the dynamic dims of the first export when possible (each dynamic
    non-batch size checked: the program must compute what ``converted`` does at another size), else a dynamic batch,
    else static shapes (noted). Returns the program, whether its batch is dynamic, and its dynamic sizes."""
    if sizes:
        try:
            program = torch.export.export(converted, args, kwargs, dynamic_shapes=dynamic_shapes)
            taken = _sizes_taken(converted, program, args, kwargs, sizes)
        except Exception as err:
            taken, reason = {}, f" Export said: {_first_lines(err, 2)}"
        else:
            reason = ""
        if taken == sizes:
            program.example_inputs = None  # else torch.export.save stores the example batch in the artifact
            return program, True, sizes
        notes.append(
            f"The int8 graph could not be exported with the dynamic sizes {sorted(sizes)} (besides the batch), so "
            f"it only accepts the example's sizes there.{reason}"
        )
        dynamic_shapes = _batch_dynamic_shapes(float_model, args, kwargs)
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
    return program, dynamic_shapes is not None, {}


def _example_sizes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    """The non-batch input sizes (>= 2) of the example call."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return sorted({n for v in leaves if isinstance(v, Tensor) and v.dim() > 1 for n in v.shape[1:] if n >= 2})


def _has_length_or_image(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the call has an input with a sequence or spatial size (a tensor of 3+ dims, or 2-D token ids), whose
    shapes are worth a note (a ``(batch, features)`` input is not)."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return any(isinstance(v, Tensor) and (v.dim() >= 3 or (v.dim() == 2 and not v.is_floating_point())) for v in leaves)


_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_OPS = {"aten.linear.default", *(f"aten.conv{d}d.{kind}" for d in (1, 2, 3) for kind in ("default", "padding"))}


def _match_layer_subclasses(graph: torch.fx.GraphModule, model: nn.Module) -> list[str]:
    """Let the quantizer see Linear/Conv ops of ``nn.Linear``/``nn.ConvNd`` *subclasses* (e.g. EfficientNet's
    ``Conv2dSame``, which pads in ``forward``) as those of the parent type; returns the module names.

    ``X86InductorQuantizer`` finds its patterns by the exact class name of the innermost module of each op
    (``nn_module_stack``), so a subclass's convs stayed float. An op is relabelled only when it computes with the
    module's own ``weight``: then quantizing it is what quantizing the parent would do, whatever else ``forward``
    does around it (padding, a scale).
    """
    names = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or str(node.target) not in _LAYER_OPS or len(node.args) < 2:
            continue
        stack = node.meta.get("nn_module_stack")
        path = _module_path(node)
        weight = node.args[1]
        if not stack or not path or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        parent = next((t for t in _LAYER_TYPES if isinstance(module, t)), None)
        if parent is None or type(module) is parent or str(weight.target) != f"{path}.weight":
            continue
        key, (fqn, _) = list(stack.items())[-1]
        node.meta["nn_module_stack"] = {**stack, key: (fqn, f"{parent.__module__}.{parent.__qualname__}")}
        names.append(path)
    return names


_STAGES = {
    "prepare": "preparing the graph for quantization (`prepare_pt2e` with X86InductorQuantizer)",
    "calibrate": "calibrating the observers (running `example_inputs` through the prepared graph)",
    "convert": "converting the calibrated graph to int8 (`convert_pt2e`)",
    "reexport": "exporting the int8 graph again (`torch.export`)",
}


def _failure_message(err: Exception, stage: str, mode: str, model: nn.Module, skipped: Sequence[str]) -> str:
    """What failed (the error), where (the stage, and the graph node and module when the traceback names one), and
    only what can still be tried: the other modes the caller has (a QAT model: static/dynamic), and keeping the
    failing module in float."""
    node = _failing_node(err)
    where = _STAGES[stage]
    path = None
    if node is not None:
        path = _module_path(node)
        kind = _module_type(node)
        where += f", at graph node `{node.name}` ({node.target}) of module `{path}`" + (f" ({kind})" if kind else "")
    modes = QAT_MODES if is_prepared(model) else QUANT_MODES
    others = [m for m in modes if m != mode]
    tries = [f"mode={' or '.join(repr(m) for m in others)}" if others else ""]
    if path is not None and path not in skipped:
        tries.append(
            f"keep `{path}` in float (`skip=[{path!r}]` of convert_to_int8; an `exclude` pattern matching its "
            "Linear/Conv layers on the QAT and PTQ callbacks)"
        )
    hint = "; or ".join(t for t in tries if t)
    return f"The pt2e int8 conversion (mode={mode!r}) failed while {where}:\n    {_first_lines(err)}" + (
        f"\nStill to try: {hint}." if hint else ""
    )


def convert_to_int8(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | Tensor,
    example_kwargs: dict[str, Any] | None = None,
    calibration_data: Iterable[Any] | None = None,
    skip: Sequence[str] = (),
    config: ConversionConfig | None = None,
    compact: Callable[[nn.Module], nn.Module] | None = None,
    **settings: Any,
) -> Int8Model:
    """Build an int8 ``ExportedProgram`` from a copy of ``model`` (which is left untouched).

    Args:
        model: A float model, or one prepared with ``prepare_qat``. For a
            prepared model the conversion: starts from a stripped float copy; reuses the learned input ranges of
            the fake-quant modules (when their observers have seen data and fake quantization is enabled); bakes
            4-bit weights onto their grid; and keeps in float the Linear/Conv modules and attention blocks that QAT
            kept in float.
        example_inputs: Positional arguments of ``forward`` (a single Tensor is accepted too). Use a batch of at
            least 2 so the batch dimension can stay dynamic. Each non-batch size (sequence length, image side) the
            network also runs at in eager at another size is exported dynamic too, when the export computes what
            eager does there (``Int8Model.input_shapes`` says which shapes the program takes; the notes too).
        example_kwargs: Keyword arguments of ``forward``.
        calibration_data: For ``"static"``: an iterable of model inputs (a Tensor, a tuple of positional
            arguments, a dict of keyword arguments or a ``ModelCall`` with both, per item) used to calibrate
            the activation ranges not taken over from fake-quant observers (at most ``calibration_batches`` items).
            When ``None``, ``example_inputs`` is the only calibration batch (noted).
        skip: Module names kept in float (with everything inside them), e.g. for accuracy-aware fallback.
        config: How to convert (mode, observer, percentile, calibration batches, embeddings, dynamic batch); see
            ``ConversionConfig``. Default: ``ConversionConfig()`` (static).
        **settings: Fields of ``ConversionConfig`` that replace those of
            ``config``, e.g. ``mode="dynamic"`` or ``observer="minmax"``.
        compact: Applied to the stripped float copy before export, e.g. a ``structured.ChannelRemoval`` so that
            the int8 model is the channel-pruned network with its pruned channels removed. It must keep module
            names (the QAT ranges are carried by name).

    Returns:
        An ``Int8Model`` with the ``program`` and what happened (timings, notes, carried ranges, input shapes).

    Raises:
        ValueError: On a bad ``mode``, an unknown ``skip`` name or a bad ``example_inputs``.
        Int8ConversionError: If torch.export cannot capture the model (the message quotes the export error and says
            what to change), or the pt2e conversion fails.
    """
    config = ConversionConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    args, kwargs, skip_all = _check_call(model, example_inputs, example_kwargs, skip)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    float_model, ranges = _float_copy(model, config, skip_all, notes, compact)

    t = time.perf_counter()
    exported, dynamic_shapes, sizes = _export(
        float_model, args, kwargs, config.dynamic_batch, notes, dynamic_sizes=True
    )
    timings["export"] = time.perf_counter() - t
    _import_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    stage = "prepare"
    try:
        t = time.perf_counter()
        graph = exported.module()
        dropped = _eliminate_dead_code(graph)
        if dropped:
            notes.append(f"Dropped computations whose results are not used (in {', '.join(dropped)}).")
        _match_layer_subclasses(graph, float_model)
        with warnings.catch_warnings():
            # X86InductorQuantizer warns for every pooling op whose input it leaves in float; nothing to act on.
            warnings.filterwarnings("ignore", message=r".*is not quantized, skip annotate.*")
            quantizer = _quantizer(config.mode, skip_all, config.observer, config.percentile)
            prepared = prepare_pt2e(graph, quantizer)
        timings["prepare"] = time.perf_counter() - t
        carried = _carry_ranges(prepared, ranges) if config.mode == "static" and ranges else {}

        stage, t = "calibrate", time.perf_counter()
        batches = _calibrate(prepared, args, kwargs, calibration_data, config, notes)
        timings["calibrate"] = time.perf_counter() - t

        stage, t = "convert", time.perf_counter()
        converted = convert_pt2e(prepared)
        _drop_unused_tensors(converted)
        timings["convert"] = time.perf_counter() - t

        stage, t = "reexport", time.perf_counter()
        program, dynamic_batch, sizes = _reexport(converted, float_model, args, kwargs, dynamic_shapes, sizes, notes)
        timings["reexport"] = time.perf_counter() - t
        shapes = input_shapes(program)
        fixed = [n for n in _example_sizes(args, kwargs) if n not in sizes]
        if dynamic_batch and (sizes or _has_length_or_image(args, kwargs)):
            notes.append(
                f"The int8 program takes {describe_shapes(shapes)}"
                + (
                    f" (sizes {fixed} stay fixed: the network did not run at another size, or the export traced them)"
                    if fixed
                    else ""
                )
                + "."
            )
    except Int8ConversionError:
        raise
    except Exception as err:
        raise Int8ConversionError(_failure_message(err, stage, config.mode, model, skip_all)) from err
    timings["total"] = time.perf_counter() - t_start
    return Int8Model(
        program=program,
        mode=config.mode,
        dynamic_batch=dynamic_batch,
        skipped=tuple(skip_all),
        carried_ranges=carried,
        calibration_batches=batches,
        timings=timings,
        notes=notes,
        signature=call_signature(_outer_unwrapped(model)),
        unused=tuple(dropped),
        input_shapes=shapes,
    )
