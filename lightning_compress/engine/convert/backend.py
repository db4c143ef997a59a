"""One int8 conversion for each backend of the callbacks, and the measured choice between them (``"auto"``).

``"inductor"`` is ``convert_to_int8`` (torchao pt2e, an ``ExportedProgram``
compiled by Inductor), ``"onnxruntime"`` is ``convert_to_onnx_int8`` (ORT's own
QDQ layout in an ``InferenceSession``, seeded from the fake-quant observers of a QAT model). ``"auto"`` builds both
and ``choose_int8`` times them side by side with ORT fp32 and fp32 eager
(``choose_backend``: alternated calls, 1 thread, batch 1 and the validation batch
size) and keeps the faster int8 one. ``onnx``/``onnxruntime`` are imported only for those backends.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from torch import nn

from lightning_compress.engine.config import BACKENDS, ConversionConfig
from lightning_compress.engine.convert.artifact import Int8Model, compile_int8
from lightning_compress.engine.convert.pipeline import convert_to_int8
from lightning_compress.engine.validation import check_choice

if TYPE_CHECKING:
    from lightning_compress.engine.ort import BackendChoice, OrtInt8Model

#: What a conversion returns: a pt2e ``Int8Model`` or an ORT ``OrtInt8Model``.
AnyInt8 = Union[Int8Model, "OrtInt8Model"]

__all__ = [
    "AnyInt8",
    "artifact_suffix",
    "backend_of",
    "check_backend",
    "choose_int8",
    "convert_auto",
    "convert_with_backend",
    "int8_module",
    "shapes_taken",
]


def check_backend(backend: Any, mode: str, weight_bits: int = 8, save_path: str | None = None) -> str:
    """Validate ``backend`` (naming the argument) and what the ONNX Runtime backend cannot run.

    Raises:
        ValueError: For an unknown backend, ``mode="weight_only"`` or 4-bit weights with ``"onnxruntime"``/``"auto"``,
            or a ``save_path`` whose suffix is the other backend's (``.pt2`` for ``"onnxruntime"``, ``.onnx`` for
            ``"inductor"``).

    Examples:
        >>> check_backend("auto", "static")
        'auto'
        >>> check_backend("tensorrt", "static")
        Traceback (most recent call last):
        ...
        ValueError: `backend` must be one of 'inductor', 'onnxruntime', 'auto', got 'tensorrt'.
    """
    check_choice("backend", backend, BACKENDS)
    if backend != "inductor" and mode == "weight_only":
        raise ValueError(
            f"`backend`={backend!r} cannot run `mode`='weight_only' (ONNX Runtime has no weight-only int8 layout): "
            "use backend='inductor', or mode='dynamic' (int8 weights, activations quantized at run time)."
        )
    if backend != "inductor" and weight_bits != 8:
        raise ValueError(
            f"`backend`={backend!r} runs 8-bit weights only, got `weight_bits`={weight_bits}: use backend='inductor' "
            "(4-bit weights are stored as int8 on their grid) or weight_bits=8."
        )
    if save_path is not None and backend != "auto":
        suffix = Path(save_path).suffix.lower()
        other = ".pt2" if backend == "onnxruntime" else ".onnx"
        if suffix == other:
            raise ValueError(
                f"`save_path`={save_path!r} has the suffix {other!r}, but `backend`={backend!r} writes a "
                f"{artifact_suffix(backend)!r} file: change the suffix (load_quantized dispatches on it)."
            )
    return str(backend)


def backend_of(int8: Any) -> str:
    """``"inductor"`` for an ``Int8Model``, ``"onnxruntime"`` for an ``OrtInt8Model``."""
    return "inductor" if isinstance(int8, Int8Model) else "onnxruntime"


def artifact_suffix(backend: str) -> str:
    """The file suffix of a backend's artifact: ``".onnx"`` for ``"onnxruntime"``, ``".pt2"`` for ``"inductor"``."""
    return ".onnx" if backend == "onnxruntime" else ".pt2"


def shapes_taken(int8: Any) -> str | None:
    """Which input shapes either backend's int8 model takes, as text (``"x: (batch, 3, dim_28, dim_28)"``: names
    are dynamic sizes, numbers fixed ones), or ``None`` when unknown."""
    from lightning_compress.engine.convert.export import describe_shapes

    shapes = getattr(int8, "input_shapes", None)
    return describe_shapes(shapes) if shapes else None


