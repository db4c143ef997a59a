"""The ONNX Runtime int8 backend: ORT's own QDQ layout, seeded with what QAT learned, run by an ``InferenceSession``.

Pipeline of ``convert_to_onnx_int8``, on a *copy* of the model (the input model is never modified):

1. the float copy (a QAT-prepared model is stripped of its fake-quant modules, same weights) is exported with the
   TorchScript-based ``torch.onnx.export(..., dynamo=False)`` and a dynamic batch dimension, then checked at another
   batch size against eager PyTorch. The dynamo exporter is not used: it needs ``onnxscript`` and gave nothing the
   legacy exporter does not give for these networks (BatchNorm folded into Conv, module scopes in node names);
2. ``onnxruntime.quantization.quant_pre_process`` (shape inference, graph optimization);
3. ``quantize_static`` (QDQ, per-channel symmetric int8 weights, uint8 per-tensor activations), or
   ``quantize_dynamic`` (int8 weights, activations quantized per batch) for Linear-heavy and attention models.

For a model prepared by ``prepare_qat``, the static conversion is *seeded*:
the input of every Conv/Gemm/MatMul node that comes from a fake-quant layer gets exactly the ``(scale, zero_point)``
that layer's fake-quant op uses (``activation_qparams``), and its weight the
per-channel grid of ``weight_qparams`` (``max|w| / 127.5``; ORT's own
symmetric int8 grid would be ``max|w| / 127``), both through ``extra_options={"TensorQuantOverrides": ...}``.
Per-channel symmetric quantization commutes with the BatchNorm folding the exporter does, so the folded weight gets the
same integers QAT trained with. Layers QAT kept in float stay float. Tensors QAT does not quantize but ORT needs for
its fused kernels (Conv outputs, residual adds) are calibrated on ``calibration``. The output of the last layer is
kept in float (the fake-quant model's is float too). In static mode the activation-by-activation MatMuls and Softmax
of attention are never quantized (DESIGN §7: 93.4% top-1 agreement when they are).

What the result runs is counted from the ONNX graph (``count_quantized_layers``), not from a selection.
``choose_backend`` times already-built callables (alternated, 1 thread) and picks the fastest int8 one.

``onnx`` and ``onnxruntime`` are imported when a conversion or a session is made.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.engine.convert import ModelCall
from lightning_compress.engine.convert.export import check_input_shape, resize_size
from lightning_compress.engine.fake_quant import (
    ACTIVATION_EPS,
    FakeQuantModule,
    activation_ranges,
    fake_quant_modules,
    is_prepared,
    strip_qat,
    weight_qparams,
)
from lightning_compress.engine.io import write_atomically
from lightning_compress.engine.measure import compare_latency
from lightning_compress.engine.validation import check_bool, check_choice, check_positive_int

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = [
    "FLOAT_BACKENDS",
    "BackendChoice",
    "OrtConversionError",
    "OrtFloatModel",
    "OrtInt8Model",
    "OrtMode",
    "OrtModel",
    "choose_backend",
    "choose_from_latencies",
    "convert_to_onnx_int8",
    "count_quantized_layers",
    "export_onnx",
    "load_onnx",
    "load_onnx_int8",
    "resolve_mode",
]

#: ``"static"`` (calibrated/seeded activation scales), ``"dynamic"`` (activation scales per batch) or ``"auto"``.
OrtMode = Literal["static", "dynamic", "auto"]
#: The ONNX opset of the export (per-channel QDQ needs >= 13).
OPSET = 17
#: Names of the float candidates of ``choose_backend``; every other candidate is an int8 backend.
FLOAT_BACKENDS = ("eager_fp32", "onnxruntime_fp32")
#: Metadata key of the ONNX model that says how to return the outputs (``"tensor"`` or ``"tuple"``).
OUTPUT_KIND_KEY = "lightning_compress.output"
#: Metadata key holding the non-tensor arguments of the example call baked into the graph (JSON, by name).
FIXED_KEY = "lightning_compress.fixed"
#: Metadata key holding the shape each input takes (JSON, by name: ints are fixed sizes, strings dynamic).
DYNAMIC_KEY = "lightning_compress.input_shapes"
#: Metadata key holding the conversion mode of an int8 model.
MODE_KEY = "lightning_compress.mode"

_LAYER_OPS = ("Conv", "Gemm", "MatMul")
_INT8_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")
_INSTALL_HINT = "pip install onnx onnxruntime"


class OrtConversionError(RuntimeError):
    """The model could not be exported to ONNX or quantized by ONNX Runtime; the message says why and what to do."""


def _import_ort() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or an error naming the packages to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"The ONNX Runtime backend needs the `onnx` and `onnxruntime` packages ({err}): `{_INSTALL_HINT}`."
        ) from err
    return onnx, onnxruntime


# --------------------------------------------------------------------------------------------------------------------
# Sessions as modules
# --------------------------------------------------------------------------------------------------------------------


def _session(data: bytes, threads: int, quiet: bool = False) -> onnxruntime.InferenceSession:
    _, ort = _import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = check_positive_int("threads", threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT warns about serializing hardware-specific optimizations
    if quiet:  # a trial run whose failure is an answer (`_matches_eager`), not an error to print
        options.log_severity_level = 4
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class OrtModel(nn.Module):
    """An ONNX model run by an ``onnxruntime.InferenceSession``, called like the network it was exported from.

    Positional and keyword arguments bind to the ONNX input names, which are the ``forward`` parameter names of the
    exported network; tensors go in (moved to CPU) and come out as CPU ``torch.Tensor`` objects: one tensor, or a
    tuple when the network returned several. Gradients do not flow through; ``train()``/``eval()`` change nothing.

    Args:
        onnx_bytes: The serialized ONNX model.
        threads: ``intra_op_num_threads`` of the session (default 1: comparable, machine-friendly timings).

    Attributes:
        input_names: The ONNX input names, in positional order.
        output_names: The ONNX output names.
    """

    def __init__(self, onnx_bytes: bytes, threads: int = 1) -> None:
        super().__init__()
        onnx, _ = _import_ort()
        self._bytes = bytes(onnx_bytes)
        self.threads = check_positive_int("threads", threads)
        self.session = _session(self._bytes, self.threads)
        self.input_names: tuple[str, ...] = tuple(i.name for i in self.session.get_inputs())
        self.output_names: tuple[str, ...] = tuple(o.name for o in self.session.get_outputs())
        meta = self.session.get_modelmeta().custom_metadata_map
        self._as_tuple = meta.get(OUTPUT_KIND_KEY, "tensor" if len(self.output_names) == 1 else "tuple") == "tuple"
        #: Non-tensor arguments of the export example (baked into the graph): a call may pass them with that value.
        self.fixed_arguments: dict[str, Any] = json.loads(meta.get(FIXED_KEY, "{}"))
        #: The shape each input takes, by name: ints are sizes fixed at export, strings dynamic sizes
        #: (``"batch"``, ``"dim_<n>"``: one symbol per exported size, e.g. a sequence length or image side).
        self.input_shapes: dict[str, list[int | str]] = json.loads(meta.get(DYNAMIC_KEY, "{}"))
        del onnx

    @property
    def onnx_bytes(self) -> bytes:
        """The serialized ONNX model this session runs."""
        return self._bytes

    @property
    def size_bytes(self) -> int:
        """Size of the ``.onnx`` file ``save`` writes."""
        return len(self._bytes)

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the ``.onnx`` file atomically (a crash never leaves a partial file) and return its size in bytes."""
        return write_atomically(path, self._bytes, what="path")

    def _feeds(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        if len(args) > len(self.input_names):
            raise TypeError(
                f"The ONNX model takes {len(self.input_names)} input(s) {list(self.input_names)}, got {len(args)} "
                "positional arguments."
            )
        values = dict(zip(self.input_names, args, strict=False))
        for name, value in kwargs.items():
            if name in self.fixed_arguments and name not in self.input_names and not isinstance(value, Tensor):
                baked = self.fixed_arguments[name]
                if value != baked:
                    raise TypeError(
                        f"The argument `{name}` was baked into the ONNX graph as {baked!r} (the export example's "
                        f"value); it cannot take {value!r}. Convert with an example call that passes the value used."
                    )
                continue
            if name not in self.input_names:
                raise TypeError(
                    f"The ONNX model has no input `{name}`; it was exported with the inputs {list(self.input_names)} "
                    "(only the tensor arguments of the example call become inputs)."
                )
            if name in values:
                raise TypeError(f"Got multiple values for the input `{name}`.")
            values[name] = value
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise TypeError(f"Missing ONNX input(s) {missing}; the model takes {list(self.input_names)}.")
        feeds = {}
        for name, value in values.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"The input `{name}` must be a torch.Tensor, got {type(value).__name__}.")
            feeds[name] = value.detach().cpu().contiguous().numpy()
            self._check_shape(name, tuple(value.shape))
        return feeds

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        check_input_shape(name, shape, self.input_shapes.get(name), "ONNX model")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the session on the call's tensors; returns a tensor, or a tuple of tensors."""
        outputs = self.session.run(list(self.output_names), self._feeds(args, kwargs))
        tensors = tuple(torch.from_numpy(np.asarray(o)) for o in outputs)
        return tensors if self._as_tuple else tensors[0]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("session", None)  # sessions do not pickle: rebuilt from the bytes (deepcopy, torch.save)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session = _session(self._bytes, self.threads)

    def extra_repr(self) -> str:
        return f"inputs={list(self.input_names)}, outputs={list(self.output_names)}, bytes={self.size_bytes}"


