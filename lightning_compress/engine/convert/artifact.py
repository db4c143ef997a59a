"""The int8 model: its program called like the original network, saved, loaded, sized and compiled."""

from __future__ import annotations

import inspect
import io
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_compress.engine.convert.export import check_input_shape
from lightning_compress.engine.convert.observers import _QUANTIZED_OPS
from lightning_compress.engine.convert.quantizer import _import_torchao
from lightning_compress.engine.io import write_atomically

#: Name of the artifact member that stores the call signature of the converted network.
SIGNATURE_FILE = "lightning_compress/signature.json"
#: Name of the artifact member that stores the shape each input takes (``input_shapes``).
SHAPES_FILE = "lightning_compress/input_shapes.json"
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
    A tensor input of a shape the program does not take raises a ``ValueError`` that states the shapes it takes.

    Args:
        program: The int8 program (from ``convert_to_int8`` or ``load_int8``).
        signature: The parameters of the original ``forward`` (``call_signature``); ``None``: calls are passed
            to the program as they are.
        input_shapes: The shape each input takes (``Int8Model.input_shapes``); default: read from ``program``.

    Attributes:
        program: The ``ExportedProgram``.
        graph: ``program.module()``, the eager q/dq graph.
        input_shapes: The shape each tensor input takes, by name: ints are sizes fixed at export, strings dynamic
            sizes (``"batch"``, ``"dim_<n>"``: a sequence length or image side exported from an example of size n).
    """

    graph: nn.Module

    def __init__(
        self,
        program: torch.export.ExportedProgram,
        signature: Sequence[ArgSpec] | None = None,
        input_shapes: dict[str, list[int | str]] | None = None,
    ) -> None:
        super().__init__()
        from lightning_compress.engine.convert.export import input_shapes as shapes_of

        self.program = program
        self.input_shapes = dict(input_shapes) if input_shapes is not None else shapes_of(program)
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
        positional = [spec.name for spec in self.signature or () if not spec.keyword_only]
        for name, value in [*zip(positional, call_args, strict=False), *call_kwargs.items()]:
            if isinstance(value, Tensor):
                self._check_shape(name, tuple(value.shape))
        return self.graph(*call_args, **call_kwargs)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        check_input_shape(name, shape, self.input_shapes.get(name), "int8 program")

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


@dataclass
class Int8Model:
    """The result of ``convert_to_int8``.

    Attributes:
        program: The int8 ``ExportedProgram`` (save it with ``save_int8``, run it with ``program.module()`` or
            ``compile_int8``).
        mode: ``"static"``, ``"dynamic"`` or ``"weight_only"``.
        dynamic_batch: Whether the program accepts any batch size (else only the example's shapes); see
            ``input_shapes`` for the other dimensions.
        skipped: Module names kept in float.
        carried_ranges: Input ranges taken over from fake-quant observers, by module name.
        calibration_batches: Batches run through the observers (0 when all ranges were carried or not needed).
        timings: Seconds spent per phase (``export``, ``prepare``, ``calibrate``, ``convert``, ``reexport``,
            ``total``).
        notes: Things the caller may want to log (fallbacks, what was skipped and why).
        signature: The parameters of the converted network's ``forward`` (``None``: calls pass through).
        unused: Modules whose computations were dropped from the graph because nothing used their results (e.g. a
            BERT pooler when only ``last_hidden_state`` is read).
        input_shapes: The shape each tensor input takes, by input name: ints are sizes fixed at export, strings
            dynamic sizes (``"batch"``; ``"dim_<n>"``, a sequence length or image side exported from an example of
            size n, e.g. ``{"x": ["batch", 3, "dim_28", "dim_28"]}``). Saved with the artifact.
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
    unused: tuple[str, ...] = ()
    input_shapes: dict[str, list[int | str]] | None = None

    def module(self) -> QuantizedModule:
        """The program as an eager ``QuantizedModule``, called like the float network (slow q/dq reference
        computation; see ``compile_int8``)."""
        return QuantizedModule(self.program, self.signature, self.input_shapes)

    def size_bytes(self) -> int:
        """Size of the saved artifact, in bytes."""
        return model_size_bytes(self)

    @property
    def quantized_layers(self) -> tuple[str, ...]:
        """The layers that compute with int8 weights, read from ``program`` (see ``quantized_layers``)."""
        return quantized_layers(self.program)

    @property
    def num_quantized_layers(self) -> int:
        """How many Linear/Conv ops of ``program`` compute with int8 weights."""
        return len(self.quantized_layers)


def _program_of(obj: torch.export.ExportedProgram | Int8Model) -> torch.export.ExportedProgram:
    if isinstance(obj, Int8Model):
        return obj.program
    if isinstance(obj, torch.export.ExportedProgram):
        return obj
    raise ValueError(f"Expected an ExportedProgram or an Int8Model, got {type(obj).__name__}.")


def save_int8(
    program: torch.export.ExportedProgram | Int8Model, path: str | os.PathLike[str], what: str = "save_path"
) -> int:
    """Save the int8 program with ``torch.export.save`` (conventionally ``*.pt2``); returns the file size in bytes.

    An ``Int8Model`` also stores the call signature of the converted network (for ``load_quantized``).
    The archive is serialized in memory first, then written atomically (``write_atomically``): ``torch.export.save``
    aborts the whole process when a write to a file fails (e.g. a full
    disk), and a crash during the write must not leave a truncated ``.pt2`` at ``path``.

    Raises:
        ArtifactWriteError: If the file cannot be written; the message names ``what``, the path and the OS error,
            and nothing partial is left at ``path``.
    """
    data = serialize_int8(program)
    return write_atomically(path, data, what)


def serialize_int8(program: torch.export.ExportedProgram | Int8Model, compress: bool = True) -> bytes:
    """The bytes ``save_int8`` writes: ``torch.export.save`` into memory (with the call signature), the archive
    rewritten with deflate.

    ``torch.export.save`` stores every member uncompressed (and ~1.2 KB of graph metadata per node, which deflates
    well): the same archive, each member deflated, is 0.26-0.28x of the fp32 ``state_dict`` on the benchmark nets
    instead of 0.43-0.52x (DESIGN §7), and ``torch.export.load`` reads it back identically.

    Args:
        program: The program or ``Int8Model``.
        compress: Deflate the members (``False``: the archive exactly as ``torch.export.save`` writes it).
    """
    signature = program.signature if isinstance(program, Int8Model) else None
    shapes = program.input_shapes if isinstance(program, Int8Model) else None
    extra = {SIGNATURE_FILE: json.dumps([spec._asdict() for spec in signature])} if signature is not None else {}
    if shapes is not None:
        extra[SHAPES_FILE] = json.dumps(shapes)
    buffer = io.BytesIO()
    torch.export.save(_program_of(program), buffer, extra_files=extra or None)
    return deflate_archive(buffer.getvalue()) if compress else buffer.getvalue()


def deflate_archive(data: bytes, level: int = 6) -> bytes:
    """The zip archive ``data`` with every member deflated (names, order and contents unchanged)."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as target,
    ):
        for info in source.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = info.external_attr
            target.writestr(member, source.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=level)
    return out.getvalue()


def _load(
    path: str | os.PathLike[str],
) -> tuple[torch.export.ExportedProgram, tuple[ArgSpec, ...] | None, dict[str, list[int | str]] | None]:
    _import_torchao()  # registers the quantized_decomposed ops the graph calls
    extra = {SIGNATURE_FILE: "", SHAPES_FILE: ""}
    program = torch.export.load(Path(path), extra_files=extra)
    stored = extra.get(SIGNATURE_FILE)
    signature = tuple(ArgSpec(**spec) for spec in json.loads(stored)) if stored else None
    stored_shapes = extra.get(SHAPES_FILE)
    return program, signature, json.loads(stored_shapes) if stored_shapes else None


def load_int8(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """Load the ``ExportedProgram`` saved by ``save_int8`` (for ``compile_int8`` or ``int8_weights``;
    to run it, ``load_quantized`` gives a module called like the original network)."""
    return _load(path)[0]


def load_quantized(path: str | os.PathLike[str]) -> nn.Module:
    """Load a saved int8 artifact (``.pt2`` or ``.onnx``) as a module called like the network it was converted from.

    Dispatches on the suffix: a ``.onnx`` file (the ``backend="onnxruntime"`` artifact) becomes an
    ``OrtInt8Model`` run by ONNX Runtime (an ``OrtFloatModel`` if its graph has no int8 layer); anything else is read as
    a ``torch.export`` archive.

    **Example**

    ```python
    int8 = load_quantized("lightning_logs/version_0/qat_int8.onnx")  # or qat_int8.pt2
    logits = int8(images)  # same arguments as the float network's forward
    ```

    Args:
        path: A file written by ``save_int8`` or ``OrtInt8Model.save`` (the QAT and PTQ callbacks write one at
            fit end).

    Returns:
        For ``.pt2``: a ``QuantizedModule`` (eager int8 reference computation; ``compile_int8`` for speed); its
        ``input_shapes`` says which shapes it takes (a dynamic batch, and the sequence lengths/image sizes the network
        ran at in another size when converted).
        For ``.onnx``: the ONNX Runtime model (fast as it is).
    """
    if Path(path).suffix.lower() == ".onnx":
        from lightning_compress.engine.ort import load_onnx

        return load_onnx(path)
    return QuantizedModule(*_load(path))


def model_size_bytes(obj: nn.Module | torch.export.ExportedProgram | Int8Model | str | os.PathLike[str]) -> int:
    """Serialized size in bytes.

    Args:
        obj: an ``nn.Module`` (size of ``torch.save(state_dict)``), an ``ExportedProgram``/``Int8Model``
            (size of the compressed archive ``save_int8`` writes), or the path of a saved file (its size).
    """
    if isinstance(obj, (str, os.PathLike)):
        return os.path.getsize(obj)
    if not isinstance(obj, nn.Module):
        return len(serialize_int8(obj))
    buffer = io.BytesIO()
    torch.save(obj.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def int8_weights(program: torch.export.ExportedProgram | Int8Model) -> dict[str, Tensor]:
    """The int8 tensors (quantized weights) stored in the program, by name."""
    prog = _program_of(program)
    tensors = {**prog.state_dict, **prog.constants}
    return {k: v for k, v in tensors.items() if isinstance(v, Tensor) and v.dtype == torch.int8}


#: Ops that compute with a weight: those the quantizer annotates, and the forms a program may hold them in.
_WEIGHT_OPS = _QUANTIZED_OPS | {"aten.conv_transpose2d.input", "aten.addmm.default", "aten.mm.default"}


def _int8_source(node: Any) -> bool:
    """Whether ``node`` (the weight argument of a Linear/Conv op) is a dequantize of an int8 tensor."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or "dequantize" not in str(node.target):
        return False
    source = node.args[0] if node.args else None
    val = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    return isinstance(val, Tensor) and val.dtype == torch.int8


def quantized_layers(program: torch.export.ExportedProgram | Int8Model) -> tuple[str, ...]:
    """The layers that compute with int8 weights, counted from the converted program itself.

    A layer counts when a Linear/Conv op of the graph takes as weight the dequantization of an int8 tensor (what
    ``convert_pt2e`` writes and Inductor fuses into an int8 kernel); a layer the quantizer did not annotate keeps its
    float weight and is not counted, whatever was selected.

    Returns:
        The module path of each such op (``nn_module_stack``), in graph order; a module whose forward has two int8
        ops (e.g. ``nn.MultiheadAttention``'s ``in_proj_weight`` and ``out_proj``) appears twice.
    """
    from lightning_compress.engine.convert.export import _module_path

    names = []
    for node in _program_of(program).graph.nodes:
        if node.op != "call_function" or str(node.target) not in _WEIGHT_OPS or len(node.args) < 2:
            continue
        weight = node.args[2] if str(node.target) == "aten.addmm.default" else node.args[1]
        if _int8_source(weight):
            names.append(_module_path(node) or "")
    return tuple(names)


def compile_int8(program: torch.export.ExportedProgram | Int8Model, dynamic: bool | None = False) -> Callable[..., Any]:
    """Compile the int8 program with Inductor (``freezing=True``), which lowers q/dq patterns to int8 kernels.

    The first call compiles (seconds to a minute); calls run under ``torch.no_grad()``.

    Args:
        program: The program from ``convert_to_int8`` or ``load_int8``.
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
    int8_bytes = save_int8(int8, path)
    float_bytes = model_size_bytes(float_model)
    return {"float_bytes": float_bytes, "int8_bytes": int8_bytes, "size_ratio": int8_bytes / float_bytes}