def int8_module(int8: Any) -> nn.Module:
    """The callable int8 network (called like the original one) of either backend's conversion."""
    return int8.module() if isinstance(int8, Int8Model) else int8


def convert_with_backend(
    backend: str,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    config: ConversionConfig,
    calibration: Iterable[Any] | None = None,
    float_layers: Sequence[str] = (),
    compact: Callable[[nn.Module], nn.Module] | None = None,
) -> AnyInt8:
    """Convert a copy of ``model`` with one backend (``"inductor"`` or ``"onnxruntime"``).

    Args:
        backend: ``"inductor"`` or ``"onnxruntime"``.
        model: A float or QAT-prepared network (not modified).
        args: Positional example inputs.
        kwargs: Keyword example inputs.
        config: Mode, observer, calibration batches (ORT uses ``mode`` and ``calibration_batches``; ORT static
            calibrates with its own min/max on ``calibration`` where QAT ranges do not seed it).
        calibration: Calibration items (``None``: the example call).
        float_layers: Module names kept in float.
        compact: Applied to the stripped float copy before export (``structured.ChannelRemoval``: convert the
            compact network).
    """
    if backend == "inductor":
        return convert_to_int8(
            model, args, kwargs, calibration_data=calibration, skip=float_layers, config=config, compact=compact
        )
    if backend != "onnxruntime":
        raise ValueError(f"`backend` must be 'inductor' or 'onnxruntime' here, got {backend!r}.")
    from lightning_compress.engine.ort import convert_to_onnx_int8

    return convert_to_onnx_int8(
        model,
        args,
        kwargs,
        mode=config.mode,
        calibration=None if calibration is None else list(calibration),
        calibration_batches=config.calibration_batches,
        float_layers=list(float_layers),
        compact=compact,
        quantize_embeddings=config.quantize_embeddings,
    )


def choose_int8(
    models: Mapping[str, AnyInt8],
    float_model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch_sizes: Sequence[int],
) -> BackendChoice:
    """Time the int8 ``models`` (by backend name) side by side with ORT fp32 and fp32 eager; keep the faster int8.

    Inductor programs are compiled for each batch shape (``dynamic=False``) during the untimed warm-up.

    Returns:
        The ``BackendChoice`` (``backend``, ``reason``, latencies, speed-ups).
    """
    from lightning_compress.engine.ort import OrtConversionError, choose_backend, export_onnx

    reference = copy.deepcopy(float_model).eval()
    candidates: dict[str, Any] = {"eager_fp32": reference}
    with contextlib.suppress(OrtConversionError):  # without an ORT fp32 baseline, int8 is compared with eager only
        candidates["onnxruntime_fp32"] = export_onnx(reference, args, example_kwargs=kwargs)
    for name, int8 in models.items():
        candidates[name] = compile_int8(int8, dynamic=False) if isinstance(int8, Int8Model) else int8
    return choose_backend(candidates, args, batch_sizes, example_kwargs=kwargs)


def convert_auto(
    convert: Callable[[str], AnyInt8],
    float_model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch_sizes: Sequence[int],
) -> tuple[str, AnyInt8, str]:
    """``backend="auto"``: convert with both backends (``convert(name)``), time them (``choose_int8``), keep the
    faster int8 one.

    A backend whose conversion fails is left out (its error is in the reason); when both fail, the ONNX Runtime
    error is raised.

    Returns:
        ``(backend, int8 model, reason)``; the reason is the ``BackendChoice``
        line, e.g. ``"onnxruntime int8 is 2.81x at batch 64, 5.03x at batch 1 vs fp32 eager; ..."`` or ``"int8 does
        not pay off for this model; ORT fp32 is faster (...)"``.
    """
    from lightning_compress.engine.convert.export import Int8ConversionError
    from lightning_compress.engine.ort import OrtConversionError

    models: dict[str, AnyInt8] = {}
    errors: dict[str, Exception] = {}
    for name in ("onnxruntime", "inductor"):
        try:
            models[name] = convert(name)
        except (OrtConversionError, Int8ConversionError) as err:
            errors[name] = err
    if not models:
        raise errors["onnxruntime"]
    if len(models) == 1:
        (name, model), (failed, error) = next(iter(models.items())), next(iter(errors.items()))
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        return name, model, f"{name} int8 (the only one built: {failed} failed: {first_line})"
    choice = choose_int8(models, float_model, args, kwargs, batch_sizes)
    chosen = choice.backend or "onnxruntime"
    return chosen, models[chosen], choice.reason
