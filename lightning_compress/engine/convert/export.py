"""``torch.export`` with a dynamic batch and dynamic sequence/spatial sizes (where the network takes them), clear
errors when a model cannot be captured, and graph helpers."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

_EXPORT_HINT = (
    "The int8 conversion needs a model that torch.export can capture as one graph. Common fixes: replace Python "
    "control flow on tensor *values* (`if x.sum() > 0:`, `.item()`, `.tolist()`) with tensor ops or `torch.cond`; "
    "make sure `example_inputs`/`example_kwargs` are exactly what `forward` takes (in Lightning, set "
    "`example_input_array`); avoid ops export cannot trace (NumPy calls, data-dependent shapes); or keep the "
    "offending submodule out of the exported model."
)


class Int8ConversionError(RuntimeError):
    """The model could not be converted; the message says why and what to change."""


def _batch_dynamic_shapes(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], sizes: Collection[int] = ()
) -> dict[str, Any]:
    """``dynamic_shapes`` marking dim 0 of every tensor input (of size >= 2) as ``Dim.AUTO``, and every other dim
    whose size is in ``sizes`` (sequence lengths, image sides the network takes), keyed by argument."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if not isinstance(value, Tensor) or value.ndim == 0:
            return None
        dims = {d: torch.export.Dim.AUTO for d, n in enumerate(value.shape) if n >= 2 and (d == 0 or n in sizes)}
        return dims or None

    return {name: tree_map(spec, value) for name, value in bound.arguments.items()}


def resize_size(tensor: Tensor, old: int, new: int) -> Tensor:
    """``tensor`` with every non-batch dimension of size ``old`` cut or repeated to ``new`` (token ids stay ids).

    Used by both exporters to try a network at another sequence length or image size."""
    for dim in range(1, tensor.dim()):
        if tensor.shape[dim] == old:
            reps = [1] * tensor.dim()
            reps[dim] = -(-new // old)
            tensor = tensor.repeat(*reps).narrow(dim, 0, new)
    return tensor


def check_input_shape(name: str, shape: tuple[int, ...], expected: list[int | str] | None, artifact: str) -> None:
    """Raise a ``ValueError`` naming the shapes an artifact takes when input ``name`` does not fit ``expected``
    (ints are fixed sizes, names dynamic ones; ``None``: nothing known, nothing checked)."""
    if expected is None:
        return
    wrong = len(shape) != len(expected) or any(
        isinstance(e, int) and e != n for e, n in zip(expected, shape, strict=False)
    )
    if wrong:
        described = "(" + ", ".join(str(e) for e in expected) + ")"
        raise ValueError(
            f"The input `{name}` has shape {tuple(shape)}, but this {artifact} takes {described}: the names are"
            " dynamic sizes, the numbers sizes fixed at export (the network did not run at another size there,"
            " e.g. the input of a flatten -> Linear head, or the export traced it as a constant)."
        )


def _resized(tree: Any, old: int, new: int) -> Any:
    return tree_map(lambda v: resize_size(v, old, new) if isinstance(v, Tensor) else v, tree)


def _eager_sizes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, int]:
    """``{size: other size}`` for the non-batch input sizes the network also runs at in eager (sequence lengths,
    image sizes); a size it fails at (e.g. the input of a flatten -> Linear head) stays fixed."""
    tensors = [v for v in tree_leaves((args, kwargs)) if isinstance(v, Tensor) and v.dim() > 1]
    sizes = sorted({n for t in tensors for n in t.shape[1:] if n >= 2})
    found: dict[int, int] = {}
    with torch.no_grad():
        for size in sizes:
            for other in (size + size // 2, size // 2):
                if other < 2:
                    continue
                try:
                    model(*_resized(args, size, other), **_resized(kwargs, size, other))
                except Exception:  # this size is fixed for the network: try the next
                    continue
                found[size] = other
                break
    return found


def _same_outputs(expected: Any, got: Any, rtol: float = 1e-3, atol: float = 1e-4) -> bool:
    """Whether two outputs (tensors, or trees of them) have the same structure, shapes and (close) values."""
    a, b = tree_leaves(expected), tree_leaves(got)
    if len(a) != len(b):
        return False
    for e, g in zip(a, b, strict=True):
        if isinstance(e, Tensor) != isinstance(g, Tensor):
            return False
        if isinstance(e, Tensor) and (
            e.shape != g.shape or not torch.allclose(e.float(), g.float(), rtol=rtol, atol=atol, equal_nan=True)
        ):
            return False
    return True


def _runs_like(
    reference: Callable[..., Any], candidate: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """Whether ``candidate`` computes what ``reference`` does on this call (``False`` if either raises)."""
    try:
        with torch.no_grad():
            return _same_outputs(reference(*args, **kwargs), candidate(*args, **kwargs))
    except Exception:
        return False


def _sizes_taken(
    reference: Callable[..., Any],
    program: torch.export.ExportedProgram,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    others: dict[int, int],
) -> dict[int, int]:
    """The sizes of ``others`` at which ``program`` computes what ``reference`` does (each tried on its own)."""
    module = program.module()
    return {
        n: m for n, m in others.items() if _runs_like(reference, module, _resized(args, n, m), _resized(kwargs, n, m))
    }


def input_shapes(program: torch.export.ExportedProgram) -> dict[str, list[int | str]]:
    """The shape each tensor input of ``program`` takes, by input name: ints are sizes fixed at export, strings
    dynamic sizes (``"batch"`` for a dynamic dim 0, ``"dim_<n>"`` for a dynamic size exported from an example of
    size ``n``, e.g. a sequence length or image side; one symbol is one size)."""
    user_inputs = set(program.graph_signature.user_inputs)
    shapes: dict[str, list[int | str]] = {}
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        if not isinstance(val, Tensor):
            continue
        shape: list[int | str] = []
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and not bool(getattr(size.node.expr, "is_number", True)):
                hint = getattr(size.node, "hint", None)
                shape.append("batch" if d == 0 else f"dim_{hint}" if isinstance(hint, int) else str(size))
            else:
                shape.append(int(size))
        shapes[node.name] = shape
    return shapes


def describe_shapes(shapes: dict[str, list[int | str]]) -> str:
    """``x: (batch, 3, dim_28, dim_28)``-style text for ``input_shapes``."""
    return ", ".join(f"{name}: (" + ", ".join(str(n) for n in shape) + ")" for name, shape in shapes.items())


def _export_dynamic_sizes(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], notes: list[str]
) -> tuple[torch.export.ExportedProgram, Any, dict[int, int]] | None:
    """Export with a dynamic batch and every non-batch size the network runs at in eager, keeping only the sizes at
    which the export computes what eager does; ``None`` when there is none (or export fails: batch only, noted)."""
    others = _eager_sizes(model, args, kwargs)
    while others:
        dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs, set(others))
        try:
            with _no_causal_mask_detection():
                program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
        except Exception as err:
            notes.append(
                f"The model could not be exported with dynamic sizes {sorted(others)} (besides the batch), so they "
                f"stay fixed. Export said: {_first_lines(err, 2)}"
            )
            return None
        if not _has_dynamic_batch(program):
            return None  # the batch-only export below notes it
        taken = _sizes_taken(model, program, args, kwargs, others)
        if taken == others:
            return program, dynamic_shapes, others
        others = taken  # a size traced into the graph as a constant: export again without it
    return None


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
    dynamic_sizes: bool = False,
) -> tuple[torch.export.ExportedProgram, Any, dict[int, int]]:
    """Export with a dynamic batch when asked and possible, else with static shapes (noted). Raises clearly.

    With ``dynamic_sizes`` (and ``dynamic_batch``), every non-batch input size the network also runs at in eager
    (tried at another size) is exported dynamic too (``Dim.AUTO``), and kept only where the exported program
    computes what eager does at another size; else the batch only (noted when export fails).

    Returns:
        The program, its ``dynamic_shapes`` (``None``: static) and the dynamic non-batch sizes ``{size: a size the
        network was checked at}``.
    """
    dynamic_shapes = None
    if dynamic_batch:
        try:
            dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs)
        except TypeError as err:
            raise Int8ConversionError(
                f"`example_inputs`/`example_kwargs` do not match `{type(model).__name__}.forward`: {err}."
            ) from err
        if dynamic_sizes:
            sized = _export_dynamic_sizes(model, args, kwargs, notes)
            if sized is not None:
                return sized
    if dynamic_shapes is not None:
        try:
            with _no_causal_mask_detection():
                program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
            if _has_dynamic_batch(program):
                return program, dynamic_shapes, {}
            notes.append(
                "The batch dimension was specialized during export (an example batch of 1, or the model's code "
                "depends on the batch size): the int8 program only accepts the example's shapes."
            )
            return program, None, {}
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
    return program, None, {}


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


