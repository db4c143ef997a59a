"""One frozen, validated configuration per workflow.

Each config checks itself once, in ``__post_init__``, with the helpers of ``lightning_compress.engine.validation``
(errors name the argument, the value received and what is allowed). Allowed values come from the ``Literal`` aliases
below through ``typing.get_args``, so they are written once. ``to_dict()`` gives plain values (for checkpoints and
for the resume check).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lightning_compress.engine.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_optional_step,
    check_percentile,
    check_positive_int,
    check_weight,
)

# --- shared ---

#: Whether higher (``"max"``, e.g. accuracy) or lower (``"min"``, e.g. a loss) values of a monitored metric are better.
MonitorMode = Literal["max", "min"]

# --- pruning (PruningConfig) ---

#: How the target sparsity moves from ``initial_sparsity`` to ``target_sparsity`` (see ``.schedules``).
Schedule = Literal["cubic", "linear", "exponential", "constant"]
#: ``"global"``: one ranking across all selected tensors; ``"local"``: each tensor on its own.
Scope = Literal["global", "local"]
#: ``"unstructured"``: single weights; ``"channel"``: whole channel groups (``.structured``). A string
#: ``"N:M"`` (e.g. ``"2:4"``) is also accepted: N of every M consecutive weights kept.
Structure = Literal["unstructured", "channel"]
#: What ranks the weights: their magnitude, or a seeded random score.
Criterion = Literal["magnitude", "random"]

#: Mask updates over the ramp when ``update_every_n_steps`` is ``None``.
UPDATES_PER_RAMP = 100
#: Default ``target_sparsity`` (an ``"N:M"`` structure replaces it with ``(M - N) / M``).
DEFAULT_TARGET_SPARSITY = 0.9
#: Default ``round_to`` of channel pruning. Measured on this project's CPU (AVX-512, 1 thread, two 3x3 convs,
#: batch 64): widths 24, 40 and 56 ran as slow as 32, 48 and 64, and 20-25 took 2x the time per channel of 16 or
#: 32; kernels work in blocks of 16 fp32 values.
DEFAULT_ROUND_TO = 16


def _structure(value: Any) -> str:
    """Check ``structure``: one of ``Structure``, or an ``"N:M"`` string."""
    from lightning_compress.engine.structured import parse_n_m

    if isinstance(value, str) and (value in get_args(Structure) or parse_n_m(value) is not None):
        return value.replace(" ", "")
    allowed = ", ".join(repr(v) for v in get_args(Structure))
    raise ValueError(f"`structure` must be one of {allowed} or an 'N:M' pattern such as '2:4', got {value!r}.")


def _patterns(name: str, value: Any) -> tuple[str, ...] | None:
    """``include``/``exclude`` as a tuple of valid regular expressions (``None`` stays ``None``)."""
    from lightning_compress.engine.selection import compile_patterns

    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"`{name}` must be a list of regular expressions (strings) or None, got {value!r}.")
    compile_patterns(name, list(value))
    return tuple(value)


@dataclass(frozen=True)
class PruningConfig:
    """Everything that defines a gradual pruning run, validated once.

    The arguments are those of ``IterativePruningCallback`` (documented there), except
    ``monitor`` and ``verbose``, which are about reporting, not pruning. ``end_step=None`` and
    ``update_every_n_steps=None`` are resolved from the length of training with ``resolve``.

    Examples:
        >>> config = PruningConfig(target_sparsity=0.8).resolve(total_steps=1000)
        >>> config.end_step, config.update_every_n_steps
        (750, 7)
        >>> PruningConfig(target_sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `target_sparsity` must be in [0, 1), got 1.5.
    """

    target_sparsity: float = DEFAULT_TARGET_SPARSITY
    schedule: Schedule = "cubic"
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    update_every_n_steps: int | None = None
    scope: Scope = "global"
    structure: Structure | str = "unstructured"
    criterion: Criterion = "magnitude"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    end_fraction: float = 0.75
    rewind_to_step: int | None = None
    seed: int = 0
    round_to: int = DEFAULT_ROUND_TO
    min_channels_per_group: int | float = 1
    compact_on_fit_end: bool | None = None

    def __post_init__(self) -> None:
        from lightning_compress.engine.structured import parse_n_m

        check_choice("schedule", self.schedule, get_args(Schedule))
        check_choice("scope", self.scope, get_args(Scope))
        structure = _structure(self.structure)
        object.__setattr__(self, "structure", structure)
        check_choice("criterion", self.criterion, get_args(Criterion))
        n_m = parse_n_m(structure)
        if n_m is not None:
            expected = (n_m[1] - n_m[0]) / n_m[1]
            if self.target_sparsity == DEFAULT_TARGET_SPARSITY:
                object.__setattr__(self, "target_sparsity", expected)
            elif not math.isclose(float(self.target_sparsity), expected, abs_tol=1e-9):
                raise ValueError(
                    f"`target_sparsity` must be (M-N)/M = {expected:g} for `structure`={structure!r} (or left at its"
                    f" default), got {self.target_sparsity}."
                )
        target = check_fraction("target_sparsity", self.target_sparsity)
        initial = check_fraction("initial_sparsity", self.initial_sparsity)
        if initial > target:
            raise ValueError(f"`initial_sparsity` must be <= `target_sparsity` ({target}), got {initial}.")
        check_positive_int("start_step", self.start_step, allow_zero=True)
        if self.end_step is not None:
            check_positive_int("end_step", self.end_step, allow_zero=True)
            if self.end_step <= self.start_step:
                raise ValueError(
                    f"`end_step` must be greater than `start_step` ({self.start_step}), got {self.end_step}."
                )
        if self.update_every_n_steps is not None:
            check_positive_int("update_every_n_steps", self.update_every_n_steps)
        end_fraction = check_fraction("end_fraction", self.end_fraction, include_one=True)
        if end_fraction == 0.0:
            raise ValueError("`end_fraction` must be in (0, 1], got 0.0.")
        check_optional_step("rewind_to_step", self.rewind_to_step)
        if self.rewind_to_step is not None and self.rewind_to_step > self.start_step:
            raise ValueError(
                f"`rewind_to_step` must be <= `start_step` ({self.start_step}) so the snapshot is taken before"
                f" pruning, got {self.rewind_to_step}."
            )
        check_positive_int("seed", self.seed, allow_zero=True)
        check_positive_int("round_to", self.round_to)
        minimum = self.min_channels_per_group
        if (
            isinstance(minimum, bool)
            or not isinstance(minimum, (int, float))
            or not ((isinstance(minimum, int) and minimum >= 1) or (isinstance(minimum, float) and 0 < minimum < 1))
        ):
            raise ValueError(
                f"`min_channels_per_group` must be a count >= 1 (int) or a fraction in (0, 1) (float), got {minimum!r}."
            )
        if self.compact_on_fit_end is None:
            object.__setattr__(self, "compact_on_fit_end", structure == "channel")
        check_bool("compact_on_fit_end", self.compact_on_fit_end)
        object.__setattr__(self, "target_sparsity", target)
        object.__setattr__(self, "initial_sparsity", initial)
        object.__setattr__(self, "end_fraction", end_fraction)
        object.__setattr__(self, "include", _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` for an ``"N:M"`` structure, else ``None``."""
        from lightning_compress.engine.structured import parse_n_m

        return parse_n_m(self.structure)

    @property
    def is_resolved(self) -> bool:
        """Whether ``end_step`` and ``update_every_n_steps`` are fixed numbers."""
        return self.end_step is not None and self.update_every_n_steps is not None

    def resolve(self, total_steps: float | None) -> PruningConfig:
        """Fix ``end_step`` and ``update_every_n_steps`` from the length of training when they were left open.

        Args:
            total_steps: Optimizer steps of the whole training (``trainer.estimated_stepping_batches``); only
                needed when ``end_step`` is ``None``.

        Returns:
            A config with both fixed: ``end_step = start_step + end_fraction * (total_steps - start_step)`` and about
            100 mask updates over the ramp.

        Raises:
            ValueError: If ``end_step`` is ``None`` and ``total_steps`` is unknown or infinite.
        """
        end_step = self.end_step
        if end_step is None:
            if total_steps is None or not math.isfinite(total_steps):
                raise ValueError(
                    "`end_step`=None needs a finite training length to derive it from: set `end_step`, or the"
                    " Trainer's `max_steps`/`max_epochs`."
                )
            end_step = self.start_step + max(1, round(self.end_fraction * (int(total_steps) - self.start_step)))
        frequency = self.update_every_n_steps or max(1, (end_step - self.start_step) // UPDATES_PER_RAMP)
        return dataclasses.replace(self, end_step=end_step, update_every_n_steps=frequency)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (lists for patterns), e.g. for a checkpoint."""
        return {
            field.name: list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }


# --- quantization (QuantConfig, ConversionConfig) ---

#: Weight bits simulated by QAT: 8 (int8, [-128, 127]) or 4 ([-8, 7]; the converted model stores them as int8).
WeightBits = Literal[4, 8]
#: How a QAT fake-quant layer tracks its input range (see ``QuantConfig``).
ActivationObserverKind = Literal["minmax", "moving_average", "histogram"]
#: How static calibration of the int8 conversion sets the activation ranges (see ``ConversionConfig``).
Observer = Literal[ActivationObserverKind, "histogram_l2"]
#: ``"static"``: int8 weights and activations (calibrated ranges); ``"dynamic"``: int8 weights, activations
#: quantized at run time with their own range (Linear-heavy models); ``"weight_only"``: int8 weights, float compute.
QuantMode = Literal["static", "dynamic", "weight_only"]
#: The conversion modes the QAT callback offers (QAT simulates int8 activations, so no ``"weight_only"``).
QATMode = Literal["static", "dynamic"]
#: How the callbacks time float vs int8: compiled with Inductor, eager, or not at all.
LatencyMode = Literal["compiled", "eager", "off"]
#: Which runtime the callbacks' int8 model is built for: ``"onnxruntime"`` (ORT's QDQ layout in an
#: ``InferenceSession``, ``convert_to_onnx_int8``), ``"inductor"`` (torchao pt2e,
#: ``convert_to_int8``, compiled by Inductor) or ``"auto"`` (both built and
#: timed side by side; the faster int8 one is kept).
Backend = Literal["inductor", "onnxruntime", "auto"]

WEIGHT_BITS: tuple[int, ...] = get_args(WeightBits)
ACTIVATION_OBSERVERS: tuple[str, ...] = get_args(ActivationObserverKind)
OBSERVERS: tuple[str, ...] = get_args(Observer)
QUANT_MODES: tuple[str, ...] = get_args(QuantMode)
QAT_MODES: tuple[str, ...] = get_args(QATMode)
LATENCY_MODES: tuple[str, ...] = get_args(LatencyMode)
BACKENDS: tuple[str, ...] = get_args(Backend)
#: The callbacks' default backend: ONNX Runtime int8 is the faster int8 model on the benchmark nets (1 thread, vs
#: fp32 eager; docs/benchmarks.md "ONNX Runtime int8 backend"): ResidualCNN 5.03x at batch 1 and 2.81x at batch 64
#: (pt2e + Inductor 0.82x / 1.94x), ``.onnx`` 0.28x of fp32; DESIGN §7: ResNet-ish 5.9-10.6x at batch 1 (Inductor
#: 2.0-3.6x) and level at batch 64; it loads in milliseconds where Inductor compiles 3-21 s per batch shape.
DEFAULT_BACKEND: Backend = "onnxruntime"

#: ``(quant_min, quant_max)`` of the weights per number of bits (per-output-channel symmetric).
WEIGHT_RANGES: dict[int, tuple[int, int]] = {8: (-128, 127), 4: (-8, 7)}
#: Default ``percentile`` of the ``"histogram"`` observers (values kept on each side, in percent).
DEFAULT_PERCENTILE = 99.99
#: The one default calibration observer, of ``convert_to_int8`` and of
#: ``PostTrainingQuantCallback``: a histogram clipped at ``percentile`` on each side. Rare outliers do not stretch
#: the range (torchao's ``"histogram_l2"`` keeps an isolated outlier and wastes the uint8 grid on it: 10+ dB less
#: output SQNR in ``tests/engine/test_ptq_engine.py``), and it is the same rule as the QAT ``"histogram"`` observer.
DEFAULT_OBSERVER: Observer = "histogram"


@dataclass(frozen=True)
class QuantConfig:
    """What the QAT fake-quant modules simulate. Plain fields, so it can be written in LightningCLI YAML.

    Args:
        weight_bits: 8 (int8, [-128, 127], what the int8 conversion produces) or 4 ([-8, 7]; converted models still
            store int8). Per-output-channel symmetric.
        activation_observer: How the input range of each quantized layer is tracked while training:
            ``"minmax"`` (running min/max), ``"moving_average"`` (exponential moving average of each batch's
            min/max, torch's default for QAT) or ``"histogram"`` (running histogram of 2048 bins over the range
            seen so far, clipped at the ``percentile`` on each side; robust to outliers).
        averaging_constant: Weight of the newest batch, in (0, 1], for ``"moving_average"`` (the min/max) and
            ``"histogram"`` (the normalized histogram).
        quantize_activations: Also fake-quantize the inputs of each layer (uint8, per-tensor affine). ``False``
            simulates weight-only quantization.
        percentile: For ``"histogram"``: the range kept, in percent of the values on each side, in (50, 100].

    Raises:
        ValueError: If a value is outside what is allowed (the message names the argument and the choices).

    Examples:
        >>> QuantConfig(weight_bits=4).weight_range
        (-8, 7)
        >>> QuantConfig().to_dict()["activation_observer"]
        'moving_average'
    """

    weight_bits: WeightBits = 8
    activation_observer: ActivationObserverKind = "moving_average"
    averaging_constant: float = 0.01
    quantize_activations: bool = True
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self) -> None:
        if isinstance(self.weight_bits, bool) or self.weight_bits not in WEIGHT_BITS:
            allowed = ", ".join(map(str, WEIGHT_BITS))
            raise ValueError(f"`weight_bits` must be one of {allowed}, got {self.weight_bits!r}.")
        check_choice("activation_observer", self.activation_observer, ACTIVATION_OBSERVERS)
        object.__setattr__(self, "averaging_constant", check_weight("averaging_constant", self.averaging_constant))
        check_bool("quantize_activations", self.quantize_activations)
        object.__setattr__(self, "percentile", check_percentile("percentile", self.percentile))

    @property
    def weight_range(self) -> tuple[int, int]:
        """``(quant_min, quant_max)`` of the weights."""
        return WEIGHT_RANGES[self.weight_bits]

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ConversionConfig:
    """How ``convert_to_int8`` builds the int8 model. Validated once.

    Args:
        mode: ``"static"`` (int8 weights per channel + uint8 activations per tensor, calibrated), ``"dynamic"``
            (activation ranges computed at run time; for Linear-heavy models and transformers) or ``"weight_only"``
            (int8 weights, float activations: size only).
        observer: For ``"static"``: how calibration sets the activation ranges not carried over from QAT:
            ``"histogram"`` (the default, ``DEFAULT_OBSERVER``: a histogram of everything seen, clipped at
            ``percentile`` on each side), ``"minmax"`` (every value seen), ``"moving_average"`` (moving average of
            each batch's min/max, constant 0.01) or ``"histogram_l2"`` (torchao's x86 default, an L2 error search
            that keeps isolated large outliers).
        percentile: For ``observer="histogram"``: the range kept, in percent of the values on each side, in
            (50, 100].
        calibration_batches: At most this many items of ``calibration_data`` are run through the observers.
        quantize_embeddings: Also store ``nn.Embedding`` tables (not skipped) as int8, per-row symmetric, and
            dequantize only the rows looked up (weight-only, in every mode; ORT: its ``Gather`` quantization).
            Default on, by measurement: on all-MiniLM-L6-v2 (ORT dynamic) the file goes from 0.65x to 0.25x of fp32
            for a cosine of 0.9914 instead of 0.9921 to the float embeddings; in transformers the tables are often
            the largest tensors (a third to a half of a small BERT).
        dynamic_batch: Export with a dynamic batch dimension (falls back to static shapes, with a note, when the
            model cannot have one). The ``"inductor"`` export then also makes dynamic every sequence length or image
            size the network runs at in eager at another size (checked against eager; the others stay fixed, noted:
            ``Int8Model.input_shapes``); ``False``: every shape is the example's.

    Raises:
        ValueError: If a value is outside what is allowed (the message names the argument and the choices).

    Examples:
        >>> ConversionConfig(mode="dynamic").to_dict()["mode"]
        'dynamic'
        >>> ConversionConfig(percentile=30)
        Traceback (most recent call last):
        ...
        ValueError: `percentile` must be in (50, 100], got 30.
    """

    mode: QuantMode = "static"
    observer: Observer = DEFAULT_OBSERVER
    percentile: float = DEFAULT_PERCENTILE
    calibration_batches: int = 32
    quantize_embeddings: bool = True
    dynamic_batch: bool = True

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, QUANT_MODES)
        check_choice("observer", self.observer, OBSERVERS)
        object.__setattr__(self, "percentile", check_percentile("percentile", self.percentile))
        check_positive_int("calibration_batches", self.calibration_batches)
        check_bool("quantize_embeddings", self.quantize_embeddings)
        check_bool("dynamic_batch", self.dynamic_batch)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values."""
        return dataclasses.asdict(self)
