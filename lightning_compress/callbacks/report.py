"""``CompressionReport``: one summary per run of what the compression callbacks did, for people and for TensorBoard.

The report gathers what the compression callbacks on the Trainer measured (``IterativePruningCallback.results``,
``QATCallback.results``, ``PostTrainingQuantCallback.results``), fills the gaps itself (sparsity, size and float
latency of a run without pruning or quantization, so a dense baseline gets a row too), and writes one summary:

* scalars ``compress/report/<key>`` to every logger;
* a markdown table in TensorBoard's Text tab (``compress/report/summary``);
* ``compression_report.json`` and ``compression_report.md`` in the run directory (``logger.log_dir``);
* the run's compression settings with its final metric, size and latency in TensorBoard's HParams tab, so runs
  compare side by side.

Why a callback and not only a function: it has to act at two moments. The settings must reach TensorBoard's HParams
tab in ``setup``, before Lightning writes its own hparams session (TensorBoard keeps the first one of a run). The
results are gathered in ``teardown``, which Lightning calls after every callback's ``on_fit_end``, so the report
sees the int8 measurements whatever the order of the callbacks. The gathering itself is the plain function
``summarize``, usable without a Trainer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, get_args, runtime_checkable

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks import _logging, _loops
from lightning_compress.engine.config import MonitorMode
from lightning_compress.engine.convert import model_size_bytes
from lightning_compress.engine.io import write_atomically
from lightning_compress.engine.masks import measure_sparsity
from lightning_compress.engine.measure import measure_latency
from lightning_compress.engine.selection import select_parameters
from lightning_compress.engine.validation import check_batch_sizes, check_bool, check_choice, check_optional_str

PREFIX = f"{_logging.PREFIX}/report"
#: Batch sizes timed by default (the demo's table: single requests and a batch).
DEFAULT_LATENCY_BATCH_SIZES = (1, 64)
#: The settings every report declares, with their value when the technique is not used: all runs share these
#: columns, so they line up in TensorBoard's HParams tab.
NO_SETTINGS: dict[str, str | int | float] = {
    "method": "dense",
    "target_sparsity": 0.0,
    "schedule": "none",
    "scope": "none",
    "structure": "none",
    "quantization": "none",
    "bits": 32,
    "mode": "none",
    "observer": "none",
    "calibration_batches": 0,
}


@runtime_checkable
class CompressionCallback(Protocol):
    """What ``CompressionReport`` reads from a compression callback; the callbacks of this package implement it,
    and so can your own (the report never imports them).

    Attributes:
        compression_role: ``"pruning"`` or ``"quantization"``: which part of the report the callback fills.
        results: The numbers the callback measured (its documented keys), empty until it ran.
    """

    compression_role: ClassVar[str]
    results: dict[str, float]

    def compression_settings(self) -> dict[str, str | int | float]:
        """The callback's settings, in the columns of ``NO_SETTINGS`` (e.g. ``target_sparsity``, ``mode``)."""
        ...


#: The roles a report knows, in the order their settings are combined.
ROLES = ("pruning", "quantization")


def find_callbacks(callbacks: Iterable[Any]) -> dict[str, CompressionCallback]:
    """The first compression callback of each role in ``callbacks``, by role (``"pruning"``, ``"quantization"``)."""
    found: dict[str, CompressionCallback] = {}
    for cb in callbacks:
        if isinstance(cb, CompressionCallback) and cb.compression_role in ROLES:
            found.setdefault(cb.compression_role, cb)
    return found