def _eliminate_dead_code(gm: torch.fx.GraphModule) -> list[str]:
    """Remove graph nodes whose results nothing uses; returns the modules none of whose nodes are left.

    An unused branch (e.g. a BERT pooler, Linear -> tanh, when only ``last_hidden_state`` is read) stays in the
    exported graph, and ``X86InductorQuantizer`` fails on a Linear -> activation pattern whose output has no user
    (``IndexError`` in its partition matching), so the graph is cleaned before ``prepare_pt2e``. Impure nodes
    (in-place updates, the export guards) are kept by fx's own purity rules.
    """
    before = {node: _module_path(node) for node in gm.graph.nodes if node.op == "call_function"}
    if not gm.graph.eliminate_dead_code():
        return []
    gm.recompile()
    alive = set(gm.graph.nodes)
    # a module that still computes something, or holds a submodule that does (`bert` of a live `bert.layer`)
    still_used = {path for node, path in before.items() if node in alive and path}
    still_used |= {path.rsplit(".", i)[0] for path in still_used for i in range(1, path.count(".") + 1)}
    removed = [path for node, path in before.items() if node not in alive and path and path not in still_used]
    return list(dict.fromkeys(removed))


def _failing_node(err: BaseException) -> torch.fx.Node | None:
    """The graph node the failing code was working on, read from the traceback's frames (innermost first).

    A node is taken from a local variable that is a ``torch.fx.Node``, a list/tuple of them, or an object with a
    ``nodes`` list (a source partition); only nodes that carry an ``nn_module_stack`` (they name a module) count.
    """
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            candidates = getattr(value, "nodes", value)
            if isinstance(candidates, torch.fx.Node):
                candidates = [candidates]
            if not isinstance(candidates, (list, tuple)):
                continue
            for node in candidates:
                if isinstance(node, torch.fx.Node) and _module_path(node):
                    return node
    return None


def _module_type(node: torch.fx.Node) -> str:
    """The class name of the innermost module a node comes from (``""`` when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return name.rsplit(".", 1)[-1]


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


def _to_cpu(tree: Any) -> Any:
    return tree_map(lambda v: v.cpu() if isinstance(v, Tensor) else v, tree)


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