class OrtFloatModel(OrtModel):
    """The fp32 ONNX export of a network, run by ONNX Runtime (a baseline for int8, or a float deployment)."""


class OrtInt8Model(OrtModel):
    """An int8 ONNX model (ORT's QDQ or dynamic layout) run by ONNX Runtime, called like the original network.

    Args:
        onnx_bytes: The serialized quantized ONNX model.
        threads: ``intra_op_num_threads`` of the session.
        seeded_layers: Layers whose input scale and weight grid came from the fake-quant model.
        float_layers: Conv/Linear layers deliberately left in float.
        timings: Seconds per conversion step.

    Attributes:
        mode: ``"static"`` or ``"dynamic"`` (read from the model's metadata).
        quantized_layers: Int8 layers per ONNX op type, counted from the graph (``count_quantized_layers``).
    """

    def __init__(
        self,
        onnx_bytes: bytes,
        threads: int = 1,
        *,
        seeded_layers: Sequence[str] = (),
        float_layers: Sequence[str] = (),
        timings: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(onnx_bytes, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.mode: str = meta.get(MODE_KEY, "static")
        self.quantized_layers: dict[str, int] = count_quantized_layers(self._bytes)
        self.seeded_layers: tuple[str, ...] = tuple(seeded_layers)
        self.float_layers: tuple[str, ...] = tuple(float_layers)
        self.timings: dict[str, float] = dict(timings or {})

    @property
    def num_quantized_layers(self) -> int:
        """How many Conv/Gemm/MatMul layers of the graph compute with int8 weights."""
        return sum(self.quantized_layers.values())

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, quantized_layers={self.quantized_layers}, {super().extra_repr()}"


def load_onnx_int8(path: str | os.PathLike[str], threads: int = 1) -> OrtInt8Model:
    """Load an int8 ``.onnx`` file (e.g. written by ``OrtInt8Model.save``) as a callable ``OrtInt8Model``.

    Args:
        path: The ``.onnx`` file.
        threads: ``intra_op_num_threads`` of the session.

    Returns:
        The model, called like the network it was converted from.
    """
    return OrtInt8Model(Path(path).read_bytes(), threads)


def load_onnx(path: str | os.PathLike[str], threads: int = 1) -> OrtModel:
    """Load an ``.onnx`` file: an ``OrtInt8Model`` if its graph has int8 layers, else an ``OrtFloatModel``."""
    data = Path(path).read_bytes()
    return OrtInt8Model(data, threads) if count_quantized_layers(data) else OrtFloatModel(data, threads)


# --------------------------------------------------------------------------------------------------------------------
# Reading the graph
# --------------------------------------------------------------------------------------------------------------------


def _as_proto(model: bytes | str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    onnx, _ = _import_ort()
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    return model


def count_quantized_layers(model: bytes | str | os.PathLike[str] | onnx.ModelProto) -> dict[str, int]:
    """Count the layers of an ONNX graph that compute with int8 weights, by op type.

    Counted: fused int8 ops (``QLinearConv``, ``QGemm``, ``MatMulInteger``, ``ConvInteger``...) and QDQ
    ``Conv``/``Gemm``/``MatMul`` nodes whose weight input is a ``DequantizeLinear`` of an int8 initializer (the form
    ``quantize_static`` writes and ORT fuses when it loads the model). A MatMul of two activations is not counted.

    Args:
        model: An ONNX model (bytes, a path or a ``ModelProto``).

    Returns:
        ``{op_type: count}``, e.g. ``{"Conv": 9, "Gemm": 1}``; empty for a float model.
    """
    proto = _as_proto(model)
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    int8_weight_dq = {
        n.output[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in initializers
        and initializers[n.input[0]].data_type in (2, 3)
    }  # TensorProto.UINT8 = 2, INT8 = 3
    counts: dict[str, int] = {}
    for node in graph.node:
        quantized = node.op_type in _INT8_OPS or (
            node.op_type in _LAYER_OPS and len(node.input) > 1 and node.input[1] in int8_weight_dq
        )
        if quantized:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


#: Ops between a float tensor and the layer that produces it that stay float with it (``head(x) * scale``, a ReLU
#: or pooling before a layer kept in float, a reshape).
_TAIL_OPS = (
    "Mul", "Add", "Sub", "Div", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Reshape", "Flatten",
    "Transpose", "Squeeze", "Unsqueeze", "Identity",
)  # fmt: skip
# (Clip: ReLU6. ORT drops a quantized Relu or Clip, its uint8 grid doing the clamping; a float tensor needs it back.)


def _unquantize(graph: Any, name: str) -> bool:
    """Remove the ``QuantizeLinear -> DequantizeLinear`` pairs that produce the tensor ``name``, back through the
    ops of ``_TAIL_OPS`` to the layer that computes it (in place); whether a layer was reached."""
    pending, reached_layer = [name], False
    for _ in range(32):  # a short chain of ops
        if not pending:
            break
        current = pending.pop()
        producer = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, int] = {}
        for node in graph.node:
            for inp in node.input:
                consumers[inp] = consumers.get(inp, 0) + 1
        node = producer.get(current)
        if node is None:
            continue
        if node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            if q is None or q.op_type != "QuantizeLinear" or consumers.get(q.output[0], 0) != 1:
                continue
            source = q.input[0]
            layer = producer.get(source)
            if layer is None or consumers.get(source, 0) != 1:
                continue
            layer.output[list(layer.output).index(source)] = current
            graph.node.remove(q)
            graph.node.remove(node)
            node = layer
        if node.op_type in _LAYER_OPS or node.op_type in _INT8_OPS:
            reached_layer = True
        elif node.op_type in _TAIL_OPS:
            pending.extend(i for i in node.input if i in producer and consumers.get(i, 0) == 1)
    return reached_layer


def _tail_nodes(proto: onnx.ModelProto, tensors: Iterable[str]) -> list[str]:
    """Names of the ``_TAIL_OPS`` nodes between each tensor and the layer(s) computing it, in the float graph.

    They are excluded from quantization before ``_unquantize`` strips the Q/DQ pairs around them: ORT drops a
    quantized ``Relu`` (the uint8 grid clamps at zero), which a float tensor needs back."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    found: list[str] = []
    pending = list(tensors)
    while pending and len(found) < 64:
        node = producer.get(pending.pop())
        if node is None or node.op_type not in _TAIL_OPS or node.name in found:
            continue
        found.append(node.name)
        pending.extend(i for i in node.input if i in producer)
    return found


def _keep_outputs_float(proto: onnx.ModelProto) -> list[str]:
    """Remove the ``QuantizeLinear -> DequantizeLinear`` pairs between the last layer and the graph outputs (in
    place), also through elementwise/shape ops after that layer (``head(x) * scale``): the last layer's output, and
    what is computed from it, stay float, as in the fake-quant model.

    Returns:
        The output names that are now produced in float by their layer.
    """
    return [output.name for output in proto.graph.output if _unquantize(proto.graph, output.name)]


def _keep_inputs_float(proto: onnx.ModelProto, nodes: Sequence[str]) -> None:
    """The activation input of each node in ``nodes`` (layers kept in float) unquantized too, back to the layer that
    computes it: a float layer computes on the float tensor, as in the fake-quant model (an outlier channel that
    ruins the uint8 grid of a layer's input is why the accuracy-aware fallback keeps that layer float)."""
    by_name = {node.name: node for node in proto.graph.node}
    for name in nodes:
        node = by_name.get(name)
        if node is not None and node.input:
            _unquantize(proto.graph, node.input[0])


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


class _Call(nn.Module):
    """Exports ``net`` called with the example's tensors as named inputs (its keyword arguments included)."""

    def __init__(self, net: nn.Module, names: Sequence[str], keyword: Sequence[bool], fixed: Mapping[str, Any]):
        super().__init__()
        self.net = net
        self.names, self.keyword, self.fixed = list(names), list(keyword), dict(fixed)

    def forward(self, *tensors: Tensor) -> Any:
        args = [t for t, kw in zip(tensors, self.keyword, strict=True) if not kw]
        kwargs = {n: t for n, t, kw in zip(self.names, tensors, self.keyword, strict=True) if kw}
        return self.net(*args, **kwargs, **self.fixed)


def _bind(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[str], list[Tensor], _Call]:
    """ONNX input names (the ``forward`` parameter names), the tensors, and the module to export."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise OrtConversionError(f"`example_args`/`example_kwargs` do not match the model's forward: {err}") from err
    names: list[str] = []
    tensors: list[Tensor] = []
    keyword: list[bool] = []
    fixed: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            for i, item in enumerate(value):
                _check_tensor(f"{name}[{i}]", item)
                names.append(f"{name}_{i}")
                tensors.append(item)
                keyword.append(False)
            continue
        items = value.items() if kind == inspect.Parameter.VAR_KEYWORD else [(name, value)]
        for key, item in items:
            if item is None or isinstance(item, (bool, int, float, str)):
                fixed[key] = item  # baked into the graph, like a default
                continue
            _check_tensor(key, item)
            names.append(key)
            tensors.append(item)
            # by keyword unless positional-only: an omitted parameter before it cannot shift it
            keyword.append(kind != inspect.Parameter.POSITIONAL_ONLY)
    return names, tensors, _Call(model, names, keyword, fixed).eval()  # export restores this mode on `model`


def _check_tensor(name: str, value: Any) -> None:
    if not isinstance(value, Tensor):
        raise OrtConversionError(
            f"The argument `{name}` is a {type(value).__name__}; only tensors (and None/bool/int/float/str constants, "
            "baked into the graph) can be ONNX inputs."
        )


def _first_lines(err: BaseException, n: int = 4) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:n])[:800]


def _with_batch(tensor: Tensor, batch: int) -> Tensor:
    if tensor.dim() == 0:
        return tensor
    reps = -(-batch // tensor.shape[0])
    return tensor.repeat(reps, *([1] * (tensor.dim() - 1)))[:batch]


def _flatten_outputs(out: Any) -> tuple[list[Tensor], str]:
    if isinstance(out, Tensor):
        return [out], "tensor"
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, Tensor) for o in out):
        return list(out), "tuple"
    raise OrtConversionError(
        f"The model returns {type(out).__name__}; the ONNX backend supports a tensor or a tuple/list of tensors."
    )


@dataclass
class _Export:
    proto: onnx.ModelProto
    input_names: list[str]
    prefix: str  # the module path of the network inside the exported wrapper


def _onnx_export(
    model: nn.Module, wrapper: _Call, names: list[str], tensors: list[Tensor], output_names: list[str], dims: set[int]
) -> Any:
    """One ``torch.onnx.export`` (TorchScript-based): the batch dimension, and every other input dimension whose
    size is in ``dims``, exported dynamic (one symbol per size, so ``H == W`` stays one symbol)."""
    onnx, _ = _import_ort()

    def axes(t: Tensor) -> dict[int, str]:
        return {d: "batch" if d == 0 else f"dim_{n}" for d, n in enumerate(t.shape) if d == 0 or n in dims}

    dynamic_axes = {n: axes(t) for n, t in zip(names, tensors, strict=True) if t.dim() > 0}
    dynamic_axes.update({n: {0: "batch"} for n in output_names})
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # the fused transformer inference kernel has no ONNX form: export the composite ops
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
            torch.onnx.export(
                wrapper,
                tuple(tensors),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
                dynamo=False,
                input_names=names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )
    except Exception as err:
        raise OrtConversionError(
            f"torch.onnx.export (TorchScript-based, opset {OPSET}) cannot export {type(model).__name__}: "
            f"{type(err).__name__}: {_first_lines(err)}"
        ) from err
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return onnx.load_from_string(buffer.getvalue())


def _eager_sizes(wrapper: _Call, tensors: list[Tensor]) -> dict[int, int]:
    """``{size: other size}`` for the non-batch input sizes the network also runs at in eager (sequence lengths,
    image sizes); a size it fails at (e.g. the input of a flatten -> Linear head) stays fixed."""
    sizes = sorted({n for t in tensors if t.dim() > 1 for n in t.shape[1:] if n >= 2})
    found: dict[int, int] = {}
    with torch.no_grad():
        for size in sizes:
            for other in (size // 2, size + size // 2):
                try:
                    wrapper(*[resize_size(t, size, other) for t in tensors])
                except Exception:  # this size is fixed for the network: try the next
                    continue
                found[size] = other
                break
    return found


def _matches_eager(proto: Any, wrapper: _Call, tensors: list[Tensor]) -> bool:
    try:
        with torch.no_grad():
            expected, _ = _flatten_outputs(wrapper(*tensors))
        model = OrtFloatModel(proto.SerializeToString())
        model.session = _session(model.onnx_bytes, 1, quiet=True)
        got = model(*tensors)
        got_list = list(got) if isinstance(got, tuple) else [got]
        return all(
            tuple(e.shape) == tuple(g.shape) and torch.allclose(e.float(), g.float(), rtol=1e-3, atol=1e-4)
            for e, g in zip(expected, got_list, strict=True)
        )
    except Exception:
        return False


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], check_batch: bool = True) -> _Export:
    """``torch.onnx.export`` of a float model with a dynamic batch (checked at another batch) and dynamic
    sequence/spatial sizes where the network runs at another size and the export computes what
    eager does there (each such size checked; the others stay fixed). The dynamic dimensions are recorded in the
    model's metadata (``DYNAMIC_KEY``)."""
    names, tensors, wrapper = _bind(model, args, kwargs)
    with torch.no_grad():
        reference = model(*args, **kwargs)
    outputs, kind = _flatten_outputs(reference)
    output_names = ["output"] if kind == "tensor" else [f"output_{i}" for i in range(len(outputs))]
    output_names_with_dims = [n for n, t in zip(output_names, outputs, strict=True) if t.dim() > 0]
    others = _eager_sizes(wrapper, tensors)
    proto = None
    if others:
        try:
            proto = _onnx_export(model, wrapper, names, tensors, output_names_with_dims, set(others))
        except OrtConversionError:
            proto = None  # dynamic sizes the exporter cannot take: fixed sizes below
        if proto is not None:
            working = {
                n for n, m in others.items() if _matches_eager(proto, wrapper, [resize_size(t, n, m) for t in tensors])
            }
            if working != set(others):  # a size traced into the graph as a constant: export again without it
                others = {n: m for n, m in others.items() if n in working}
                proto = (
                    _onnx_export(model, wrapper, names, tensors, output_names_with_dims, set(others))
                    if others
                    else None
                )
    if proto is None:
        others = {}
        proto = _onnx_export(model, wrapper, names, tensors, output_names_with_dims, set())
    shapes = {
        n: ["batch" if d == 0 else f"dim_{k}" if k in others else k for d, k in enumerate(t.shape)]
        for n, t in zip(names, tensors, strict=True)
    }
    _set_metadata(proto, {OUTPUT_KIND_KEY: kind, FIXED_KEY: json.dumps(wrapper.fixed), DYNAMIC_KEY: json.dumps(shapes)})
    if check_batch and any(t.dim() > 0 for t in tensors):
        _check_dynamic_batch(model, proto, names, tensors, kwargs, wrapper)
    return _Export(proto, names, "net.")


def _check_dynamic_batch(
    model: nn.Module, proto: onnx.ModelProto, names: list[str], tensors: list[Tensor], kwargs: Any, wrapper: _Call
) -> None:
    """Run the float export at ``batch + 1`` and compare with eager: a batch size traced into the graph shows here."""
    batch = next(t.shape[0] for t in tensors if t.dim() > 0) + 1
    resized = [_with_batch(t, batch) for t in tensors]
    try:
        with torch.no_grad():
            expected, _ = _flatten_outputs(wrapper(*resized))
        session = OrtFloatModel(proto.SerializeToString())
        got = session(*resized)
        got_list = list(got) if isinstance(got, tuple) else [got]
        for e, g in zip(expected, got_list, strict=True):
            if tuple(e.shape) != tuple(g.shape) or not torch.allclose(e.float(), g.float(), rtol=1e-3, atol=1e-4):
                diff = (e.float() - g.float()).abs().max() if e.shape == g.shape else float("nan")
                raise ValueError(f"output shape {tuple(g.shape)} vs eager {tuple(e.shape)}, max difference {diff:.3g}")
    except Exception as err:
        raise OrtConversionError(
            f"The ONNX export of {type(model).__name__} does not take another batch size (batch {batch}: "
            f"{_first_lines(err, 2)}). The batch size was probably traced into the graph as a constant, e.g. "
            "`x.view(batch_size, -1)` or a Python int taken from `x.shape[0]`; use `x.flatten(1)` or "
            "`x.reshape(x.shape[0], -1)` (the tracer records `x.shape[0]` as dynamic)."
        ) from err


def _set_metadata(proto: onnx.ModelProto, values: Mapping[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def _call_of(item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(item, ModelCall):
        return tuple(item.args), dict(item.kwargs)
    if isinstance(item, Tensor):
        return (item,), {}
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    if isinstance(item, dict):
        return (), dict(item)
    raise OrtConversionError(
        "Each item of `calibration` must be the model's input: a Tensor, a tuple of positional arguments, a dict of "
        f"keyword arguments or a ModelCall(args, kwargs), got {type(item).__name__}."
    )


def _float_copy(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model)
    if is_prepared(net):
        strip_qat(net)
    return net.eval().cpu()


def export_onnx(
    model: nn.Module,
    example_args: Any,
    path: str | os.PathLike[str] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    threads: int = 1,
) -> OrtFloatModel:
    """Export the float computation of ``model`` (a copy; fake quantization stripped) to ONNX with a dynamic batch.

    Args:
        model: A float, pruned/compact or QAT-prepared network (not modified).
        example_args: Positional example input(s) (a Tensor or a tuple).
        path: Where to write the ``.onnx`` file (atomically); ``None`` writes nothing.
        example_kwargs: Keyword example inputs (their tensors become named ONNX inputs).
        threads: ``intra_op_num_threads`` of the returned session.

    Returns:
        The fp32 model run by ONNX Runtime.

    Raises:
        OrtConversionError: If the exporter fails (its reason quoted) or the batch size is not dynamic.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> ort_fp32 = export_onnx(net, torch.randn(2, 4))
        >>> ort_fp32(torch.randn(5, 4)).shape
        torch.Size([5, 2])
    """
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    exported = _export(_float_copy(model), args, dict(example_kwargs or {}))
    result = OrtFloatModel(exported.proto.SerializeToString(), threads)
    if path is not None:
        result.save(path)
    return result


# --------------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------------


def resolve_mode(model: nn.Module, mode: str = "auto") -> str:
    """``"static"`` or ``"dynamic"`` for ``model``: ``"auto"`` is dynamic for attention and Linear-only models.

    Static int8 pays off where ORT fuses quantized convolutions and residual adds; attention (an
    ``nn.MultiheadAttention`` or transformer layer) and models without convolutions get dynamic int8 (weights int8,
    activations quantized per batch), which keeps attention internals float.

    Examples:
        >>> from torch import nn
        >>> resolve_mode(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
        'static'
        >>> resolve_mode(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        'dynamic'
    """
    check_choice("mode", mode, get_args(OrtMode))
    if mode != "auto":
        return mode
    attention = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    modules = list(model.modules())
    if any(isinstance(m, attention) for m in modules):
        return "dynamic"
    convs = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in modules)
    return "static" if convs else "dynamic"


def _has_attention(model: nn.Module, proto: onnx.ModelProto | None = None) -> bool:
    """Whether the network computes attention: a torch attention module, or (for attention written by hand, as in
    Hugging Face BERT or LitGPT) a Softmax or a MatMul of two activations in the exported graph."""
    attention = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    if any(isinstance(m, attention) for m in model.modules()):
        return True
    if proto is None:
        return False
    constants = {i.name for i in proto.graph.initializer} | {
        o for n in proto.graph.node if n.op_type == "Constant" for o in n.output
    }
    return any(
        node.op_type == "Softmax" or (node.op_type == "MatMul" and not any(i in constants for i in node.input))
        for node in proto.graph.node
    )


def _unqualified(name: str) -> str:
    """The scope name the TorchScript exporter gives the module at ``name`` (``torch.onnx.utils``' rule)."""
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def _scope(name: str, containers: Collection[str] = ()) -> str:
    """``"stage1.body.0.0"`` -> ``"/stage1/body/body.0/body.0.0/"`` (the prefix of that module's node names).

    The exporter opens a scope for each *called* module only: ``containers`` names the ancestors that are never
    called (``nn.ModuleList``/``nn.ModuleDict``, only iterated or indexed), which get no scope, so
    ``"encoder.layer.0.attention"`` with ``containers={"encoder.layer"}`` is ``"/encoder/layer.0/attention/"``.
    """
    atoms = name.split(".")
    prefixes = [".".join(atoms[: i + 1]) for i in range(len(atoms))]
    return "/" + "/".join(_unqualified(p) for p in prefixes if p not in containers) + "/"


def _containers(model: nn.Module, prefix: str) -> set[str]:
    """Names (with ``prefix``) of the submodules that are never called: ``nn.ModuleList`` and ``nn.ModuleDict``."""
    return {prefix + n for n, m in model.named_modules() if n and isinstance(m, (nn.ModuleList, nn.ModuleDict))}


def _layer_nodes(proto: onnx.ModelProto, model: nn.Module, prefix: str) -> dict[str, list[Any]]:
    """Conv/Gemm/MatMul nodes (with a weight initializer) by the name of the Linear/Conv module they come from."""
    initializers = {i.name for i in proto.graph.initializer}
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    skip = _containers(model, prefix)
    scopes = {
        _scope(prefix + name, skip): name for name, m in model.named_modules() if name and isinstance(m, layer_types)
    }
    found: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        if node.op_type not in _LAYER_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        module = scopes.get(node.name.rsplit("/", 1)[0] + "/")
        if module is not None:
            found.setdefault(module, []).append(node)
    return found


def _qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 ``(scale, zero_point)`` of ``[lo, hi]`` widened to include 0: the fake-quant formula."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, ACTIVATION_EPS)
    zero_point = int(min(max(-round(lo / scale), 0), 255))
    return float(np.float32(scale)), zero_point


def _weight_axis(node: Any) -> int:
    """The output-channel axis of a node's weight: 0 for Conv and ``Gemm(transB=1)``, 1 for MatMul (``[in, out]``)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type == "MatMul" else 0


def _unsimulated(proto: onnx.ModelProto, layers: Mapping[str, list[Any]], fq: Mapping[str, Any]) -> list[str]:
    """Weight-layer nodes that no fake-quant module simulated (e.g. ``nn.MultiheadAttention``'s packed
    ``in_proj_weight``, which is no Linear module): QAT trained them in float, so they stay float."""
    simulated = {node.name for name, nodes in layers.items() if name in fq for node in nodes}
    weights = {i.name for i in proto.graph.initializer}
    return [
        node.name
        for node in proto.graph.node
        if node.op_type in _LAYER_OPS and node.input[1:2] and node.input[1] in weights and node.name not in simulated
    ]


def _seed_overrides(
    proto: onnx.ModelProto, layers: Mapping[str, list[Any]], fq: Mapping[str, FakeQuantModule], model: nn.Module
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """``TensorQuantOverrides`` carrying each fake-quant layer's input qparams and weight grid into ORT."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    ranges = activation_ranges(model)
    inputs: dict[str, tuple[float, float]] = {}
    overrides: dict[str, list[dict[str, Any]]] = {}
    seeded = []
    for name, nodes in layers.items():
        module = fq.get(name)
        if module is None:
            continue
        if module.quant_config.weight_bits != 8:
            raise OrtConversionError(
                f"The layer `{name}` was trained with {module.quant_config.weight_bits}-bit weights; the ONNX Runtime "
                "backend runs 8-bit weights only. Use backend 'inductor' or QAT with weight_bits=8."
            )
        for node in nodes:
            weight = numpy_helper.to_array(initializers[node.input[1]])
            axis = _weight_axis(node)
            scales, _ = weight_qparams(torch.from_numpy(np.moveaxis(weight, axis, 0).copy()))
            overrides[node.input[1]] = [
                {"axis": axis, "scale": np.array(s, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}
                for s in scales.tolist()
            ]
            if name in ranges:
                lo, hi = ranges[name]
                old = inputs.get(node.input[0])
                inputs[node.input[0]] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        if name in ranges:
            seeded.append(name)
    for tensor, (lo, hi) in inputs.items():  # one tensor feeding two layers: the union of their ranges
        scale, zero_point = _qparams(lo, hi)
        overrides[tensor] = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zero_point, np.uint8)}]
    return overrides, seeded


def _attention_internals(proto: onnx.ModelProto, model: nn.Module, prefix: str) -> list[str]:
    """Nodes static int8 must leave float (DESIGN §7): Softmax, LayerNormalization, MatMuls of two activations, and
    everything inside an attention module except its weight layers (so that q, k, v and the scores stay float)."""
    initializers = {i.name for i in proto.graph.initializer}
    constants = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    skip = _containers(model, prefix)
    scopes = tuple(
        _scope(prefix + n, skip) for n, m in model.named_modules() if n and isinstance(m, nn.MultiheadAttention)
    )
    kept = []
    for node in proto.graph.node:
        weight_layer = node.op_type in _LAYER_OPS and len(node.input) > 1 and node.input[1] in initializers
        if (
            node.op_type in ("Softmax", "LayerNormalization")
            or (node.op_type == "MatMul" and not any(i in initializers or i in constants for i in node.input))
            or (node.name.startswith(scopes) and not weight_layer)
        ):
            kept.append(node.name)
    return kept


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._iter = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def _feeds(
    calibration: Iterable[Any] | None, example: tuple[tuple[Any, ...], dict[str, Any]], names: list[str], limit: int
) -> list[dict[str, np.ndarray]]:
    items = [example] if calibration is None else [_call_of(item) for item in calibration]
    feeds = []
    for args, kwargs in items[:limit]:
        bound_names, tensors, _ = _bind_loose(names, args, kwargs)
        feeds.append(
            {
                n: t.detach().cpu().float().numpy() if t.is_floating_point() else t.cpu().numpy()
                for n, t in zip(bound_names, tensors, strict=True)
            }
        )
    if not feeds:
        raise OrtConversionError("`calibration` is empty; give at least one batch (or None to use the example call).")
    return feeds


def _bind_loose(
    names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[str], list[Tensor], None]:
    tensors_by_name = dict(zip(names, [a for a in args if isinstance(a, Tensor)], strict=False))
    tensors_by_name.update({k: v for k, v in kwargs.items() if isinstance(v, Tensor) and k in names})
    missing = [n for n in names if n not in tensors_by_name]
    if missing:
        raise OrtConversionError(
            f"A calibration item lacks the input(s) {missing}; the model was exported with {names}."
        )
    return names, [tensors_by_name[n] for n in names], None


def _pre_process(proto: onnx.ModelProto, folder: Path) -> tuple[Path, str]:
    """``quant_pre_process``; symbolic shape inference is skipped when it fails (e.g. on attention reshapes)."""
    from onnxruntime.quantization import quant_pre_process

    onnx, _ = _import_ort()
    source, target = folder / "float.onnx", folder / "prepared.onnx"
    onnx.save(proto, source)
    try:
        quant_pre_process(str(source), str(target))
        return target, "full"
    except Exception:
        try:
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
            return target, "no symbolic shapes"
        except Exception:
            return source, "skipped"


def convert_to_onnx_int8(
    model: nn.Module,
    example_args: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    mode: str = "auto",
    calibration: Iterable[Any] | None = None,
    calibration_batches: int = 32,
    seed_from_fake_quant: bool = True,
    keep_output_float: bool = True,
    float_layers: Sequence[str] = (),
    threads: int = 1,
    compact: Callable[[nn.Module], nn.Module] | None = None,
    quantize_embeddings: bool = True,
) -> OrtInt8Model:
    """Build an int8 model run by ONNX Runtime from a copy of ``model``; ``model`` itself is not modified.

    Args:
        model: A float network, or one prepared by ``prepare_qat`` (its
            stripped float copy is exported; with ``seed_from_fake_quant`` the int8 model uses the ranges and weight
            grid QAT trained with, and leaves float what QAT left float).
        example_args: Positional example input(s) (a Tensor or a tuple); the batch dimension (0) is exported dynamic.
        example_kwargs: Keyword example inputs; their tensors become named inputs (``forward`` parameter names).
        mode: ``"static"`` (conv nets: ORT fuses QLinearConv/QLinearAdd), ``"dynamic"`` (Linear-heavy and attention
            models) or ``"auto"`` (``resolve_mode``).
        calibration: Iterable of calls (a Tensor, a tuple of positional arguments, a dict of keywords or a
            ``ModelCall``) for the static ranges that are not seeded;
            ``None`` uses the example call. Ignored in dynamic mode.
        calibration_batches: At most this many items of ``calibration`` are used.
        seed_from_fake_quant: For a QAT-prepared model, carry its observers' input qparams and its weight grid.
        keep_output_float: Leave the graph outputs unquantized (the last layer's output stays float).
        float_layers: Names of Linear/Conv modules of ``model`` to keep in float (their nodes are excluded from
            quantization), e.g. the layers the accuracy-aware fallback of ``PostTrainingQuantCallback`` picks.
            A QAT-prepared model also keeps in float every layer QAT kept in float.
        threads: ``intra_op_num_threads`` of the session.
        compact: Applied to the stripped float copy before export, e.g. a ``structured.ChannelRemoval`` so that
            the int8 model is the channel-pruned network with its pruned channels removed. It must keep module
            names: the QAT ranges are carried by name, and the weight grid is recomputed from the kept weights.
        quantize_embeddings: Also store the embedding tables (``Gather`` of a weight initializer) as int8, per
            row: in a small transformer they are a third to a half of the file.

    Returns:
        The ``OrtInt8Model``, called like ``model``.

    Raises:
        OrtConversionError: If the exporter fails (its reason quoted), the batch dimension is not dynamic, ORT cannot
            quantize the graph, or a QAT layer uses 4-bit weights.
        ValueError: For an unknown ``mode`` or an argument of the wrong type.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        >>> x = torch.randn(16, 1, 8, 8)
        >>> int8 = convert_to_onnx_int8(net, x, mode="static")
        >>> int8.mode, int8.quantized_layers, int8(x[:3]).shape
        ('static', {'Conv': 1, 'Gemm': 1}, torch.Size([3, 4]))
    """
    onnx, _ = _import_ort()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    resolved = resolve_mode(model, mode)
    check_bool("seed_from_fake_quant", seed_from_fake_quant)
    check_bool("keep_output_float", keep_output_float)
    check_bool("quantize_embeddings", quantize_embeddings)
    check_positive_int("calibration_batches", calibration_batches)
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    timings: dict[str, float] = {}
    start = time.perf_counter()
    net = _float_copy(model)
    if compact is not None:
        net = compact(net).eval()
    fq = fake_quant_modules(model) if seed_from_fake_quant else {}
    exported = _export(net, args, kwargs)
    timings["export"] = time.perf_counter() - start
    layers = _layer_nodes(exported.proto, net, exported.prefix)
    if isinstance(float_layers, str):
        raise ValueError(f"`float_layers` must be a list of module names, got the string {float_layers!r}.")
    modules = dict(net.named_modules())
    unknown = [name for name in float_layers if name not in modules]
    if unknown:
        raise ValueError(f"`float_layers` names modules that {type(model).__name__} does not have: {unknown}.")
    wanted = set(float_layers)
    kept_float = [name for name in layers if (fq and name not in fq) or name in wanted]
    exclude = [node.name for name in kept_float for node in layers[name]]
    seeded: list[str] = []
    # ORT's quantization tools write scratch files (shape inference, external data) to the working directory:
    # run them inside the temporary folder, so nothing is left in the user's.
    with tempfile.TemporaryDirectory(prefix="lc_ort_") as tmp, contextlib.chdir(tmp):
        folder = Path(tmp)
        tick = time.perf_counter()
        prepared, _ = _pre_process(exported.proto, folder)
        timings["pre_process"] = time.perf_counter() - tick
        proto = onnx.load(str(prepared))
        layers = _layer_nodes(proto, net, exported.prefix)  # re-read: pre-processing may rename initializers
        if fq:
            exclude = list(dict.fromkeys([*exclude, *_unsimulated(proto, layers, fq)]))
        target = folder / "int8.onnx"
        tick = time.perf_counter()
        try:
            if resolved == "static":
                by_name = {node.name: node for node in proto.graph.node}
                float_inputs = [by_name[n].input[0] for n in exclude if n in by_name and by_name[n].input]
                outputs = [o.name for o in proto.graph.output] if keep_output_float else []
                tail = _tail_nodes(proto, [*float_inputs, *outputs])
                overrides: dict[str, list[dict[str, Any]]] = {}
                if fq:
                    overrides, seeded = _seed_overrides(proto, layers, fq, model)
                reader = _Reader(_feeds(calibration, (args, kwargs), exported.input_names, calibration_batches))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_static(
                        str(prepared),
                        str(target),
                        reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        reduce_range=False,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude + tail + _attention_internals(proto, net, exported.prefix),
                        # attention models: only the weight layers (their masks hold -inf; DESIGN §7)
                        op_types_to_quantize=(
                            [*_LAYER_OPS, *(["Gather"] if quantize_embeddings else [])]
                            if _has_attention(net, proto)
                            else None
                        ),
                        extra_options={"TensorQuantOverrides": overrides} if overrides else {},
                    )
            else:
                gemms = {node.name: node.op_type == "Gemm" for node in proto.graph.node}
                overrides = {}
                if fq:  # activations are quantized per batch: only the weight grid can be carried over
                    overrides, _ = _seed_overrides(proto, layers, fq, model)
                    overrides = {k: v for k, v in overrides.items() if "axis" in v[0]}
                quantize_dynamic(
                    str(prepared),
                    str(target),
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", *(["Gather"] if quantize_embeddings else [])],
                    # quantize_dynamic first rewrites every Gemm as `<name>_MatMul` + Add: exclude that name too
                    nodes_to_exclude=[*exclude, *(f"{n}_MatMul" for n in exclude if gemms.get(n))],
                    extra_options={
                        "MatMulConstBOnly": True,
                        **({"TensorQuantOverrides": overrides} if overrides else {}),
                    },
                )
        except OrtConversionError:
            raise
        except Exception as err:
            raise OrtConversionError(
                f"onnxruntime.quantization.quantize_{resolved} failed on {type(model).__name__}: "
                f"{type(err).__name__}: {_first_lines(err)}"
            ) from err
        timings["quantize"] = time.perf_counter() - tick
        result = onnx.load(str(target))
    if resolved == "static" and wanted:  # layers the caller keeps float read float inputs too
        _keep_inputs_float(result, [node.name for name in kept_float if name in wanted for node in layers[name]])
    if keep_output_float and resolved == "static":
        _keep_outputs_float(result)
    _set_metadata(result, {MODE_KEY: resolved})
    timings["total"] = time.perf_counter() - start
    return OrtInt8Model(
        result.SerializeToString(), threads, seeded_layers=seeded, float_layers=kept_float, timings=timings
    )


# --------------------------------------------------------------------------------------------------------------------
# Choosing a backend by measurement
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendChoice:
    """Which int8 backend ``choose_backend`` kept, the measurements behind it, and why in one line.

    Attributes:
        backend: The fastest int8 backend (``None`` when no int8 candidate was given).
        fastest: The fastest candidate overall (may be a float one).
        int8_pays_off: Whether ``backend`` is faster than every float candidate.
        reason: One line, e.g. ``"onnxruntime int8 is 3.1x fp32 eager at batch 64, 7.6x at batch 1; ..."``.
        batch_sizes: The batch sizes timed.
        latency_ms: Median latency (ms) by candidate and batch size.
        speedup: ``eager_fp32`` latency / candidate latency by candidate and batch size (alternated pairs).
        score: Geometric mean of ``speedup`` over the batch sizes, by candidate.
    """

    backend: str | None
    fastest: str
    int8_pays_off: bool
    reason: str
    batch_sizes: tuple[int, ...]
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    speedup: dict[str, dict[int, float]] = field(default_factory=dict)
    score: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for JSON and reports)."""
        return {
            "backend": self.backend,
            "fastest": self.fastest,
            "int8_pays_off": self.int8_pays_off,
            "reason": self.reason,
            "batch_sizes": list(self.batch_sizes),
            "latency_ms": {k: {str(b): v for b, v in d.items()} for k, d in self.latency_ms.items()},
            "speedup": {k: {str(b): v for b, v in d.items()} for k, d in self.speedup.items()},
            "score": dict(self.score),
        }


def _label(name: str) -> str:
    return {"eager_fp32": "fp32 eager", "onnxruntime_fp32": "ORT fp32"}.get(name, f"{name} int8")


def choose_from_latencies(
    latency_ms: Mapping[str, Mapping[int, float]], speedup: Mapping[str, Mapping[int, float]] | None = None
) -> BackendChoice:
    """Pick the fastest int8 backend from measured latencies (the pure part of ``choose_backend``).

    Args:
        latency_ms: Median latency by candidate name and batch size; must contain ``"eager_fp32"``. Names in
            ``FLOAT_BACKENDS`` are float, every other name is an int8 backend.
        speedup: ``eager_fp32 / candidate`` by candidate and batch size when measured in alternated pairs; default:
            the ratio of the medians in ``latency_ms``.

    Returns:
        The ``BackendChoice``; candidates are ranked by the geometric mean of their speed-ups over the batch
        sizes.

    Raises:
        ValueError: If ``"eager_fp32"`` is missing or a candidate lacks a batch size.

    Examples:
        >>> choice = choose_from_latencies({
        ...     "eager_fp32": {1: 1.0, 64: 40.0},
        ...     "onnxruntime_fp32": {1: 0.3, 64: 12.0},
        ...     "onnxruntime": {1: 0.4, 64: 15.0},
        ...     "inductor": {1: 2.0, 64: 20.0},
        ... })
        >>> choice.backend, choice.fastest, choice.int8_pays_off
        ('onnxruntime', 'onnxruntime_fp32', False)
        >>> choice.reason.split(" (")[0]
        'int8 does not pay off for this model; ORT fp32 is faster'
    """
    if "eager_fp32" not in latency_ms:
        raise ValueError(f"`latency_ms` must contain 'eager_fp32' (the reference), got {sorted(latency_ms)}.")
    batch_sizes = tuple(sorted(latency_ms["eager_fp32"]))
    for name, by_batch in latency_ms.items():
        missing = [b for b in batch_sizes if b not in by_batch]
        if missing:
            raise ValueError(f"`latency_ms[{name!r}]` lacks the batch size(s) {missing}.")
    eager = latency_ms["eager_fp32"]
    ratios = {
        name: {
            b: (speedup[name][b] if speedup and name in speedup and b in speedup[name] else eager[b] / by_batch[b])
            for b in batch_sizes
        }
        for name, by_batch in latency_ms.items()
    }
    score = {
        name: math.exp(statistics.fmean([math.log(max(r, 1e-12)) for r in rs.values()])) for name, rs in ratios.items()
    }
    ranked = sorted(score, key=lambda n: -score[n])
    int8 = [n for n in ranked if n not in FLOAT_BACKENDS]
    floats = [n for n in ranked if n in FLOAT_BACKENDS]
    fastest = ranked[0]
    backend = int8[0] if int8 else None

    def numbers(name: str) -> str:
        return ", ".join(f"{ratios[name][b]:.2f}x at batch {b}" for b in sorted(batch_sizes, reverse=True))

    if backend is None:
        reason = f"no int8 candidate; {_label(fastest)} is the fastest ({numbers(fastest)} vs fp32 eager)"
        pays = False
    else:
        others = "; ".join(f"{_label(n)}: {numbers(n)}" for n in ranked if n not in (backend, "eager_fp32"))
        best_float = floats[0] if floats else "eager_fp32"
        pays = score[backend] > score[best_float]
        if pays:
            reason = f"{_label(backend)} is {numbers(backend)} vs fp32 eager"
        elif best_float == "onnxruntime_fp32":
            reason = f"int8 does not pay off for this model; ORT fp32 is faster ({numbers(best_float)} vs fp32 eager)"
            others = "; ".join(f"{_label(n)}: {numbers(n)}" for n in ranked if n not in (best_float, "eager_fp32"))
        else:
            reason = (
                f"int8 does not pay off for this model; fp32 eager is faster ({_label(backend)}: {numbers(backend)})"
            )
            others = "; ".join(f"{_label(n)}: {numbers(n)}" for n in ranked if n not in (backend, "eager_fp32"))
        if others:
            reason += f"; {others}"
    return BackendChoice(
        backend=backend,
        fastest=fastest,
        int8_pays_off=pays,
        reason=reason,
        batch_sizes=batch_sizes,
        latency_ms={n: {b: float(latency_ms[n][b]) for b in batch_sizes} for n in latency_ms},
        speedup=ratios,
        score=score,
    )


def choose_backend(
    candidates: Mapping[str, Callable[..., Any]],
    example_args: Any,
    batch_sizes: Sequence[int],
    *,
    example_kwargs: dict[str, Any] | None = None,
    warmup: int = 3,
    repeats: int = 15,
    threads: int = 1,
) -> BackendChoice:
    """Time already-built models side by side and keep the fastest int8 one.

    Each candidate is timed against ``candidates["eager_fp32"]`` with
    ``compare_latency`` (calls alternated, medians, ``threads`` threads) at
    every batch size (the example tensors repeated along dim 0), and ranked by the geometric mean of its speed-ups.

    Args:
        candidates: Callables by backend name, e.g. ``{"inductor": ..., "onnxruntime": ..., "onnxruntime_fp32": ...,
            "eager_fp32": ...}``; ``"eager_fp32"`` is required; names in ``FLOAT_BACKENDS`` are float.
        example_args: Positional example input(s) (a Tensor or a tuple).
        batch_sizes: Batch sizes to time (e.g. 1 and the validation batch size).
        example_kwargs: Keyword example inputs.
        warmup: Untimed alternated calls per pair (Inductor compiles here).
        repeats: Timed calls of each model per pair.
        threads: ``torch.set_num_threads`` during the timing (an ORT session has its own thread count).

    Returns:
        A ``BackendChoice`` with the numbers and a one-line reason.

    Raises:
        ValueError: If ``"eager_fp32"`` is missing or ``batch_sizes`` is empty.
    """
    if "eager_fp32" not in candidates:
        raise ValueError(f"`candidates` must contain 'eager_fp32' (the reference), got {sorted(candidates)}.")
    sizes = sorted({check_positive_int("batch_sizes", b) for b in batch_sizes})
    if not sizes:
        raise ValueError("`batch_sizes` must hold at least one batch size, got [].")
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    reference = candidates["eager_fp32"]
    latency: dict[str, dict[int, float]] = {name: {} for name in candidates}
    speedup: dict[str, dict[int, float]] = {name: {} for name in candidates}
    for batch in sizes:
        batch_args = tuple(_with_batch(a, batch) if isinstance(a, Tensor) else a for a in args)
        batch_kwargs = {k: _with_batch(v, batch) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        eager_medians = []
        for name, fn in candidates.items():
            if name == "eager_fp32":
                continue
            result = compare_latency(
                reference, fn, batch_args, warmup=warmup, repeats=repeats, threads=threads, kwargs=batch_kwargs
            )
            latency[name][batch] = result["b"]["median_ms"]
            speedup[name][batch] = result["speedup"]
            eager_medians.append(result["a"]["median_ms"])
        if not eager_medians:  # only the reference: time it alone
            result = compare_latency(
                reference, reference, batch_args, warmup=warmup, repeats=repeats, threads=threads, kwargs=batch_kwargs
            )
            eager_medians.append(result["a"]["median_ms"])
        latency["eager_fp32"][batch] = sorted(eager_medians)[len(eager_medians) // 2]
        speedup["eager_fp32"][batch] = 1.0
    return choose_from_latencies(latency, speedup)
