"""``IterativePruningCallback``: gradual magnitude pruning scheduled over optimizer steps."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_compress.callbacks import _figures, _logging
from lightning_compress.engine.masks import (
    CRITERIA,
    SCOPES,
    STRUCTURES,
    MaskApplier,
    compute_masks,
    measure_sparsity,
    pack_mask,
    unpack_mask,
)
from lightning_compress.engine.schedules import sparsity_at_step, validate_schedule
from lightning_compress.engine.selection import select_parameters
from lightning_compress.engine.validation import check_choice, check_fraction, check_optional_step

PREFIX = f"{_logging.PREFIX}/sparsity"
UPDATES_PER_RAMP = 100  # default number of mask updates when `update_every_n_steps` is None


class IterativePruningCallback(Callback):
    r"""Prune a model gradually while it trains, to an absolute target sparsity.

    At each mask update the smallest-magnitude weights (``global``: across all selected tensors) are zeroed so that
    exactly ``round(s * N)`` of the ``N`` selected weights are zero, where ``s`` follows ``schedule`` from
    ``initial_sparsity`` at ``start_step`` to ``target_sparsity`` at ``end_step``. Steps are optimizer steps
    (``trainer.global_step``), so gradient accumulation is accounted for.

    Masks are applied in place: after every optimizer step the pruned weights are set back to zero (and their
    gradients are zeroed before it), so momentum or weight decay cannot revive them. There is no reparametrization:
    parameter objects and ``state_dict`` keys never change, checkpoints load into the plain model, ``deepcopy``
    works, and quantization-aware training composes. The masks (bit-packed) and the schedule position are saved
    in the checkpoint, so ``trainer.fit(ckpt_path=...)`` resumes exactly.

    Example::

        from lightning import Trainer
        from lightning_compress import IterativePruningCallback

        trainer = Trainer(callbacks=[IterativePruningCallback(target_sparsity=0.9, monitor="val_acc")])

    Args:
        target_sparsity: Fraction of selected weights that are zero from ``end_step`` on, in [0, 1).
        schedule: ``"cubic"`` (Zhu & Gupta), ``"linear"``, ``"exponential"`` or ``"constant"`` (one shot).
        initial_sparsity: Target at ``start_step``, in [0, ``target_sparsity``].
        start_step: Optimizer step of the first mask update.
        end_step: Optimizer step at which ``target_sparsity`` is reached. ``None``: ``end_fraction`` of
            ``trainer.estimated_stepping_batches``, leaving the rest of training to recover at the target.
        update_every_n_steps: Steps between mask updates. ``None``: about 100 updates over the ramp.
        scope: ``"global"`` (one magnitude ranking across all selected tensors) or ``"local"`` (each tensor pruned
            to the target on its own).
        structure: ``"unstructured"`` (single weights) or ``"channel"`` (whole output channels, by RMS norm; they
            are zeroed, not removed).
        criterion: ``"magnitude"`` or ``"random"`` (seeded by ``seed``; identical on every DDP rank).
        include: Regular expressions searched in full parameter names (``"net.fc1.weight"``); when given, the
            parameters matching any of them are pruned instead of the default (every ``weight`` of ``nn.Linear``
            and ``nn.ConvNd``). Biases and normalization layers are pruned only if included explicitly.
        exclude: Regular expressions of parameter names never to prune.
        end_fraction: Fraction of ``trainer.estimated_stepping_batches`` used as ``end_step`` when it is ``None``.
        monitor: A metric the LightningModule logs in validation (e.g. ``"val_acc"``). At every validation end the
            pair (sparsity, metric) is recorded and drawn as an accuracy-vs-sparsity curve.
        rewind_to_step: Lottery-ticket rewinding (off by default). The selected weights are snapshotted at this
            step (<= ``start_step``) and, after every mask update, the surviving weights are reset to the snapshot.
        seed: Seed of the ``random`` criterion.
        verbose: Print a sparsity summary on rank zero at the end of fit.
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        schedule: Literal["cubic", "linear", "exponential", "constant"] = "cubic",
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int | None = None,
        update_every_n_steps: int | None = None,
        scope: Literal["global", "local"] = "global",
        structure: Literal["unstructured", "channel"] = "unstructured",
        criterion: Literal["magnitude", "random"] = "magnitude",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        end_fraction: float = 0.75,
        monitor: str | None = None,
        rewind_to_step: int | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        validate_schedule(schedule, initial_sparsity, target_sparsity, start_step, end_step, update_every_n_steps)
        check_choice("scope", scope, SCOPES)
        check_choice("structure", structure, STRUCTURES)
        check_choice("criterion", criterion, CRITERIA)
        check_fraction("end_fraction", end_fraction, include_one=True)
        if end_fraction == 0.0:
            raise ValueError("`end_fraction` must be in (0, 1], got 0.0.")
        check_optional_step("rewind_to_step", rewind_to_step)
        if rewind_to_step is not None and rewind_to_step > start_step:
            raise ValueError(
                f"`rewind_to_step` must be <= `start_step` ({start_step}) so the snapshot is taken before pruning,"
                f" got {rewind_to_step}."
            )
        self.target_sparsity = float(target_sparsity)
        self.schedule = schedule
        self.initial_sparsity = float(initial_sparsity)
        self.start_step = start_step
        self.end_step = end_step
        self.update_every_n_steps = update_every_n_steps
        self.scope = scope
        self.structure = structure
        self.criterion = criterion
        self.include = include
        self.exclude = exclude
        self.end_fraction = end_fraction
        self.monitor = monitor
        self.rewind_to_step = rewind_to_step
        self.seed = seed
        self.verbose = verbose

        self._weights: dict[str, torch.nn.Parameter] = {}
        self._masks: dict[str, Tensor] = {}
        self._applier = MaskApplier({}, {})  # the masks in the form the per-step hooks use
        self._current_target = 0.0  # target the masks were last computed for
        self._last_step = -1  # global_step at which masks were last re-applied
        self._history: list[tuple[int, float, float]] = []  # (step, sparsity, monitored metric) per validation
        self._rewind_snapshot: dict[str, Tensor] = {}
        self._pending_state: dict[str, Any] | None = None
        self._resolved_end_step = end_step
        self._resolved_frequency = update_every_n_steps
        #: The summary measured at fit end (also logged under ``compress/final/``): ``sparsity``, ``target_sparsity``,
        #: ``nonzero_params``, ``total_params``, ``dense_bytes``, ``sparse_bytes`` and ``sparsity/<parameter>``.
        self.results: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, structure=self.structure)

    @property
    def history(self) -> list[tuple[int, float, float]]:
        """``(step, sparsity, monitored metric)`` recorded at each validation end during fit (with ``monitor``)."""
        return list(self._history)

    def dashboard_categories(self) -> dict[str, list[tuple[str, list[str]]]]:
        """Charts of this callback in the TensorBoard custom-scalars layout."""
        charts = [
            ("sparsity: target vs measured", [rf"^{PREFIX}$", rf"^{_logging.PREFIX}/target_sparsity$"]),
            ("per-layer sparsity", [rf"^{PREFIX}/"]),
        ]
        if self.monitor:
            curve = (f"{self.monitor} vs sparsity (x axis: sparsity in per mille)", [re.escape(self._curve_tag())])
            charts.append(curve)
        return {"pruning": charts}

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._weights = select_parameters(pl_module, self.include, self.exclude)
        if self.monitor and not is_overridden("validation_step", pl_module):
            raise ValueError(
                f"`monitor`={self.monitor!r} needs a validation loop, but "
                f"{type(pl_module).__name__} does not define `validation_step`."
            )
        self._resolve_steps(trainer)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        self._masks = {name: mask.to(self._weights[name].device) for name, mask in self._masks.items()}
        self._applier = MaskApplier(self._weights, self._masks)
        _logging.write_dashboard_layout(trainer)
        self._step(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._applier.mask_gradients()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._last_step:  # an optimizer step happened
            self._step(trainer)

    @override
    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_monitor(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.monitor or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_monitor(trainer)
        sparsity = measure_sparsity(self._weights).sparsity
        metric = float(trainer.callback_metrics[self.monitor])
        self._history.append((trainer.global_step, sparsity, metric))
        _logging.log_scalars(trainer, {self._curve_tag(): metric}, step=round(1000 * sparsity))
        curve = _figures.metric_vs_sparsity({"this run": [(s, m) for _, s, m in self._history]}, metric=self.monitor)
        _logging.log_figure(
            trainer, f"{_logging.PREFIX}/pruning/{self.monitor}_vs_sparsity", curve, trainer.global_step
        )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stats = measure_sparsity(self._weights)
        step = trainer.global_step
        final = {
            "sparsity": stats.sparsity,
            "nonzero_params": float(stats.nonzero),
            "dense_bytes": float(stats.dense_bytes()),
            "sparse_bytes": float(stats.sparse_bytes()),
        }
        _logging.log_scalars(trainer, {f"{_logging.PREFIX}/final/{k}": v for k, v in final.items()}, step)
        per_layer = stats.per_tensor()
        self.results = {
            **final,
            "target_sparsity": self.target_sparsity,
            "total_params": float(stats.total_numel),
            **{f"sparsity/{name}": value for name, value in per_layer.items()},
        }
        figure = _figures.per_layer_bars(per_layer, title="sparsity per layer", xlabel="sparsity", limit_one=True)
        _logging.log_figure(trainer, f"{_logging.PREFIX}/pruning/per_layer_sparsity", figure, step)
        rows = [
            (name, stats.numels[name], stats.numels[name] - stats.zeros[name], per_layer[name]) for name in per_layer
        ]
        rows.append(("all selected weights", stats.total_numel, stats.nonzero, stats.sparsity))
        table = _markdown_table(rows)
        size = (
            f"dense {stats.dense_bytes() / 1e6:.3f} MB, sparse (values + bitmask) {stats.sparse_bytes() / 1e6:.3f} MB"
        )
        _logging.log_text(trainer, f"{_logging.PREFIX}/pruning/summary", f"{table}\n\n{size}", step)
        if self.verbose:
            rank_zero_info(f"\nIterativePruningCallback summary (step {step}):\n{table}\n{size}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: pack_mask(mask) for name, mask in self._masks.items()},
            "mask_shapes": {name: list(mask.shape) for name, mask in self._masks.items()},
            "current_target": self._current_target,
            "last_step": self._last_step,
            "history": [list(point) for point in self._history],
            "rewind_snapshot": {name: t.detach().cpu().clone() for name, t in self._rewind_snapshot.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start, once the selected parameters are known (Lightning restores callbacks earlier).
        self._pending_state = state_dict

    # ----------------------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------------------
    def _resolve_steps(self, trainer: Trainer) -> None:
        """Fix ``end_step`` and the update frequency from the length of training when they were left to us."""
        if self.end_step is None:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise ValueError(
                    "`end_step`=None needs a finite training length to derive it from: set `end_step`, or the"
                    " Trainer's `max_steps`/`max_epochs`."
                )
            self._resolved_end_step = self.start_step + max(
                1, round(self.end_fraction * (int(total) - self.start_step))
            )
        end_step = self._resolved_end_step
        assert end_step is not None
        validate_schedule(self.schedule, self.initial_sparsity, self.target_sparsity, self.start_step, end_step)
        if self.update_every_n_steps is None:
            self._resolved_frequency = max(1, (end_step - self.start_step) // UPDATES_PER_RAMP)

    def _target(self, step: int) -> float:
        assert self._resolved_end_step is not None and self._resolved_frequency is not None
        return sparsity_at_step(
            step,
            final_sparsity=self.target_sparsity,
            start_step=self.start_step,
            end_step=self._resolved_end_step,
            initial_sparsity=self.initial_sparsity,
            schedule=self.schedule,
            frequency=self._resolved_frequency,
        )

    def _step(self, trainer: Trainer) -> None:
        """After an optimizer step: re-zero pruned weights, update masks when the schedule says so, log."""
        step = trainer.global_step
        self._last_step = step
        self._applier.apply()
        if self.rewind_to_step == step and not self._rewind_snapshot:
            self._rewind_snapshot = {name: w.detach().clone() for name, w in self._weights.items()}
        target = self._target(step)
        updated = target > self._current_target
        if updated:
            self._masks = compute_masks(
                self._weights,
                target,
                scope=self.scope,
                structure=self.structure,
                criterion=self.criterion,
                current_masks=self._masks,
                seed=self.seed,
            )
            self._current_target = target
            self._applier = MaskApplier(self._weights, self._masks)
            if self._rewind_snapshot:
                with torch.no_grad():
                    for name, weight in self._weights.items():
                        weight.copy_(self._rewind_snapshot[name].to(weight.device))
            self._applier.apply()
        if updated or step % max(getattr(trainer, "log_every_n_steps", 50), 1) == 0:
            self._log_sparsity(trainer, target)

    def _log_sparsity(self, trainer: Trainer, target: float) -> None:
        stats = measure_sparsity(self._weights)
        metrics = {PREFIX: stats.sparsity, f"{_logging.PREFIX}/target_sparsity": target}
        metrics.update({f"{PREFIX}/{name}": value for name, value in stats.per_tensor().items()})
        _logging.log_scalars(trainer, metrics, step=trainer.global_step)

    def _check_monitor(self, trainer: Trainer) -> None:
        if self.monitor and self.monitor not in trainer.callback_metrics:
            available = ", ".join(f"`{k}`" for k in trainer.callback_metrics) or "none"
            raise ValueError(
                f"`monitor`={self.monitor!r} is not logged by the LightningModule. Metrics logged so far: {available}."
            )

    def _curve_tag(self) -> str:
        return f"{_logging.PREFIX}/{self.monitor}_vs_sparsity"

    def _restore(self, state: dict[str, Any]) -> None:
        """Rebuild masks and progress from a checkpoint, checking they fit the selected parameters."""
        shapes = state["mask_shapes"]
        unknown = sorted(set(shapes) - set(self._weights))
        if unknown:
            raise ValueError(
                f"The checkpoint has pruning masks for {unknown}, which the current selection"
                f" (`include`={self.include!r}, `exclude`={self.exclude!r}) does not contain."
            )
        for name, shape in shapes.items():
            if list(self._weights[name].shape) != list(shape):
                raise ValueError(
                    f"The checkpoint's mask for {name!r} has shape {list(shape)}, the parameter has"
                    f" {list(self._weights[name].shape)}."
                )
        self._masks = {name: unpack_mask(packed, shapes[name]) for name, packed in state["masks"].items()}
        self._current_target = float(state["current_target"])
        self._last_step = int(state["last_step"])
        self._history = [(int(s), float(sp), float(m)) for s, sp, m in state.get("history", [])]
        self._rewind_snapshot = {
            name: t.to(self._weights[name].device) for name, t in state.get("rewind_snapshot", {}).items()
        }


def _markdown_table(rows: list[tuple[str, int, int, float]]) -> str:
    lines = ["| parameter | weights | non-zero | sparsity |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {numel:,} | {nonzero:,} | {sparsity:.2%} |" for name, numel, nonzero, sparsity in rows]
    return "\n".join(lines)
