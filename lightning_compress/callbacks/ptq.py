"""``PostTrainingQuantCallback``: calibrate, convert a copy to int8, measure it with the user's validation, and keep
the most sensitive layers in float when the accuracy budget would not hold.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks import _logging, _loops
from lightning_compress.engine.config import (
    DEFAULT_BACKEND,
    DEFAULT_OBSERVER,
    DEFAULT_PERCENTILE,
    LATENCY_MODES,
    Backend,
    ConversionConfig,
    LatencyMode,
    MonitorMode,
    Observer,
    QuantConfig,
    QuantMode,
)
from lightning_compress.engine.convert import Int8Model, ModelCall
from lightning_compress.engine.convert.backend import (
    AnyInt8,
    check_backend,
    convert_auto,
    convert_with_backend,
    int8_module,
    shapes_taken,
)
from lightning_compress.engine.distributed import run_on_rank_zero
from lightning_compress.engine.fake_quant import prepare_qat
from lightning_compress.engine.fallback import FallbackAttempt, find_float_layers
from lightning_compress.engine.io import check_writable_dir
from lightning_compress.engine.measure import Evaluation, measure_int8, output_sensitivity, per_layer_sqnr
from lightning_compress.engine.selection import compile_patterns, select_modules
from lightning_compress.engine.validation import (
    check_batch_sizes,
    check_bool,
    check_choice,
    check_optional_path,
    check_optional_str,
    check_positive_int,
)

PREFIX = f"{_logging.PREFIX}/ptq"
#: When the callback runs: at the end of ``fit``, or of a standalone ``validate``/``test``.
Stage = Literal["fit", "validate", "test"]
STAGES: tuple[str, ...] = get_args(Stage)
#: The dataloader calibration batches come from.
CalibrationData = Literal["train", "val"]
#: Whether a higher (``"max"``) or lower (``"min"``) ``monitor`` value is better.
Call = _loops.Call


class PostTrainingQuantCallback(Callback):
    r"""Post-training int8 quantization of a copy of the model, measured with your own validation.

    When it runs (``run_on``): at the end of ``trainer.fit`` (after the last validation), and on
    ``trainer.validate(model)`` / ``trainer.test(model)`` for a model trained elsewhere (after that loop ends).

    What it does, on rank zero:

    1. **Calibration inputs.** Up to ``calibration_batches`` batches of the train (or validation) dataloader go
       through *your* ``validation_step`` (eval mode, no gradients, in a separate CPU loop whose logs are discarded,
       with Lightning's batch transfer hooks), and the arguments the target network receives are recorded. So the
       network is calibrated on exactly what your step feeds it, whatever the batch format.
    2. **Conversion of a copy** by the ``backend`` (the LightningModule is not modified), calibrated on those
       recorded calls: ``"onnxruntime"`` (the default) exports the float copy to ONNX and quantizes it in ONNX
       Runtime's QDQ layout (``convert_to_onnx_int8``), saved as
       ``<log_dir>/ptq_int8.onnx``; ``"inductor"`` goes through torchao's pt2e flow
       (``convert_to_int8``), saved as a compressed ``ptq_int8.pt2`` (the
       ``torch.export`` program is ``quantized_program``, ``None`` for ONNX Runtime); ``"auto"`` builds both,
       times them side by side at batch 1 and the validation batch size (alternated, 1 thread) next to ORT fp32 and
       fp32 eager, and keeps the faster int8 one (``results["backend"]`` and ``results["backend_reason"]``). ORT
       int8 is the faster int8 model on the benchmark nets (docs/benchmarks.md: ResidualCNN 5.03x fp32 eager at
       batch 1 and 2.81x at batch 64, pt2e + Inductor 0.82x / 1.94x). The int8 network is ``quantized_model``,
       an ``nn.Module`` called exactly like the target network for every backend; reload the file with
       ``lightning_compress.load_quantized``.
    3. **Measurement** with your validation logic (your ``validation_step``, or ``test_step`` when run on
       ``trainer.test``) with the float and then the int8 network in place: the ``monitor`` metric and its drop,
       top-1 agreement, per-layer SQNR, size and CPU latency. Logged under ``compress/ptq/`` with a per-layer SQNR
       figure and a markdown summary, and kept in ``results``.
    4. **Accuracy-aware fallback** (``max_accuracy_drop`` with ``monitor``): when the int8 metric drops more than
       allowed, the layers are ranked by sensitivity (the SQNR of the model's output with only that layer in int8,
       lowest first: ``output_sensitivity``; ``sensitivity/<layer>`` in ``results``) and the most sensitive ones are
       kept in float, one more at a time (fewest first), until the budget holds. Every attempt (float layers,
       metric) is in ``attempts``, ``results`` and the logs; if no attempt meets the budget this is reported
       and the attempt with the smallest drop is kept. The search converts with the callback's backend (ONNX
       Runtime: the float layers' nodes are excluded from quantization); under ``"auto"`` the backend is chosen on
       the attempt with no float layer, and the search continues with it.

    Under ``strategy="ddp_spawn"`` training runs in spawned processes: in the process that called ``fit`` this
    callback is a copy that never ran, so ``results`` stays empty and ``quantized_model`` ``None``. Load the
    artifact rank zero saved (``save_path``, default ``<log_dir>/ptq_int8.pt2``) with
    ``lightning_compress.load_quantized``, and read the numbers from the logger.

    Under ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``) every rank takes part in
    gathering the full state dict, rank zero runs all of the above alone on an unsharded copy (from a ``meta``-device
    copy taken in ``setup``) and writes the one artifact, and every rank gets its ``results`` or its error.
    ``FSDPStrategy`` (FSDP1) and ``tensor_parallel_size > 1`` are refused in ``setup``.

    **Example**

    ```python
    ptq = PostTrainingQuantCallback(module="net", monitor="val_acc", max_accuracy_drop=0.005)  # half a point
    trainer = Trainer(callbacks=[ptq], max_epochs=5)
    trainer.fit(model, datamodule=data)
    ptq.quantized_model, ptq.results["val_acc_drop"], ptq.results["float_layers"]
    ```

    Args:
        mode: ``"static"`` (int8 weights per channel and uint8 activations per tensor, calibrated; conv nets),
            ``"dynamic"`` (int8 weights, activations quantized at run time; Linear-heavy models and transformers)
            or ``"weight_only"`` (int8 weights, float compute; size only).
        calibration_batches: Maximum number of calibration batches for ``"static"`` (the other modes run one batch:
            the export example and the per-layer SQNR).
        observer: How static calibration sets activation ranges: ``"histogram"`` (histogram of all values, clipped
            at ``percentile`` on each side: robust to rare outliers), ``"minmax"`` (every value seen),
            ``"moving_average"`` (moving average of each batch's min/max, constant 0.01) or ``"histogram_l2"``
            (torchao's L2-error search, the x86 default).
        calibration_data: ``"train"`` or ``"val"``: the dataloader calibration batches come from. Under
            ``trainer.validate``/``test`` the train dataloader is taken from the datamodule (or the LightningModule)
            when it has one; otherwise the loop's own dataloader is used, with a warning.
        module: Name of the submodule to quantize (e.g. ``"net"``); ``None``: the LightningModule's ``forward``.
        include: Regular expressions searched in Linear/Conv module names (relative to ``module``): quantize only
            these. The others stay float.
        exclude: Regular expressions of Linear/Conv module names to keep in float.
        monitor: A metric your validation logs (e.g. ``"val_acc"``), measured for the float and the int8 network.
            Under ``trainer.test`` the test loop's metric is used: ``monitor`` itself or, if not logged, its test
            counterpart (``val_acc`` → ``test_acc``).
        monitor_mode: ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (e.g. a loss): the sign of the drop.
        max_accuracy_drop: The largest drop of ``monitor`` accepted, in **points of the metric as logged** (its own
            units, no conversion): for an accuracy logged as a fraction, ``0.005`` allows 91.0% → 90.5%; for an
            accuracy logged in percent, ``0.5`` does; for a loss (``monitor_mode="min"``), a rise of the loss.
            ``None``: no fallback.
        max_float_layers: At most this many layers kept in float by the fallback (``None``: no limit).
        backend: ``"onnxruntime"`` (default), ``"inductor"`` or ``"auto"`` (see above). ONNX Runtime has no
            ``"weight_only"`` mode (use ``"inductor"`` for it), calibrates with its own min/max (``observer``,
            ``percentile`` and ``quantize_embeddings`` apply to ``"inductor"``) and needs ``onnx``/``onnxruntime``.
        run_on: When to run: any of ``"fit"`` (end of fit), ``"validate"`` and ``"test"`` (end of a standalone
            ``trainer.validate``/``trainer.test``).
        save_path: Where to save the int8 model; default ``<logger.log_dir>/ptq_int8.onnx`` (``.pt2`` for
            ``"inductor"``). Under ``"auto"`` a ``.pt2``/``.onnx`` suffix becomes the chosen backend's.
        latency: ``"compiled"`` (int8 compiled with Inductor, where its int8 kernels are, vs float eager and
            compiled), ``"eager"``, or ``"off"``.
        latency_batch_sizes: Batch sizes to time; default: 1 and the validation batch size.
        percentile: For ``observer="histogram"``: the range kept, in percent of the values on each side.
        quantize_embeddings: Also store ``nn.Embedding`` tables as int8 (per row, weight-only; default on: on
            all-MiniLM-L6-v2 the file is 0.25x instead of 0.65x of fp32, cosine 0.9914 vs 0.9921). In a small
            transformer they are a third to a half of the size.
        verbose: Print the report on rank zero.
        preflight: Before training (``run_on`` with ``"fit"``), run the whole int8 conversion once on a copy with
            the example input or the first training batch (export, prepare, calibrate on that batch, convert), so
            that a model that cannot be converted fails at once with the reason. Costs one conversion (about 1-3 s
            on the demo nets). ``False``: only the export is tried.
    """

    def __init__(
        self,
        mode: QuantMode = "static",
        calibration_batches: int = 32,
        observer: Observer = DEFAULT_OBSERVER,
        calibration_data: CalibrationData = "train",
        module: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        monitor: str | None = None,
        monitor_mode: MonitorMode = "max",
        max_accuracy_drop: float | None = None,
        max_float_layers: int | None = None,
        backend: Backend = DEFAULT_BACKEND,
        run_on: list[Stage] | None = None,
        save_path: str | None = None,
        latency: LatencyMode = "compiled",
        latency_batch_sizes: list[int] | None = None,
        percentile: float = DEFAULT_PERCENTILE,
        quantize_embeddings: bool = True,
        verbose: bool = True,
        preflight: bool = True,
    ) -> None:
        #: How the int8 model is built (validated here, so bad values fail at construction).
        self.conversion = ConversionConfig(
            mode=mode,
            observer=observer,
            percentile=percentile,
            calibration_batches=calibration_batches,
            quantize_embeddings=quantize_embeddings,
        )
        self.calibration_data = check_choice("calibration_data", calibration_data, get_args(CalibrationData))
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.monitor_mode = check_choice("monitor_mode", monitor_mode, get_args(MonitorMode))
        if max_accuracy_drop is not None:
            if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, (int, float)):
                raise ValueError(f"`max_accuracy_drop` must be a number of points >= 0, got {max_accuracy_drop!r}.")
            if not max_accuracy_drop >= 0:
                raise ValueError(f"`max_accuracy_drop` must be a number of points >= 0, got {max_accuracy_drop!r}.")
            if not monitor:
                raise ValueError(
                    f"`max_accuracy_drop`={max_accuracy_drop!r} needs a `monitor`: the name of a metric your "
                    "validation logs (e.g. monitor='val_acc'), got monitor=None."
                )
        if max_float_layers is not None:
            check_positive_int("max_float_layers", max_float_layers)
        stages: list[str] = list(STAGES) if run_on is None else [run_on] if isinstance(run_on, str) else list(run_on)
        if not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"`run_on` must be a non-empty list of {', '.join(map(repr, STAGES))}, got {run_on!r}.")
        self.latency = check_choice("latency", latency, LATENCY_MODES)
        self.latency_batch_sizes = check_batch_sizes("latency_batch_sizes", latency_batch_sizes)
        self.module = check_optional_str("module", module)
        self.include = include
        self.exclude = exclude
        self.monitor = check_optional_str("monitor", monitor)
        self.max_accuracy_drop = None if max_accuracy_drop is None else float(max_accuracy_drop)
        self.max_float_layers = max_float_layers
        self.run_on = stages
        self.save_path = check_optional_path("save_path", save_path)
        #: The int8 runtime: ``"onnxruntime"``, ``"inductor"`` or ``"auto"``.
        self.backend = check_backend(backend, mode, save_path=self.save_path)
        self.verbose = check_bool("verbose", verbose)
        self.preflight = check_bool("preflight", preflight)

        #: The int8 network of the last run (rank zero), called like the target network; ``None`` before. A
        #: ``QuantizedModule`` (Inductor) or an ``OrtInt8Model`` (ONNX Runtime).
        self.quantized_model: nn.Module | None = None
        #: The same int8 network as a ``torch.export.ExportedProgram`` (for ``compile_int8``, ``int8_weights``) when the
        #: Inductor backend made it;
        #: ``None`` before and for ONNX Runtime (its ONNX bytes are ``quantized_model.onnx_bytes``).
        self.quantized_program: torch.export.ExportedProgram | None = None
        #: The numbers of the last run (also logged under ``compress/ptq/``), with ``"backend"``, ``"saved_to"`` and
        #: ``"input_shapes"`` (the shapes the int8 model takes, e.g. ``"x: (batch, 3, dim_28, dim_28)"``) as strings.
        self.results: dict[str, float | str] = {}
        #: One record per conversion of the last run, in the order tried (the first keeps no layer in float).
        self.attempts: list[FallbackAttempt] = []
        self._catcher = _loops.InputCatcher()
        self._export_checked = False
        self._full = _loops.FullModelOnRankZero()  # FSDP2: the whole model, gathered on rank zero for the run

    @property
    def mode(self) -> str:
        """The conversion mode: ``"static"``, ``"dynamic"`` or ``"weight_only"``."""
        return self.conversion.mode

    @property
    def observer(self) -> str:
        """The calibration observer of static quantization."""
        return self.conversion.observer

    @property
    def calibration_batches(self) -> int:
        """The largest number of calibration batches."""
        return self.conversion.calibration_batches

    @property
    def percentile(self) -> float:
        """The range kept by the ``"histogram"`` observer, in percent."""
        return self.conversion.percentile

    #: What ``CompressionReport`` takes this callback for (see ``callbacks.report.CompressionCallback``).
    compression_role: ClassVar[str] = "quantization"

    def compression_settings(self) -> dict[str, str | int | float]:
        """The settings ``CompressionReport`` puts in its report and in TensorBoard's HParams tab."""
        return {
            "quantization": "ptq",
            "bits": 8,
            "mode": self.mode,
            "observer": self.observer,
            "calibration_batches": int(self.calibration_batches),
            "backend": self.backend,
        }

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, mode=self.mode)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": {
                **self.conversion.to_dict(),
                "module": self.module,
                "monitor": self.monitor,
                "max_accuracy_drop": self.max_accuracy_drop,
                "backend": self.backend,
            }
        }

    def dashboard_categories(self) -> dict[str, list[tuple[str, list[str]]]]:
        """Charts of this callback in the TensorBoard custom-scalars layout."""
        charts = [
            ("per-layer SQNR (dB)", [rf"^{PREFIX}/sqnr/"]),
            ("size (bytes): float vs int8", [rf"^{PREFIX}/(float|int8)_bytes$"]),
        ]
        if self.latency != "off":  # no empty chart when nothing is timed
            charts.append(("latency (ms)", [rf"^{PREFIX}/.*_ms/"]))
        if self.monitor:
            monitor = re.escape(self.monitor)
            charts.insert(0, (f"{self.monitor}: float vs int8", [rf"^{PREFIX}/(float|int8)_{monitor}$"]))
        if self.monitor and self.max_accuracy_drop is not None:  # the fallback logs its attempts only then
            charts.insert(1, ("fallback: metric vs number of float layers", [rf"^{PREFIX}/fallback/"]))
        return {"post-training quantization": charts}

    # ----------------------------------------------------------------------------------------------------------
    # When to run
    # ----------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:  # a reused callback object starts afresh
            self._catcher.detach()
            self._catcher = _loops.InputCatcher()
            self._export_checked = False
            self.results, self.attempts = {}, []
            self.quantized_model = self.quantized_program = None
        # A wrong `module`, a selection that matches nothing or an unwritable `save_path` fail now, not after training.
        select_modules(_loops.target_module(pl_module, self.module), self.include, self.exclude)
        if stage in self.run_on and trainer.is_global_zero:
            check_writable_dir(self._artifact_path(trainer, self.backend), "save_path")
        if stage in self.run_on:  # FSDP2: a meta copy of the model, before `configure_model` shards it
            self._full.capture(trainer, pl_module, type(self).__name__)
        _logging.write_dashboard_layout(trainer)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Fail before training, not after it, when the network cannot be exported.
        if "fit" in self.run_on and self.module is None and pl_module.example_input_array is not None:
            self._check_exportable(pl_module, _loops.example_inputs(pl_module, None, self._catcher))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if "fit" in self.run_on and not self._export_checked:
            self._catcher.attach(_loops.registered_module(pl_module, self.module))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._export_checked and self._catcher.args is not None:
            self._check_exportable(pl_module, (self._catcher.args, self._catcher.kwargs))

    def _check_exportable(self, pl_module: LightningModule, call: Call) -> None:
        self._export_checked = True
        self._catcher.detach()
        if self._full.active:  # FSDP2: every rank takes part in the gather, rank zero tries, all share the outcome
            whole = self._full.gather(pl_module)
            run_on_rank_zero(lambda: self._preflight(whole, call))
        else:
            self._preflight(pl_module, call)

    def _preflight(self, pl_module: LightningModule | None, call: Call) -> None:
        assert pl_module is not None
        network = copy.deepcopy(_loops.target_module(pl_module, self.module)).eval()
        quantized = list(select_modules(network, self.include, self.exclude))
        float_layers = [n for n in select_modules(network) if n not in quantized]
        seconds = _loops.preflight(self.backend, network, call, self.conversion, self.preflight, float_layers)
        if self.verbose and self.preflight:
            rank_zero_info(
                f"PostTrainingQuantCallback preflight: the int8 conversion works on this model ({seconds:.1f} s)."
            )

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and self.monitor and "fit" in self.run_on:
            self._check_monitor(dict(trainer.callback_metrics), "validate")  # fail at the first validation
        elif trainer.state.fn == "validate" and "validate" in self.run_on:
            self.run(trainer, pl_module, "validate")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "test" and "test" in self.run_on:
            self.run(trainer, pl_module, "test")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._catcher.detach()
        if "fit" in self.run_on:
            self.run(trainer, pl_module, "fit")

    # ----------------------------------------------------------------------------------------------------------
    # The run
    # ----------------------------------------------------------------------------------------------------------
    def run(self, trainer: Trainer, pl_module: LightningModule, stage: str = "fit") -> None:
        """Calibrate, convert, measure (and fall back if needed), save and log. Called by the hooks.

        Runs on rank zero. Under FSDP2 every rank calls it: the full model is gathered on rank zero, which runs alone
        on that unsharded copy, and every rank gets ``results`` (or fails with rank zero's error).
        """
        if self._full.active:
            whole = self._full.gather(pl_module)
            self.results = run_on_rank_zero(lambda: self._run(trainer, whole, stage))
        elif trainer.is_global_zero:
            self._run(trainer, pl_module, stage)

    def _run(self, trainer: Trainer, pl_module: LightningModule | None, stage: str) -> dict[str, float | str]:
        assert pl_module is not None
        target = _loops.target_module(pl_module, self.module)
        # A float CPU copy is what gets calibrated, converted and timed; the LightningModule is only read.
        float_net = copy.deepcopy(target).cpu().eval()
        calls = self._calibration_calls(trainer, pl_module, float_net, stage)
        args, kwargs = _loops.at_least_two_rows(calls[0])  # a batch of 1 would export a fixed batch size
        quantized = list(select_modules(float_net, self.include, self.exclude))
        base_skip = [n for n in select_modules(float_net) if n not in quantized]
        float_run = self._evaluate(trainer, pl_module, float_net, stage)
        monitor = self._check_monitor(float_run.metrics, stage) if self.monitor else None
        searching = monitor is not None and self.max_accuracy_drop is not None and self.max_float_layers != 0
        sqnr, sensitivity = self._simulate(trainer, float_net, calls, rank=searching)
        calibration = [_as_item(call) for call in calls] if self.mode == "static" else None
        evaluations: list[Evaluation] = []  # one per attempt
        compact = _loops.channel_removal(trainer, pl_module, self.module, "PostTrainingQuantCallback")

        def convert_with(backend: str, float_layers: tuple[str, ...] = ()) -> AnyInt8:
            skip = base_skip + list(float_layers)
            return convert_with_backend(
                backend,
                float_net,
                args,
                kwargs,
                config=self.conversion,
                calibration=calibration,
                float_layers=skip,
                compact=compact,
            )

        backend, reason, first = self.backend, None, None
        if backend == "auto":  # chosen on the attempt with no float layer; the fallback search goes on with it
            batch_sizes = _loops.latency_batch_sizes(trainer, self.latency_batch_sizes)
            backend, first, reason = convert_auto(convert_with, float_net, args, kwargs, batch_sizes)

        def convert(float_layers: tuple[str, ...]) -> AnyInt8:
            if not float_layers and first is not None:
                return first
            return convert_with(backend, float_layers)

        def evaluate(int8: AnyInt8) -> float | None:
            evaluations.append(self._evaluate(trainer, pl_module, int8_module(int8), stage))
            return evaluations[-1].metrics.get(monitor) if monitor else None

        fallback = find_float_layers(
            convert,
            evaluate,
            # the layer whose int8 error alone hurts the model's output most first (else: the lowest local SQNR)
            ranking=sorted(sensitivity or sqnr, key=lambda name: (sensitivity or sqnr)[name]),
            budget=self.max_accuracy_drop if monitor else None,
            max_float_layers=self.max_float_layers,
            reference=float_run.metrics[monitor] if monitor else math.nan,
            higher_is_better=self.monitor_mode == "max",
            on_attempt=self._report_attempt,
        )
        self.attempts = list(fallback.attempts)
        if not fallback.budget_met:
            rank_zero_warn(
                f"PostTrainingQuantCallback: no mix of float layers tried (up to {len(self.attempts) - 1}, by "
                f"increasing output SQNR) keeps the `{monitor}` drop within "
                f"`max_accuracy_drop`={self.max_accuracy_drop} points; keeping the attempt with the smallest drop"
                " (float layers: "
                f"{', '.join(fallback.kept.float_layers) or 'none'})."
            )
        int8 = fallback.model
        self.quantized_program = int8.program if isinstance(int8, Int8Model) else None
        self.quantized_model = int8_module(int8)
        report = measure_int8(
            int8,
            float_net,
            self._artifact_path(trainer, backend),
            args,
            kwargs,
            layer_sqnr=sqnr,
            monitor=monitor,
            reference_evaluation=float_run,
            int8_evaluation=evaluations[fallback.kept_index],
            higher_is_better=self.monitor_mode == "max",
            latency=self.latency,
            batch_sizes=_loops.latency_batch_sizes(trainer, self.latency_batch_sizes),
        )
        kept_float = int8.skipped if isinstance(int8, Int8Model) else int8.float_layers
        results: dict[str, float | str] = dict(report.to_metrics())
        results["quantized_layers"] = float(report.int8_layers or 0)  # counted in the artifact, not the selection
        results["float_layers"] = ",".join(n for n in kept_float if n not in base_skip)
        results.update(self._attempt_results(monitor, fallback.budget_met))
        results.update({f"sensitivity/{name}": value for name, value in sensitivity.items()})
        results["saved_to"] = report.saved_to
        results["backend"] = backend
        shapes = shapes_taken(int8)
        if shapes is not None:
            results["input_shapes"] = shapes
        results["compact"] = float(compact is not None)
        if reason is not None:
            results["backend_reason"] = reason
        for note in int8.notes if isinstance(int8, Int8Model) else []:
            rank_zero_warn(f"PostTrainingQuantCallback: {note}")
        self.results = results
        self._log(trainer, monitor)
        return results

    def _artifact_path(self, trainer: Trainer, backend: str) -> Path:
        return _loops.int8_artifact_path(trainer, self.save_path, "ptq_int8", backend, self.backend == "auto")

    # ----------------------------------------------------------------------------------------------------------
    # Calibration
    # ----------------------------------------------------------------------------------------------------------
    def _calibration_calls(
        self, trainer: Trainer, pl_module: LightningModule, float_net: nn.Module, stage: str
    ) -> list[Call]:
        """Run the user's ``validation_step`` on calibration batches and record what the target network receives."""
        loader = self._calibration_loader(trainer, pl_module, stage)
        recorder = _loops.Recorder(float_net, keep_inputs=True)
        progress: list[Callback] = []
        # Only static quantization calibrates; the other modes need one batch (export example, per-layer SQNR).
        batches = self.calibration_batches if self.mode == "static" else 1
        if trainer.progress_bar_callback is not None:
            progress.append(_CalibrationProgress(min(batches, _length(loader) or batches)))
        # (A shuffled train loader is fine for calibration: the warning Lightning gives in a validation loop is off.)
        _loops.run_inner_loop(trainer, pl_module, self.module, recorder, "validate", loader, batches, progress)
        if not recorder.inputs:
            where = f"`{self.module}`" if self.module else "`forward`"
            raise RuntimeError(
                f"The calibration batches went through `validation_step` but it never called {where}. Pass the name "
                "of the submodule your steps call as `module` (e.g. module='net')."
            )
        return recorder.inputs

    def _calibration_loader(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> Any:
        wanted = self.calibration_data
        loader = _first(trainer.train_dataloader if wanted == "train" else trainer.val_dataloaders)
        if loader is None:
            loader = _loader_from_hooks(trainer, pl_module, wanted)
        if loader is None:
            own = _first(trainer.val_dataloaders if stage != "test" else trainer.test_dataloaders)
            if own is None:
                raise RuntimeError(
                    f"No dataloader to calibrate on: `calibration_data`={wanted!r} has none under "
                    f"trainer.{stage}(), and neither has the {stage} loop."
                )
            rank_zero_warn(
                f"PostTrainingQuantCallback: no {wanted} dataloader under trainer.{stage}() (give the Trainer a "
                f"datamodule with `{wanted}_dataloader`): calibrating on the {'test' if stage == 'test' else 'val'}"
                " dataloader, the data the int8 model is then measured on."
            )
            loader = own
        return loader

    def _simulate(
        self, trainer: Trainer, float_net: nn.Module, calls: list[Call], rank: bool
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Per-layer SQNR (dB) of a fake-quant simulation of the same scheme, calibrated on the same inputs, and
        with ``rank``, each layer's output sensitivity (the fallback's order).

        SQNR: each layer's int8 output against its float output on the same input (the error that layer adds), one
        forward pass. Sensitivity (``output_sensitivity``): the model's output with only that layer int8, one pass
        per layer, so only when the fallback may search: a layer's local error says little about what it does to
        the result (an early layer's error travels through the whole network).
        """
        fake_quant = copy.deepcopy(float_net).eval()
        if self.mode == "weight_only":
            config = QuantConfig(quantize_activations=False)
        elif self.mode == "dynamic":  # the range of the measured batch itself, as dynamic quantization computes it
            config = QuantConfig(activation_observer="minmax")
            calls = calls[:1]
        elif self.observer == "moving_average":
            config = QuantConfig(activation_observer="moving_average", averaging_constant=0.01)
        elif self.observer == "minmax":
            config = QuantConfig(activation_observer="minmax")
        else:
            c = min(1.0, 1.0 / len(calls))
            config = QuantConfig(activation_observer="histogram", averaging_constant=c, percentile=self.percentile)
        try:
            layers = prepare_qat(fake_quant, config, include=self.include, exclude=self.exclude)
        except ValueError:
            return {}, {}  # only attention out_proj layers are selected: no simulation
        with torch.no_grad():
            for layer in layers.values():
                layer.train()  # observers move in training mode only; everything else (BN, dropout) stays in eval
            for args, kwargs in calls:
                fake_quant(*args, **kwargs)
        args, kwargs = calls[0]
        sqnr = per_layer_sqnr(None, fake_quant, args, kwargs)
        if not rank:
            return sqnr, {}
        bar = _progress_bar(trainer, len(layers), "PTQ layer sensitivity")
        try:
            step = None if bar is None else lambda _layer: bar.update(1)
            sensitivity = output_sensitivity(fake_quant, args, kwargs, progress=step)
        except ValueError as err:  # an output with no floating-point tensor to compare
            rank_zero_warn(f"PostTrainingQuantCallback: the fallback ranks layers by their own SQNR instead: {err}")
            sensitivity = {}
        finally:
            if bar is not None:
                bar.close()
        return sqnr, sensitivity

    # ----------------------------------------------------------------------------------------------------------
    # Conversion, measurement and fallback
    # ----------------------------------------------------------------------------------------------------------
    def _report_attempt(self, attempt: FallbackAttempt) -> None:
        if self.verbose and self.max_accuracy_drop is not None and attempt.metric is not None:
            shown = ", ".join(attempt.float_layers) or "none"
            rank_zero_info(f"PTQ attempt: float layers [{shown}] → {self.monitor}={attempt.metric:.4g}")

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, network: Any, stage: str) -> Evaluation:
        """The user's validation (or test, under ``trainer.test``) loop with ``network`` as the target."""
        loop: Literal["validate", "test"] = "test" if stage == "test" else "validate"
        if (trainer.test_dataloaders if loop == "test" else trainer.val_dataloaders) is None:
            if self.monitor:
                raise RuntimeError(f"`monitor`={self.monitor!r} needs a {loop} dataloader to measure it on; none.")
            return Evaluation({}, [])
        return _loops.evaluate_network(trainer, pl_module, self.module, network, loop)

    def _check_monitor(self, metrics: dict[str, Any], stage: str) -> str:
        """The name of the monitored metric in ``metrics`` (its test counterpart under test); fails clearly."""
        assert self.monitor is not None
        names = [self.monitor]
        if stage == "test" and self.monitor.startswith("val"):
            names.append("test" + self.monitor[3:])
        for name in names:
            if name in metrics:
                return name
        loop = "test" if stage == "test" else "validation"
        available = ", ".join(f"`{k}`" for k in metrics) or "none"
        raise ValueError(f"`monitor`={self.monitor!r} is not logged by the {loop} loop. Logged: {available}.")

    def _attempt_results(self, monitor: str | None, budget_met: bool) -> dict[str, float | str]:
        out: dict[str, float | str] = {"attempts": float(len(self.attempts))}
        if monitor is None or self.max_accuracy_drop is None:
            return out
        out["max_accuracy_drop"] = self.max_accuracy_drop
        out["budget_met"] = float(budget_met)
        for i, attempt in enumerate(self.attempts):
            out[f"attempt_{i}/float_layers"] = ",".join(attempt.float_layers)
            if attempt.metric is not None:
                out[f"attempt_{i}/{monitor}"] = attempt.metric
        return out

    # ----------------------------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------------------------
    def _log(self, trainer: Trainer, monitor: str | None) -> None:
        numbers = {k: v for k, v in self.results.items() if isinstance(v, (int, float)) and "attempt_" not in k}
        step = trainer.global_step
        _logging.log_scalars(trainer, {f"{PREFIX}/{k}": v for k, v in numbers.items()}, step)
        if monitor is not None and self.max_accuracy_drop is not None:
            # One point per attempt, at step = number of layers kept in float: the accuracy/float-layers curve.
            for attempt in self.attempts:
                if attempt.metric is not None:
                    point = {f"{PREFIX}/fallback/{monitor}": attempt.metric}
                    _logging.log_scalars(trainer, point, len(attempt.float_layers))
        sqnr = {k.removeprefix("sqnr/"): v for k, v in numbers.items() if k.startswith("sqnr/")}
        _logging.log_layer_figure(trainer, f"{PREFIX}/per_layer_sqnr", sqnr, "SQNR (dB), higher is better")
        alone = {k.removeprefix("sensitivity/"): v for k, v in numbers.items() if k.startswith("sensitivity/")}
        if alone:
            label = "output SQNR (dB), only this layer int8; lowest kept float first"
            _logging.log_layer_figure(trainer, f"{PREFIX}/per_layer_sensitivity", alone, label)
        headline = {k: v for k, v in self.results.items() if "/" not in k or k.startswith(_logging.HEADLINE_PREFIXES)}
        backend = self.results.get("backend", self.backend)
        title = (
            f"PTQ int8 model ({backend}, {self.mode}, {int(float(self.results['quantized_layers']))} quantized layers)"
        )
        summary = _logging.markdown_summary(title, headline)
        if self.attempts and self.max_accuracy_drop is not None:
            lines = ["", "| attempt | float layers | " + (monitor or "metric") + " |", "|---:|---|---:|"]
            for i, attempt in enumerate(self.attempts):
                metric = "n/a" if attempt.metric is None else f"{attempt.metric:.4g}"
                lines.append(f"| {i} | {', '.join(attempt.float_layers) or 'none'} | {metric} |")
            summary += "\n".join(lines)
        _logging.log_text(trainer, f"{PREFIX}/summary", summary, step)
        if self.verbose:
            rank_zero_info(f"\n{summary}\n")


def _as_item(call: Call) -> Any:
    """A recorded call as a calibration item of ``convert_to_int8``."""
    args, kwargs = call
    if not kwargs:
        return args
    if not args:
        return kwargs
    return ModelCall(args, kwargs)


def _progress_bar(trainer: Trainer, total: int, description: str) -> Any:
    """A tqdm bar of ``total`` steps when the Trainer shows progress bars (on rank zero), else ``None``."""
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


class _CalibrationProgress(Callback):
    """A tqdm bar for the calibration loop (the inner loop's own progress bar is off)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="PTQ calibration", leave=False, dynamic_ncols=True)

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()


def _first(loaders: Any) -> Any:
    """The first dataloader of a Trainer's (possibly list/dict of) dataloaders."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _loader_from_hooks(trainer: Trainer, pl_module: LightningModule, which: str) -> Any:
    """``<which>_dataloader()`` of the datamodule or the LightningModule, outside the loop that would call it."""
    hook = f"{which}_dataloader"
    datamodule = getattr(trainer, "datamodule", None)
    for owner in (datamodule, pl_module):
        if owner is None or not is_overridden(hook, owner):
            continue
        try:
            return _first(getattr(owner, hook)())
        except Exception:
            if owner is datamodule:  # the datamodule was set up for another stage only
                datamodule.setup("fit")
                return _first(getattr(owner, hook)())
            raise
    return None


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