def compression_settings(callbacks: Mapping[str, CompressionCallback]) -> dict[str, str | int | float]:
    """The settings of the callbacks found by ``find_callbacks``, in the fixed schema of ``NO_SETTINGS``."""
    settings = dict(NO_SETTINGS)
    methods = []
    for role in ROLES:
        if (cb := callbacks.get(role)) is not None:
            own = cb.compression_settings()
            settings.update({k: v for k, v in own.items() if k in NO_SETTINGS})
            methods.append("prune" if role == "pruning" else str(own.get("quantization", "quant")))
    settings["method"] = "+".join(methods) or "dense"
    return settings


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def summarize(
    *,
    monitor: str | None = None,
    monitor_mode: MonitorMode = "max",
    trained_metric: float | None = None,
    baseline_metric: float | None = None,
    uncompressed: tuple[float, int] | None = None,
    pruning: Mapping[str, Any] | None = None,
    quantization: Mapping[str, Any] | None = None,
    measured: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Combine what the callbacks measured into one flat summary (no logging; the callback writes it).

    Args:
        monitor: Name of the metric (e.g. ``"val_acc"``); the metric keys are named after it.
        monitor_mode: ``"max"`` (higher is better: drop = before - after) or ``"min"`` (a loss: drop = after -
            before), as in ``PostTrainingQuantCallback``: a positive drop is always a loss of quality.
        trained_metric: The metric of the model as trained (dense, pruned, or fake-quantized for QAT).
        baseline_metric: The metric "before" compression when known from elsewhere (e.g. the dense run's).
        uncompressed: ``(metric, step)`` of the last validation of this fit before pruning or fake quantization
            started: the baseline of pruning and QAT runs (their own "before" is already compressed).
        pruning: ``IterativePruningCallback.results``.
        quantization: ``QATCallback.results`` or ``PostTrainingQuantCallback.results``.
        measured: Measurements of the float model used where the callbacks did not provide them: ``sparsity``,
            ``nonzero_params``, ``total_params``, ``float_bytes`` and ``float_ms/batch_<N>``.

    Returns:
        ``<monitor>_before`` (``baseline_metric``; else, when pruning or QAT ran, ``uncompressed`` with its step as
        ``<monitor>_before_step``; else the float metric for PTQ, the fake-quant metric for QAT, else
        ``trained_metric``), ``<monitor>`` (the deployed model's: int8 when quantized), ``<monitor>_drop``
        (the loss of quality, in the metric's units as logged; see ``monitor_mode``); ``sparsity``, ``nonzero_params``,
        ``total_params``,
        ``sparse_bytes``; ``float_bytes``, ``size_bytes`` (the artifact: int8 program when quantized, else the float
        ``state_dict``), ``size_ratio``; ``float_ms/batch_<N>``, ``latency_ms/batch_<N>`` (the artifact),
        ``speedup/batch_<N>``; ``output_sqnr_db``, ``min_layer_sqnr_db``, ``mean_layer_sqnr_db``,
        ``top1_agreement``. Keys without data are left out.
    """
    pruning, quantization, measured = pruning or {}, quantization or {}, measured or {}
    out: dict[str, float] = {}
    quant = {k: v for k, v in ((k, _number(v)) for k, v in quantization.items()) if v is not None}
    if monitor:
        quant_before = quant.get(f"float_{monitor}", quant.get(f"fake_quant_{monitor}"))
        # Pruning and QAT measure "before" on a model that is already compressed (pruned, fake-quantized): a loss
        # against the dense model would hide. Their baseline is the last validation before compression started.
        compressed_before = bool(pruning) or f"fake_quant_{monitor}" in quant
        before = baseline_metric
        if before is None and compressed_before and uncompressed is not None:
            before = uncompressed[0]
            out[f"{monitor}_before_step"] = float(uncompressed[1])
        before = before if before is not None else quant_before
        before = before if before is not None else trained_metric
        after = quant.get(f"int8_{monitor}", trained_metric)
        if before is not None:
            out[f"{monitor}_before"] = float(before)
        if after is not None:
            out[monitor] = float(after)
        if before is not None and after is not None:
            drop = float(before) - float(after)
            out[f"{monitor}_drop"] = drop if monitor_mode == "max" else -drop

    for key in ("sparsity", "nonzero_params", "total_params"):
        value = _number(pruning.get(key, measured.get(key)))
        if value is not None:
            out[key] = value
    if (sparse := _number(pruning.get("sparse_bytes"))) is not None:
        out["sparse_bytes"] = sparse

    float_bytes = quant.get("float_bytes", measured.get("float_bytes"))
    if float_bytes is not None:
        out["float_bytes"] = float(float_bytes)
        out["size_bytes"] = float(quant.get("int8_bytes", float_bytes))
        out["size_ratio"] = out["size_bytes"] / out["float_bytes"]

    sizes = sorted({int(k.rsplit("_", 1)[1]) for k in (*quant, *measured) if k.startswith("float_ms/batch_")})
    for n in sizes:
        float_ms = quant.get(f"float_ms/batch_{n}", measured.get(f"float_ms/batch_{n}"))
        deployed = quant.get(f"int8_ms/batch_{n}") if quantization else float_ms
        if float_ms is not None:
            out[f"float_ms/batch_{n}"] = float(float_ms)
        if deployed is not None:
            out[f"latency_ms/batch_{n}"] = float(deployed)
            if float_ms is not None:
                out[f"speedup/batch_{n}"] = float(float_ms) / float(deployed)

    layer_sqnr = [v for k, v in quant.items() if k.startswith("sqnr/") and math.isfinite(v)]
    if layer_sqnr:
        out["min_layer_sqnr_db"] = min(layer_sqnr)
        out["mean_layer_sqnr_db"] = sum(layer_sqnr) / len(layer_sqnr)
    for source, key in (("int8_vs_fake_quant_sqnr_db", "output_sqnr_db"), ("output_sqnr_db", "output_sqnr_db")):
        if source in quant:
            out[key] = quant[source]
    if "top1_agreement" in quant:
        out["top1_agreement"] = quant["top1_agreement"]
    return out


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has no such
    numbers; e.g. an int8 output identical to the fake-quant one has an infinite SQNR)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def markdown_report(title: str, settings: Mapping[str, Any], results: Mapping[str, float], monitor: str | None) -> str:
    """The summary as markdown: a settings line and a table of the results, in reading order."""
    used = {k: v for k, v in settings.items() if v != NO_SETTINGS.get(k)}
    lines = [f"**{title}**", "", "settings: " + (", ".join(f"{k}={v}" for k, v in used.items()) or "dense"), ""]
    lines += ["| measure | value |", "|---|---:|"]
    for key, value in results.items():
        lines.append(f"| {key} | {_format(key, value, monitor)} |")
    return "\n".join(lines)


def _format(key: str, value: float, monitor: str | None) -> str:
    if key.endswith("_bytes"):
        return f"{value / 1e3:,.1f} kB"
    if key in ("sparsity", "size_ratio", "top1_agreement"):
        return f"{value:.2%}"
    if key.endswith("params"):
        return f"{value:,.0f}"
    if monitor and key.startswith(monitor) and abs(value) <= 1.0:
        return f"{value:.4f}"
    return f"{value:.4g}"


class CompressionReport(Callback):
    r"""Write one summary per run of the compression callbacks' results: loggers, TensorBoard text and HParams, files.

    Add it to a Trainer next to ``IterativePruningCallback``, ``QATCallback`` and/or
    ``PostTrainingQuantCallback`` (in any order), or alone for a dense baseline. After ``fit`` (and after
    ``validate``/``test`` when a PTQ callback quantized the model there) it writes:

    * scalars ``compress/report/<key>`` (the keys of ``summarize``) to every logger, and
      ``compress/report/<monitor>_vs_sparsity`` with step = sparsity in per mille, so that the Custom Scalars tab
      draws the final metric of every run against its sparsity;
    * a markdown table to TensorBoard's Text tab, tag ``compress/report/summary``;
    * ``compression_report.json`` (``run``, ``monitor``, ``settings``, ``results``) and ``compression_report.md``
      in the run directory (the first logger's ``log_dir``, else ``default_root_dir``);
    * TensorBoard HParams: the settings of ``NO_SETTINGS`` (the same columns in every run) with the metrics
      ``compress/report/<monitor>``, ``<monitor>_drop``, ``sparsity``, ``nonzero_params``, ``size_bytes``,
      ``size_ratio`` and ``latency_ms/batch_<N>``. This works with ``TensorBoardLogger(default_hp_metric=True)``
      too: the session is declared in ``setup``, before Lightning's placeholder one, which TensorBoard then ignores.

    It also writes the custom-scalars layout of all compression callbacks plus its own charts, once per run.

    **Example**

    ```python
    trainer = Trainer(callbacks=[IterativePruningCallback(0.9, monitor="val_acc"), CompressionReport("val_acc")])
    trainer.fit(model, datamodule=data)
    trainer.callbacks[1].results["sparsity"]  # also in <log_dir>/compression_report.json
    ```

    Args:
        monitor: A metric the validation logs (e.g. ``"val_acc"``): reported before and after compression.
        baseline_metric: The metric before compression when it comes from another run (e.g. the dense model's
            validation accuracy); by default the float (PTQ) or fake-quant (QAT) model's, else the trained model's.
        module: The submodule that is deployed (e.g. ``"net"``), for the float size and latency measured here
            when no quantization callback measured them; ``None``: the LightningModule.
        latency_batch_sizes: Batch sizes at which latency is reported (float eager, 1 thread, median, measured
            here on ``example_input_array`` repeated to the batch size, unless a quantization callback timed them:
            give it the same batch sizes). ``None``: 1 and 64; ``[]``: no latency.
        hparams: Write the settings and results to TensorBoard's HParams tab.
        verbose: Print the summary on rank zero.
        monitor_mode: ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (e.g. a loss): the sign of
            ``<monitor>_drop``, which is positive when compression lost quality (as in PostTrainingQuantCallback).
    """

    def __init__(
        self,
        monitor: str | None = None,
        baseline_metric: float | None = None,
        module: str | None = None,
        latency_batch_sizes: list[int] | None = None,
        hparams: bool = True,
        verbose: bool = True,
        monitor_mode: MonitorMode = "max",
    ) -> None:
        sizes = list(DEFAULT_LATENCY_BATCH_SIZES) if latency_batch_sizes is None else latency_batch_sizes
        sizes = check_batch_sizes("latency_batch_sizes", sizes) or []
        self.monitor_mode: MonitorMode = monitor_mode
        check_choice("monitor_mode", monitor_mode, get_args(MonitorMode))
        check_optional_str("monitor", monitor)
        check_optional_str("module", module)
        check_bool("hparams", hparams)
        check_bool("verbose", verbose)
        if baseline_metric is not None and (_number(baseline_metric) is None or not math.isfinite(baseline_metric)):
            raise ValueError(f"`baseline_metric` must be a finite number or None, got {baseline_metric!r}.")
        if baseline_metric is not None and monitor is None:
            raise ValueError("`baseline_metric` needs `monitor`: the name of the metric it is a value of.")
        self.monitor = monitor
        self.baseline_metric = baseline_metric
        self.module = module
        self.latency_batch_sizes = sizes
        self.hparams = hparams
        self.verbose = verbose
        #: The summary of the last report (keys of ``summarize``); empty before.
        self.results: dict[str, float] = {}
        #: The compression settings of the run (the columns of ``NO_SETTINGS``).
        self.settings: dict[str, str | int | float] = {}
        #: Where the JSON report was written, ``None`` before.
        self.path: Path | None = None
        self._reported_quant: dict[str, Any] | None = None
        self._monitor_seen = False
        self._uncompressed: tuple[float, int] | None = None  # (metric, step) before compression started

    def dashboard_categories(self) -> dict[str, list[tuple[str, list[str]]]]:
        """Charts of the report in the TensorBoard custom-scalars layout (they compare runs)."""
        charts: list[tuple[str, list[str]]] = []
        if self.monitor:
            m = re.escape(self.monitor)
            charts.append(
                (
                    f"{self.monitor} vs sparsity, all runs (x axis: sparsity in per mille)",
                    [rf"^{_logging.PREFIX}/{m}_vs_sparsity$", rf"^{PREFIX}/{m}_vs_sparsity$"],
                )
            )
            charts.append((f"{self.monitor}: before vs after compression", [rf"^{PREFIX}/{m}(_before)?$"]))
        charts += [
            ("sparsity", [rf"^{PREFIX}/sparsity$"]),
            ("size on disk (bytes): float vs artifact", [rf"^{PREFIX}/(float|size)_bytes$"]),
            ("latency (ms): float vs artifact", [rf"^{PREFIX}/(float|latency)_ms/"]),
            ("quantization error: SQNR (dB)", [rf"^{PREFIX}/(output|min_layer|mean_layer)_sqnr_db$"]),
        ]
        return {"compression report": charts}

    def hparam_metric_tags(self) -> list[str]:
        """The metric tags shown in the HParams tab."""
        keys = [self.monitor, f"{self.monitor}_drop"] if self.monitor else []
        keys += ["sparsity", "nonzero_params", "size_bytes", "size_ratio"]
        # The speed-up, not the latency: it is measured alternately with the float model in the same process, so
        # it compares across runs measured at different moments of a noisy machine; absolute times do not.
        keys += [f"speedup/batch_{n}" for n in self.latency_batch_sizes]
        return [f"{PREFIX}/{k}" for k in keys]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _loops.target_module(pl_module, self.module)  # a `module` that does not exist fails now, not after training
        if self.monitor and stage == "fit" and not is_overridden("validation_step", pl_module):
            raise ValueError(
                f"`monitor`={self.monitor!r} needs a validation loop, but {type(pl_module).__name__} does not define"
                " `validation_step`."
            )
        self.settings = compression_settings(find_callbacks(getattr(trainer, "callbacks", [])))
        if stage == "fit":
            self._uncompressed = None
        _logging.write_dashboard_layout(trainer)
        if self.hparams:
            # Before Lightning's own hparams session (written after on_fit_start), so TensorBoard keeps this one.
            _logging.start_hparams_session(trainer, self.settings, self.hparam_metric_tags())

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The first validation (the sanity check, or the first epoch's) tells whether `monitor` is logged at all.
        if self.monitor and not self._monitor_seen and trainer.state.fn == "fit":
            self._trained_metric(trainer)
            self._monitor_seen = True
        # The last validation before any callback compressed the model is the baseline of pruning and QAT runs.
        started = any(getattr(c, "compression_started", False) for c in getattr(trainer, "callbacks", []))
        value = _number(trainer.callback_metrics.get(self.monitor)) if self.monitor else None
        if trainer.state.fn == "fit" and not started and value is not None:
            self._uncompressed = (value, trainer.global_step)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning calls teardown after every callback's on_fit_end: the int8 results exist by now.
        if not trainer.is_global_zero or stage not in ("fit", "validate", "test"):
            return
        callbacks = find_callbacks(getattr(trainer, "callbacks", []))
        quant_cb = callbacks.get("quantization")
        quant = dict(quant_cb.results) if quant_cb is not None else {}
        new_quant = bool(quant) and quant != self._reported_quant
        if stage != "fit" and not new_quant:
            return  # e.g. trainer.test after fit: nothing new to report
        self._reported_quant = quant
        self.report(trainer, pl_module, callbacks, quant)

    def report(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        callbacks: Mapping[str, CompressionCallback],
        quant: Mapping[str, Any],
    ) -> dict[str, float]:
        """Gather, write and log the summary now (called by ``teardown``; callable from a script too)."""
        pruning_cb = callbacks.get("pruning")
        self.settings = compression_settings(callbacks)
        self.results = summarize(
            monitor=self.monitor,
            monitor_mode=self.monitor_mode,
            trained_metric=self._trained_metric(trainer),
            baseline_metric=self.baseline_metric,
            uncompressed=self._uncompressed,
            pruning=pruning_cb.results if pruning_cb is not None else None,
            quantization=quant,
            measured=self._measure(pl_module, pruning_cb, quant),
        )
        self._warn_about_the_baseline(pruning_cb, quant)
        self._write(trainer)
        return self.results

    def _warn_about_the_baseline(self, pruning_cb: CompressionCallback | None, quant: Mapping[str, Any]) -> None:
        """Say when ``<monitor>_before`` is not a trained, uncompressed model's metric."""
        if not self.monitor or self.baseline_metric is not None:
            return
        step = self.results.get(f"{self.monitor}_before_step")
        compressed_before = pruning_cb is not None or f"fake_quant_{self.monitor}" in quant
        if compressed_before and step is None:
            rank_zero_warn(
                f"CompressionReport: no validation ran before compression started, so `{self.monitor}_before` is the"
                " compressed (pruned or fake-quant) model's own metric. Pass `baseline_metric` (e.g. the dense run's"
                " value), or start compression later."
            )
        elif step == 0:
            rank_zero_warn(
                f"CompressionReport: `{self.monitor}_before` was measured at step 0, before any training (compression"
                " started with it). Right for a pretrained model; for a model trained from scratch pass"
                " `baseline_metric` (the dense run's value)."
            )

    # ----------------------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------------------
    def _trained_metric(self, trainer: Trainer) -> float | None:
        if not self.monitor:
            return None
        if self.monitor not in trainer.callback_metrics:
            available = ", ".join(f"`{k}`" for k in trainer.callback_metrics) or "none"
            raise ValueError(
                f"`monitor`={self.monitor!r} was not logged in this run, so the report cannot include it."
                f" Metrics logged: {available}."
            )
        return float(trainer.callback_metrics[self.monitor])

    def _measure(
        self, pl_module: LightningModule, pruning_cb: CompressionCallback | None, quant: Mapping[str, Any]
    ) -> dict[str, float]:
        """What the callbacks did not measure: sparsity, float size and float latency of the deployed network."""
        target = _loops.target_module(pl_module, self.module)
        measured: dict[str, float] = {}
        if pruning_cb is None or not pruning_cb.results:
            try:
                stats = measure_sparsity(select_parameters(target, None, None))
            except ValueError:  # no Linear/Conv weights: no sparsity to speak of
                pass
            else:
                measured.update(
                    sparsity=stats.sparsity, nonzero_params=float(stats.nonzero), total_params=float(stats.total_numel)
                )
        if "float_bytes" not in quant:
            measured["float_bytes"] = float(model_size_bytes(target))
        missing = [n for n in self.latency_batch_sizes if f"float_ms/batch_{n}" not in quant]
        example = pl_module.example_input_array
        if missing and isinstance(example, torch.Tensor):
            measured.update(_float_latency(target, example, missing))
        return measured

    def _write(self, trainer: Trainer) -> None:
        step = trainer.global_step
        numbers = {f"{PREFIX}/{k}": v for k, v in self.results.items()}
        if self.hparams:
            _logging.log_hparams(trainer, self.settings, numbers, step)
        else:
            _logging.log_scalars(trainer, numbers, step)
        if self.monitor and self.monitor in self.results and "sparsity" in self.results:
            point = {f"{PREFIX}/{self.monitor}_vs_sparsity": self.results[self.monitor]}
            _logging.log_scalars(trainer, point, step=round(1000 * self.results["sparsity"]))

        path = _loops.artifact_path(trainer, None, "compression_report.json")
        run = _run_name(trainer, path.parent)
        summary = markdown_report(f"Compression report: {run}", self.settings, self.results, self.monitor)
        _logging.log_text(trainer, f"{PREFIX}/summary", summary, step)
        document = {"run": run, "monitor": self.monitor, "settings": self.settings, "results": self.results}
        write_atomically(path, (json.dumps(jsonable(document), indent=2) + "\n").encode())
        write_atomically(path.with_suffix(".md"), (summary + "\n").encode())
        self.path = path
        if self.verbose:
            rank_zero_info(f"\n{summary}\n\nReport written to {path} and {path.with_suffix('.md').name}\n")


def _run_name(trainer: Trainer, log_dir: Path) -> str:
    """``name/version_N`` of the first logger that has them, else the directory's name."""
    for logger in trainer.loggers:
        name, version = getattr(logger, "name", None), getattr(logger, "version", None)
        if name and version is not None:
            return f"{name}/{version if isinstance(version, str) else f'version_{version}'}"
    return log_dir.name


def _float_latency(model: nn.Module, example: torch.Tensor, batch_sizes: list[int]) -> dict[str, float]:
    """Median eager latency (ms, 1 thread) of ``model`` on ``example`` repeated to each batch size."""
    was_training = model.training
    model.eval()
    try:
        results = {}
        for n in batch_sizes:
            one = example.detach()[:1].to(next(model.parameters()).device)
            batch = one.expand(n, *one.shape[1:]).contiguous()
            results[f"float_ms/batch_{n}"] = measure_latency(model, batch, warmup=3, repeats=15)["median_ms"]
    finally:
        model.train(was_training)
    return results
