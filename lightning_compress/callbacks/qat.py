"""``QATCallback``: quantization-aware training on any model, a real int8 model at the end."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, ClassVar, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks import _logging, _loops, _resume
from lightning_compress.engine.config import (
    DEFAULT_BACKEND,
    LATENCY_MODES,
    QAT_MODES,
    ActivationObserverKind,
    Backend,
    ConversionConfig,
    LatencyMode,
    MonitorMode,
    QATMode,
    QuantConfig,
    WeightBits,
)
from lightning_compress.engine.convert import Int8Model, ModelCall, convert_to_int8
from lightning_compress.engine.convert.backend import (
    AnyInt8,
    check_backend,
    convert_auto,
    convert_with_backend,
    int8_module,
    shapes_taken,
)
from lightning_compress.engine.distributed import run_on_rank_zero
from lightning_compress.engine.fake_quant import (
    ActivationObserver,
    check_finite_ranges,
    fake_quant_modules,
    input_observers,
    prepare_qat,
    quant_state_keys,
    strip_qat,
    sync_observers,
)
from lightning_compress.engine.io import check_writable_dir
from lightning_compress.engine.measure import measure_int8
from lightning_compress.engine.qat import SCHEDULE_UNITS, QATPhase, QATSchedule, ScheduleUnit, apply_phase
from lightning_compress.engine.selection import compile_patterns
from lightning_compress.engine.validation import (
    check_batch_sizes,
    check_bool,
    check_choice,
    check_optional_path,
    check_optional_str,
)

PREFIX = f"{_logging.PREFIX}/quant"


class QATCallback(Callback):
    r"""Quantization-aware training: fake-quantize Linear/Conv layers while training, get a real int8 model at the end.

    In ``setup`` the target network's ``nn.Linear`` and ``nn.ConvNd`` modules are swapped, in place, for fake-quant
    versions that **share the same Parameter objects**: ``forward`` is never patched (any signature works), the
    optimizer and pruning keep working, and parameter keys do not change. Weights are simulated per-output-channel
    symmetric int8 and layer inputs per-tensor affine uint8, exactly what the int8 conversion produces. Observers
    move only in training mode, so validation, test and predict never change them.

    At fit end a **copy** is converted to a real int8 model (the LightningModule stays as it is, so
    ``trainer.test(ckpt_path=...)``, a second ``fit`` and ``load_from_checkpoint`` keep working) by the ``backend``:

    * ``"onnxruntime"`` (the default): the stripped float copy is exported to ONNX and quantized in ONNX Runtime's
      own QDQ layout, *seeded* with what QAT learned (each layer's input ``(scale, zero_point)`` from its observer,
      its weight grid), the last layer's output kept float; the ranges QAT does not learn (Conv outputs, residual
      adds) are calibrated on up to 32 training batches run through ``validation_step``; saved as
      ``<log_dir>/qat_int8.onnx``. It is the faster
      int8 model on the benchmark nets (docs/benchmarks.md, 1 thread, vs fp32 eager: ResidualCNN 5.03x at batch 1
      and 2.81x at batch 64, pt2e + Inductor 0.82x / 1.94x; ``.onnx`` 0.28x of fp32) and loads in milliseconds.
    * ``"inductor"``: torchao's pt2e flow, an ``ExportedProgram`` saved as a compressed ``.pt2`` and compiled by
      Inductor for speed (3-21 s per new batch shape); ``quantized_program`` holds it. Needed for 4-bit weights.
    * ``"auto"``: both are built and timed side by side at batch 1 and the validation batch size (alternated, 1
      thread) next to ORT fp32 and fp32 eager; the faster int8 one is kept, and ``results`` says which
      (``"backend"``) and why (``"backend_reason"``, e.g. "int8 does not pay off for this model; ORT fp32 is
      faster").

    The artifact reloads with ``lightning_compress.load_quantized`` (either suffix); ``quantized_model`` is an
    ``nn.Module`` called exactly like the target network for every backend. Then the user's own validation runs with
    the int8 network in place to measure the metric drop.

    Checkpoints: the observer state is moved from the checkpoint's model ``state_dict`` into this callback's state,
    so the checkpoint loads with ``strict=True`` into the plain model (``MyModule.load_from_checkpoint(path)``), and
    with this callback in the Trainer (``fit``/``test(ckpt_path=...)``) the prepared model gets its observers back.
    Outside a Trainer use ``load_checkpoint``. The checkpoint also keeps a few rows of a real input of the
    target network, so a fit resumed after training ended (e.g. a crash during the fit-end conversion) exports and
    converts without running a batch. A callback object can be reused for a new fit: its state (example input,
    results, int8 model) is reset in ``setup`` unless a checkpoint restores it.

    The export example is the first call of the target network in this fit (a training, validation or
    sanity-check batch), else the checkpoint's, else ``example_input_array`` (run through the LightningModule's
    ``forward`` when ``module`` names a submodule); a batch of 1 is repeated to 2 rows and a ``torch.compile``d
    network is unwrapped, so the int8 program keeps a dynamic batch dimension.

    Under ``strategy="ddp_spawn"`` training runs in spawned processes: in the process that called ``fit`` this
    callback is a copy that never ran, so ``results`` stays empty and ``quantized_model`` ``None``. Load the
    artifact rank zero saved (``save_path``, default ``<log_dir>/qat_int8.pt2``) with
    ``lightning_compress.load_quantized``, and read the numbers from the logger.

    Under ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``, which runs after ``setup``:
    ``fully_shard`` wraps the fake-quant layers), the observers are all-reduced as under DDP; for the preflight and at
    fit end every rank takes part in gathering the full state dict, rank zero converts an unsharded copy alone (from a
    ``meta``-device copy taken in ``setup``) and writes the one artifact, and every rank gets its ``results`` or its
    error. ``FSDPStrategy`` (FSDP1) and ``tensor_parallel_size > 1`` are refused in ``setup``.

    **Example**

    ```python
    trainer = Trainer(callbacks=[QATCallback(module="net", monitor="val_acc")], max_epochs=10)
    trainer.fit(model, datamodule=data)
    int8_net = trainer.callbacks[0].quantized_model  # an nn.Module: int8_net(x) like model.net(x)
    ```

    Args:
        start: When fake quantization starts (in ``schedule_unit``s); before it the model trains in float.
        freeze_observers_at: When the activation ranges stop moving (``None``: never). torchvision's recipe: epoch 4.
        freeze_bn_at: When BatchNorm statistics freeze (``None``: never). torchvision's recipe: epoch 3.
        schedule_unit: ``"step"`` (optimizer steps, ``trainer.global_step``) or ``"epoch"``.
        module: Name of the submodule to quantize (e.g. ``"net"``); ``None``: the whole LightningModule.
        include: Regular expressions searched in module names (relative to ``module``): quantize only these.
        exclude: Regular expressions of module names to keep in float.
        weight_bits: 8, or 4 (simulated on a 4-bit grid; the converted model stores them as int8).
        activation_observer: ``"moving_average"``, ``"minmax"`` or ``"histogram"`` (percentile clipping).
        averaging_constant: Weight of each new batch in the moving-average and histogram observers, in (0, 1].
        convert_on_fit_end: Convert a copy to int8, save and measure it when fit ends.
        mode: Conversion mode: ``"static"`` (int8 weights and activations) or ``"dynamic"`` (int8 weights,
            activations quantized at run time; for Linear-heavy models). Training follows the mode: with
            ``"dynamic"`` only the weights are fake-quantized (no learned activation ranges, which dynamic int8
            never uses).
        backend: ``"onnxruntime"`` (default), ``"inductor"`` or ``"auto"`` (see above). ``"onnxruntime"`` and
            ``"auto"`` need ``weight_bits=8`` and the ``onnx`` extra (``pip install onnx onnxruntime``).
        save_path: Where to save the int8 model; default ``<logger.log_dir>/qat_int8.onnx`` (``.pt2`` for
            ``"inductor"``). Under ``"auto"`` a ``.pt2``/``.onnx`` suffix becomes the chosen backend's.
        monitor: A metric the validation logs (e.g. ``"val_acc"``): measured for the fake-quant and the int8 model.
        monitor_mode: ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (e.g. a loss): the sign of
            ``<monitor>_drop`` (a worse loss is a positive drop).
        latency: ``"compiled"`` (int8 compiled with Inductor, where its int8 kernels are, vs float eager and
            compiled), ``"eager"``, or ``"off"``.
        latency_batch_sizes: Batch sizes to time; default: 1 and the validation batch size.
        quantize_embeddings: Store ``nn.Embedding`` tables as int8 in the converted model (per row, weight-only;
            QAT trains them in float, as their lookups are exact). Default on, as in ``PostTrainingQuantCallback``.
        verbose: Print the int8 report on rank zero.
        preflight: After the first training batch, run the whole fit-end int8 conversion once on a copy with that
            batch (export, prepare, convert) so that a model that cannot be converted fails at once, with the
            reason, instead of after training. Costs one conversion (about 1-3 s on the demo nets; seconds more for
            the Inductor backend's pt2e). ``False``: only the export is tried.
    """

    def __init__(
        self,
        start: int = 0,
        freeze_observers_at: int | None = None,
        freeze_bn_at: int | None = None,
        schedule_unit: ScheduleUnit = "step",
        module: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        weight_bits: WeightBits = 8,
        activation_observer: ActivationObserverKind = "moving_average",
        averaging_constant: float = 0.01,
        convert_on_fit_end: bool = True,
        mode: QATMode = "static",
        backend: Backend = DEFAULT_BACKEND,
        save_path: str | None = None,
        monitor: str | None = None,
        monitor_mode: MonitorMode = "max",
        latency: LatencyMode = "compiled",
        latency_batch_sizes: list[int] | None = None,
        verbose: bool = True,
        preflight: bool = True,
        quantize_embeddings: bool = True,
    ) -> None:
        #: What the fake-quant layers simulate.
        check_choice("mode", mode, QAT_MODES)  # QAT simulates int8 activations: no "weight_only"
        self.config = QuantConfig(
            weight_bits=weight_bits,
            activation_observer=activation_observer,
            averaging_constant=averaging_constant,
            # dynamic int8 quantizes activations with each batch's own range at run time: training simulates the
            # weight grid only, not a learned activation range the int8 model would never use
            quantize_activations=mode == "static",
        )
        #: When fake quantization starts and observers / BatchNorm freeze (in ``schedule_unit``s).
        self.schedule = QATSchedule(start, freeze_observers_at, freeze_bn_at)
        self.schedule_unit = check_choice("schedule_unit", schedule_unit, SCHEDULE_UNITS)
        self.module = check_optional_str("module", module)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.include = include
        self.exclude = exclude
        self.convert_on_fit_end = check_bool("convert_on_fit_end", convert_on_fit_end)
        #: How the int8 model is built at fit end.
        self.conversion = ConversionConfig(mode=mode, quantize_embeddings=quantize_embeddings)
        self.save_path = check_optional_path("save_path", save_path)
        #: The int8 runtime: ``"onnxruntime"``, ``"inductor"`` or ``"auto"``.
        self.backend = check_backend(backend, mode, self.config.weight_bits, self.save_path)
        self.monitor = check_optional_str("monitor", monitor)
        self.monitor_mode = check_choice("monitor_mode", monitor_mode, get_args(MonitorMode))
        self.latency = check_choice("latency", latency, LATENCY_MODES)
        self.latency_batch_sizes = check_batch_sizes("latency_batch_sizes", latency_batch_sizes)
        self.verbose = check_bool("verbose", verbose)
        self.preflight = check_bool("preflight", preflight)

        #: The int8 network produced at fit end (rank zero), called like the target network; ``None`` before. A
        #: ``QuantizedModule`` (Inductor) or an ``OrtInt8Model`` (ONNX Runtime).
        self.quantized_model: nn.Module | None = None
        #: The same int8 network as a ``torch.export.ExportedProgram`` (for ``compile_int8``, ``int8_weights``) when the
        #: Inductor backend made it;
        #: ``None`` before and for ONNX Runtime (its ONNX bytes are ``quantized_model.onnx_bytes``).
        self.quantized_program: torch.export.ExportedProgram | None = None
        #: The numbers measured at fit end (also logged under ``compress/quant/``), with ``"backend"`` (the int8
        #: runtime used), ``"backend_reason"`` (``"auto"`` only), ``"input_shapes"`` (the shapes the int8 model
        #: takes, e.g. ``"x: (batch, 3, dim_28, dim_28)"``: names are dynamic sizes) and ``"saved_to"`` as strings.
        self.results: dict[str, float | str] = {}
        self._phase: QATPhase | None = None  # the phase in force
        self._batch_step = 0  # the optimizer step of the training batch in progress
        self._qat_started = True  # whether fake quantization was on at some point of this fit (known at fit end)
        self._catcher = _loops.InputCatcher()  # the first call of the target network in this fit
        self._example: _loops.Call | None = None  # the example call a checkpoint restored
        self._pending_quant_state: dict[str, torch.Tensor] = {}
        self._export_checked = False  # the fit-end conversion was tried on the first training batch
        self._observers: list[tuple[str, ActivationObserver]] | None = None
        self._monitor_checked = False
        self._full = _loops.FullModelOnRankZero()  # FSDP2: the whole model, gathered on rank zero for the conversion

    @property
    def mode(self) -> str:
        """The conversion mode (``"static"`` or ``"dynamic"``)."""
        return self.conversion.mode

    #: What ``CompressionReport`` takes this callback for (see ``callbacks.report.CompressionCallback``).
    compression_role: ClassVar[str] = "quantization"

    @property
    def compression_started(self) -> bool:
        """Whether fake quantization is on now (``CompressionReport`` takes its baseline from validations before)."""
        return self._phase is not None and self._phase.fake_quant_enabled

    def compression_settings(self) -> dict[str, str | int | float]:
        """The settings ``CompressionReport`` puts in its report and in TensorBoard's HParams tab."""
        return {
            "quantization": "qat" if self._qat_started else "qat (QAT never started: trained in float)",
            "bits": int(self.config.weight_bits),
            "mode": self.mode,
            "observer": self.config.activation_observer,
            "backend": self.backend,
        }

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, include=self.include, exclude=self.exclude)

    def dashboard_categories(self) -> dict[str, list[tuple[str, list[str]]]]:
        """Charts of this callback in the TensorBoard custom-scalars layout."""
        charts = [
            ("per-layer SQNR (dB)", [rf"^{PREFIX}/sqnr/"]),
            ("activation scale per layer", [rf"^{PREFIX}/activation_scale/"]),
            ("size (bytes): float vs int8", [rf"^{PREFIX}/(float|int8)_bytes$"]),
        ]
        if self.latency != "off":  # no empty chart when nothing is timed
            charts.append(("latency (ms)", [rf"^{PREFIX}/.*_ms/"]))
        if self.monitor:
            metric_tags = [rf"^{PREFIX}/(fake_quant|int8)_{re.escape(self.monitor)}$"]
            charts.insert(0, (f"{self.monitor}: fake-quant vs int8", metric_tags))
        return {"quantization (QAT)": charts}

    # ----------------------------------------------------------------------------------------------------------
    # Preparing the model, and loading checkpoints into it
    # ----------------------------------------------------------------------------------------------------------
    def prepare(self, pl_module: LightningModule) -> nn.Module:
        """Swap the target network's layers for fake-quant ones (idempotent) and return the target network."""
        target = _loops.target_module(pl_module, self.module)
        prepare_qat(target, self.config, include=self.include, exclude=self.exclude)
        return target

    def load_checkpoint(self, pl_module: LightningModule, checkpoint_path: str | Path) -> LightningModule:
        """Load a checkpoint written during QAT into ``pl_module`` outside a Trainer (model and observer state).

        **Example**

        ```python
        model = QATCallback(module="net").load_checkpoint(MyModule(), "epoch=3.ckpt")
        ```

        """
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        self.prepare(pl_module)
        state = dict(checkpoint["state_dict"])
        state.update(checkpoint.get("callbacks", {}).get(self.state_key, {}).get("quant_state", {}))
        pl_module.load_state_dict(state, strict=True)
        return pl_module

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:  # a reused callback object starts afresh, unless a checkpoint restores it
            self._reset()
            _refuse_weight_averaging(trainer)
            if self.convert_on_fit_end and trainer.is_global_zero:  # fail now, not after training
                check_writable_dir(self._artifact_path(trainer, self.backend), "save_path")
        # Every stage: a checkpoint given to fit/validate/test/predict(ckpt_path=...) loads into the prepared model.
        self.prepare(pl_module)
        if stage == TrainerFn.FITTING:  # FSDP2: a meta copy of the prepared model, before `configure_model` shards it
            self._full.capture(trainer, pl_module, type(self).__name__)

    def _reset(self) -> None:
        """Forget everything of a previous fit (its example batch, results and int8 model)."""
        self._catcher.detach()
        self._catcher = _loops.InputCatcher()
        self._example = None
        self._pending_quant_state = {}
        self._phase = None
        self._qat_started = True
        self._export_checked = False
        self._monitor_checked = False
        self._observers = None
        self._compact = False
        self.results = {}
        self.quantized_model = None
        self.quantized_program = None

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        sync_observers(pl_module)  # every rank saves the same ranges
        model_state = checkpoint["state_dict"]
        if self._full.active:
            # FSDP2: Lightning's loader checks the checkpoint's keys against the model's, observers included, so they
            # stay in the model state; the state was taken before this hook, so it gets the synchronized ranges.
            live = {k: v for k, v in pl_module.state_dict().items() if k in model_state}
            for key in quant_state_keys(model_state):
                model_state[key] = live[key].detach().cpu().clone()
            return
        quant_state = {key: model_state.pop(key) for key in quant_state_keys(model_state)}
        # (Lightning calls this for full checkpoints only: a `save_weights_only=True` checkpoint keeps the observer
        # buffers in its model state, so it loads with `load_checkpoint` or `load_from_checkpoint(strict=False)`.)
        checkpoint["callbacks"].setdefault(self.state_key, {})["quant_state"] = quant_state

    @override
    def state_dict(self) -> dict[str, Any]:
        caught = (self._catcher.args, self._catcher.kwargs) if self._catcher.args is not None else None
        return {
            "config": {**self.config.to_dict(), "module": self.module, "backend": self.backend},
            "schedule": {**self.schedule.to_dict(), "unit": self.schedule_unit},
            "conversion": self.conversion.to_dict(),
            # A few rows of a real input: a fit resumed after training ended (a crash in the conversion) runs no
            # batch, and still has to export the network.
            "example": _loops.call_to_state(caught or self._example),
        }

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        _resume.check_state_key(checkpoint, type(self).__name__, self.state_key, "`module`, `include` or `exclude`")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # What the fake-quant layers simulate, and when, must be what the observers were trained with.
        current = self.state_dict()
        for part in ("config", "schedule"):
            _resume.check_same_settings(type(self).__name__, state_dict.get(part), current[part])
        # Lightning loads the model state (without the observers) before the callbacks: put the observers back now.
        self._pending_quant_state = state_dict.get("quant_state", {})
        self._example = _loops.call_from_state(state_dict.get("example"))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor and self.convert_on_fit_end and not is_overridden("validation_step", pl_module):
            raise ValueError(
                f"`monitor`={self.monitor!r} needs a validation loop, but "
                f"{type(pl_module).__name__} does not define `validation_step`."
            )
        self._restore_quant_state(pl_module)
        _logging.write_dashboard_layout(trainer)
        self._phase = None
        self._apply_schedule(trainer, pl_module)

    @override
    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Fail before training, not after it, when the metric to compare at fit end is not logged.
        if self.monitor and self.convert_on_fit_end:
            self._check_monitor({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_quant_state(pl_module)
        sync_observers(pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_quant_state(pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_quant_state(pl_module)

    def _restore_quant_state(self, pl_module: LightningModule) -> None:
        if self._pending_quant_state:
            unexpected = pl_module.load_state_dict(self._pending_quant_state, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"The checkpoint's QAT state has keys the model does not have: {unexpected[:5]}.")
            self._pending_quant_state = {}

    # ----------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._catcher.args is None:  # until one batch is caught (the hot path does nothing more)
            self._catcher.attach(_loops.registered_module(pl_module, self.module))
        self._apply_schedule(trainer, pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # Validation and sanity-check batches are real inputs too (a resumed, finished fit may run nothing else).
        if self._catcher.args is None and trainer.state.fn == TrainerFn.FITTING:
            self._catcher.attach(_loops.registered_module(pl_module, self.module))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._export_checked and self._catcher.args is not None:
            self._check_exportable(trainer, pl_module)
        if self._phase is not None and self._phase.fake_quant_enabled and not self._phase.observers_frozen:
            # The observers moved in this batch: fail now, naming the layer, if a NaN/Inf went through them.
            if self._observers is None:  # collected once per fit: the hot path only reads their ranges
                self._observers = input_observers(_loops.target_module(pl_module, self.module))
            check_finite_ranges(self._observers, step=self._batch_step)

    def _check_exportable(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After the first training batch: the fit-end conversion would fail? Then fail now, not after training."""
        self._export_checked = True
        if not self.convert_on_fit_end:
            return
        if self._full.active:  # FSDP2: every rank takes part in the gather, rank zero tries, all share the outcome
            whole = self._full.gather(pl_module)
            run_on_rank_zero(lambda: self._preflight(whole))
        elif trainer.is_global_zero:
            self._preflight(pl_module)

    def _preflight(self, pl_module: LightningModule | None) -> None:
        assert pl_module is not None  # (rank zero's whole model under FSDP2)
        target = _loops.target_module(pl_module, self.module)
        call = (self._catcher.args or (), self._catcher.kwargs)
        # the full conversion takes the prepared model (as at fit end); the export check a stripped copy
        network = target if self.preflight else strip_qat(copy.deepcopy(target))
        was_training = target.training
        target.eval()
        try:
            seconds = _loops.preflight(self.backend, network, call, self.conversion, self.preflight)
        finally:
            target.train(was_training)
        if self.verbose and self.preflight:
            rank_zero_info(f"QATCallback preflight: the int8 conversion works on this model ({seconds:.1f} s).")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Without a sanity check, the first validation tells whether `monitor` is logged at all (not the fit end).
        first = not self._monitor_checked and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING
        if self.monitor and self.convert_on_fit_end and first:
            self._monitor_checked = True
            self._check_monitor({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    def _apply_schedule(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the target network in the schedule's phase for now (only when the phase changes)."""
        self._batch_step = trainer.global_step
        now = trainer.global_step if self.schedule_unit == "step" else trainer.current_epoch
        phase = self.schedule.phase(now)
        if phase != self._phase:
            apply_phase(_loops.target_module(pl_module, self.module), phase)
            self._phase = phase

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here the length of training is known: a `start` past its end would give a float model labelled QAT.
        total = trainer.estimated_stepping_batches if self.schedule_unit == "step" else trainer.max_epochs
        if total is not None and total >= 0 and math.isfinite(total) and self.schedule.start >= total:
            unit = "optimizer steps" if self.schedule_unit == "step" else "epochs"
            rank_zero_warn(
                f"QATCallback: `start`={self.schedule.start} ({self.schedule_unit}s), but training is estimated at"
                f" {int(total)} {unit}: QAT will never start and the int8 model is converted from a float model"
                " that never saw fake quantization. Lower `start` or train longer."
            )

    # ----------------------------------------------------------------------------------------------------------
    # Fit end: a real int8 model from a copy, measured
    # ----------------------------------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._catcher.detach()
        sync_observers(pl_module)
        if not self.convert_on_fit_end:
            return
        if self._full.active:
            # FSDP2: every rank takes part in the gather; rank zero converts the whole model alone, and every rank
            # gets its results (or its error) instead of running ahead.
            whole = self._full.gather(pl_module)
            self.results = run_on_rank_zero(lambda: self._convert_and_measure(trainer, whole))
        elif trainer.is_global_zero:
            self._convert_and_measure(trainer, pl_module)

    def _convert_and_measure(self, trainer: Trainer, pl_module: LightningModule | None) -> dict[str, float | str]:
        """Convert a copy of the target network of ``pl_module`` to int8, measure, save and log it (rank zero)."""
        assert pl_module is not None
        target = _loops.target_module(pl_module, self.module)
        self._qat_started = any(m.is_fake_quant_enabled for m in fake_quant_modules(target).values())
        if not self._qat_started:
            rank_zero_warn(
                f"QATCallback: QAT never started (`start`={self.schedule.start} {self.schedule_unit}s, training ended"
                f" at step {trainer.global_step}, epoch {trainer.current_epoch}): the int8 model is a post-training"
                " quantization of the float model. Lower `start` or train longer."
            )
        args, kwargs = _loops.example_inputs(pl_module, self.module, self._catcher, self._example)
        was_training = target.training
        target.eval()
        try:
            backend, int8, reason = self._convert(trainer, pl_module, target, args, kwargs)
            self.quantized_program = int8.program if isinstance(int8, Int8Model) else None
            self.quantized_model = int8_module(int8)
            self.results = self._measure(trainer, pl_module, target, int8, args, kwargs, backend)
            self.results["backend"] = backend
            shapes = shapes_taken(int8)
            if shapes is not None:
                self.results["input_shapes"] = shapes
            self.results["compact"] = float(self._compact)
            if reason is not None:
                self.results["backend_reason"] = reason
        finally:
            target.train(was_training)
        self._log(trainer, target)
        return self.results

    def _convert(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        target: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[str, AnyInt8, str | None]:
        """The int8 model of the backend (``"auto"``: both built and timed; the backend, model and reason)."""

        calibration = self._ort_calibration(trainer, pl_module, target) if self.backend != "inductor" else None
        compact = _loops.channel_removal(trainer, pl_module, self.module, "QATCallback")
        self._compact = compact is not None

        def convert(backend: str) -> AnyInt8:
            if backend == "inductor":
                return convert_to_int8(target, args, kwargs, config=self.conversion, compact=compact)
            return convert_with_backend(
                backend, target, args, kwargs, config=self.conversion, calibration=calibration, compact=compact
            )

        if self.backend != "auto":
            return self.backend, convert(self.backend), None
        float_net = strip_qat(copy.deepcopy(target)).eval()
        sizes = _loops.latency_batch_sizes(trainer, self.latency_batch_sizes)
        return convert_auto(convert, float_net, args, kwargs, sizes)

    def _artifact_path(self, trainer: Trainer, backend: str) -> Path:
        return _loops.int8_artifact_path(trainer, self.save_path, "qat_int8", backend, self.backend == "auto")

    def _ort_calibration(
        self, trainer: Trainer, pl_module: LightningModule, target: nn.Module
    ) -> list[ModelCall] | None:
        """Calls of the target network recorded through the user's ``validation_step`` on up to
        ``calibration_batches`` training batches (eval mode, observers still), for the ranges ONNX Runtime needs that
        QAT does not learn (Conv outputs, residual adds); ``None`` (the example call) when no training data is left
        (e.g. a finished fit resumed) or there is no ``validation_step``."""
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        elif isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if loader is None or not is_overridden("validation_step", pl_module):
            return None
        # The whole LightningModule as the target: record its own (class) ``forward``, the instance's is swapped.
        network = type(pl_module).forward.__get__(pl_module) if target is pl_module else target
        recorder = _loops.Recorder(network, keep_inputs=True)
        limit = self.conversion.calibration_batches
        _loops.run_inner_loop(trainer, pl_module, self.module, recorder, "validate", loader, limit)
        target.eval()  # the loop restored the LightningModule's own mode, which reaches the target network
        return [ModelCall(args, kwargs) for args, kwargs in recorder.inputs] or None

    def _measure(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        target: nn.Module,
        int8: AnyInt8,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        backend: str,
    ) -> dict[str, float | str]:
        fake_quant = int8_run = None
        if self.monitor:  # the user's validation with the fake-quant, then the int8 network in place
            fake_quant = _loops.evaluate_network(trainer, pl_module, self.module, target)
            self._check_monitor(fake_quant.metrics)
            int8_run = _loops.evaluate_network(trainer, pl_module, self.module, int8_module(int8))
        report = measure_int8(
            int8,
            strip_qat(copy.deepcopy(target)).eval(),
            self._artifact_path(trainer, backend),
            args,
            kwargs,
            fake_quant_model=target,
            monitor=self.monitor,
            reference_evaluation=fake_quant,
            int8_evaluation=int8_run,
            higher_is_better=self.monitor_mode == "max",
            latency=self.latency,
            batch_sizes=_loops.latency_batch_sizes(trainer, self.latency_batch_sizes),
        )
        # Layer names as the user wrote them (a `torch.compile`d submodule adds `_orig_mod.` to them).
        results: dict[str, float | str] = {k.replace("_orig_mod.", ""): v for k, v in report.to_metrics().items()}
        results["saved_to"] = report.saved_to
        results["qat_started"] = float(self._qat_started)
        return results

    def _check_monitor(self, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            available = ", ".join(f"`{k}`" for k in metrics) or "none"
            raise ValueError(f"`monitor`={self.monitor!r} is not logged by the validation. Logged: {available}.")

    def _log(self, trainer: Trainer, target: nn.Module) -> None:
        numbers = {k: v for k, v in self.results.items() if isinstance(v, (int, float))}
        _logging.log_scalars(trainer, {f"{PREFIX}/{k}": v for k, v in numbers.items()}, trainer.global_step)
        sqnr = {k.removeprefix("sqnr/"): v for k, v in numbers.items() if k.startswith("sqnr/")}
        _logging.log_layer_figure(trainer, f"{PREFIX}/per_layer_sqnr", sqnr, "SQNR (dB), higher is better")
        headline = {k: v for k, v in self.results.items() if "/" not in k or k.startswith(_logging.HEADLINE_PREFIXES)}
        backend = self.results.get("backend", self.backend)
        network = "compact network, pruned channels removed, " if self.results.get("compact") else ""
        layers = int(float(self.results.get("int8_layers", 0)))  # counted in the artifact, not the fake-quant swap
        title = f"QAT int8 model ({network}{backend}, {layers} quantized layers)"
        if not self._qat_started:
            title += ": QAT never started (converted from the float model)"
        summary = _logging.markdown_summary(title, headline)
        _logging.log_text(trainer, f"{PREFIX}/summary", summary, trainer.global_step)
        if self.verbose:
            rank_zero_info(f"\n{summary}\n")


def _refuse_weight_averaging(trainer: Trainer) -> None:
    """``WeightAveraging`` (and EMA) average every buffer of the model, QAT's observer flags and ranges included,
    and copy them back into the model: refused, with what to do instead."""
    from lightning.pytorch.callbacks import WeightAveraging

    callbacks: list[Callback] = getattr(trainer, "callbacks", [])
    averaging = [type(cb).__name__ for cb in callbacks if isinstance(cb, WeightAveraging)]
    if averaging:
        raise ValueError(
            f"QATCallback cannot be combined with {averaging[0]}: weight averaging averages every buffer of the"
            " model, including the fake-quant observers' state (boolean flags, and ranges that are infinite until"
            " QAT starts), and copies the averages back at the end of training. Average the weights in a first"
            " fit, then fine-tune with QATCallback in a second fit."
        )
