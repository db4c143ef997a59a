"""``GradualPruner``: the masks of a set of weights, moved along a sparsity schedule, one optimizer step at a time.

The pruner owns everything about pruning that does not depend on Lightning: which target the schedule gives at a
step, when masks are recomputed, applying them in place, rewinding, statistics, and the checkpoint form of its
state (bit-packed masks, with shape and integrity checks on load). A training loop calls :meth:`GradualPruner.step`
after every optimizer step and :meth:`GradualPruner.mask_gradients` before it; that is all.

Example:
    >>> from torch import nn
    >>> from lightning_compress.engine.config import PruningConfig
    >>> net = nn.Linear(10, 10)
    >>> pruner = GradualPruner({"weight": net.weight}, PruningConfig(target_sparsity=0.5, end_step=10).resolve(None))
    >>> pruner.step(10)  # at end_step the target is reached
    True
    >>> pruner.stats().sparsity
    0.5
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_compress.engine.config import PruningConfig
from lightning_compress.engine.masks import (
    MaskApplier,
    SparsityStats,
    compute_masks,
    measure_sparsity,
    pack_mask,
    unpack_mask,
)
from lightning_compress.engine.schedules import sparsity_at_step


class GradualPruner:
    """Prune ``weights`` gradually to ``config.target_sparsity``, in place.

    Args:
        weights: The tensors to prune, by name (usually ``nn.Parameter`` objects of a model; they are modified in
            place and never replaced).
        config: A resolved :class:`~lightning_compress.engine.config.PruningConfig` (see its ``resolve``).
        protected: Names of weights never pruned (kept in the statistics). With ``structure="channel"`` pass the
            output layer's weight (:func:`~lightning_compress.engine.selection.output_layer_weight`): its channels
            are the network's outputs.

    Raises:
        ValueError: If ``config`` still has ``end_step`` or ``update_every_n_steps`` left open.
    """

    def __init__(self, weights: Mapping[str, Tensor], config: PruningConfig, protected: Collection[str] = ()) -> None:
        if not config.is_resolved:
            raise ValueError(
                "GradualPruner needs a resolved config: call `config.resolve(total_steps)` first"
                f" (got end_step={config.end_step}, update_every_n_steps={config.update_every_n_steps})."
            )
        self.weights = dict(weights)
        self.config = config
        self.protected = tuple(name for name in protected if name in self.weights)
        #: Boolean keep-masks (``True`` = kept) of the weights pruned so far.
        self.masks: dict[str, Tensor] = {}
        #: The target sparsity the masks were last computed for.
        self.current_target = 0.0
        #: The last step :meth:`step` was called with (``-1`` before the first call).
        self.last_step = -1
        self._rewind_snapshot: dict[str, Tensor] = {}
        self._applier = MaskApplier({}, {})

    def target(self, step: int) -> float:
        """The schedule's target sparsity after ``step`` optimizer steps."""
        config = self.config
        assert config.end_step is not None and config.update_every_n_steps is not None
        return sparsity_at_step(
            step,
            final_sparsity=config.target_sparsity,
            start_step=config.start_step,
            end_step=config.end_step,
            initial_sparsity=config.initial_sparsity,
            schedule=config.schedule,
            frequency=config.update_every_n_steps,
        )

    def step(self, step: int) -> bool:
        """Advance to optimizer step ``step``: update the masks when the schedule's target moved.

        Call it after every optimizer step (and :meth:`apply` right after each ``optimizer.step()``, e.g. as an
        optimizer step post-hook, so pruned weights are zero whenever anything else looks at them).

        Args:
            step: Optimizer steps taken so far (``trainer.global_step``).

        Returns:
            Whether the masks were recomputed.

        Raises:
            FloatingPointError: If a weight holds NaN or Inf when the masks are recomputed (a magnitude ranking of
                NaN is meaningless, and a NaN pruned weight would no longer be zero).
        """
        self.last_step = step
        if self.config.rewind_to_step == step and not self._rewind_snapshot:
            self._rewind_snapshot = {name: w.detach().clone() for name, w in self.weights.items()}
        target = self.target(step)
        if target <= self.current_target:
            return False
        self._check_finite(step)
        self.masks = compute_masks(
            self.weights,
            target,
            scope=self.config.scope,
            structure=self.config.structure,
            criterion=self.config.criterion,
            current_masks=self.masks,
            seed=self.config.seed,
            protected=self.protected,
        )
        self.current_target = target
        self._applier = MaskApplier(self.weights, self.masks)
        if self._rewind_snapshot:
            with torch.no_grad():
                for name, weight in self.weights.items():
                    weight.copy_(self._rewind_snapshot[name].to(weight.device))
        self._applier.apply()
        return True

    def apply(self) -> None:
        """Zero the pruned weights in place (after an optimizer step)."""
        self._applier.apply()

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights in place (before an optimizer step, so momentum cannot revive them)."""
        self._applier.mask_gradients()

    def stats(self) -> SparsityStats:
        """Exact zero counts of the pruned weights, now."""
        return measure_sparsity(self.weights)

    def report(self) -> PruningReport:
        """The measured sparsity against the final target."""
        return PruningReport(self.config.target_sparsity, self.current_target, self.stats())

    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed) and progress as tensors and plain values (loadable with ``weights_only=True``)."""
        return {
            "masks": {name: pack_mask(mask) for name, mask in self.masks.items()},
            "mask_shapes": {name: list(mask.shape) for name, mask in self.masks.items()},
            "current_target": self.current_target,
            "last_step": self.last_step,
            "rewind_snapshot": {name: t.detach().cpu().clone() for name, t in self._rewind_snapshot.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and progress saved by :meth:`state_dict`, checking that they fit the weights.

        Call it once the weights hold the checkpoint's values: every position a mask prunes must be exactly zero
        in them, else the checkpoint does not belong to these weights (or its masks were altered).

        Raises:
            ValueError: If a mask names a weight that is not pruned here, has another shape, is truncated, or
                prunes positions whose weights are not zero.
        """
        shapes = state["mask_shapes"]
        unknown = sorted(set(shapes) - set(self.weights))
        if unknown:
            raise ValueError(
                f"The checkpoint has pruning masks for {unknown}, which the current selection"
                f" (`include`={self.config.include!r}, `exclude`={self.config.exclude!r}) does not contain."
            )
        masks = {}
        for name, shape in shapes.items():
            weight = self.weights[name]
            if list(weight.shape) != list(shape):
                raise ValueError(
                    f"The checkpoint's mask for {name!r} has shape {list(shape)},"
                    f" the parameter has {list(weight.shape)}."
                )
            mask = unpack_mask(state["masks"][name], shape).to(weight.device)
            revived = int(torch.count_nonzero(weight.detach()[~mask]))
            if revived:
                raise ValueError(
                    f"The checkpoint's mask for {name!r} prunes {revived} weights that are not zero in the restored"
                    " model: the masks do not belong to these weights (or were altered)."
                )
            masks[name] = mask
        self.masks = masks
        self.current_target = float(state["current_target"])
        self.last_step = int(state["last_step"])
        self._rewind_snapshot = {
            name: t.to(self.weights[name].device) for name, t in state.get("rewind_snapshot", {}).items()
        }
        self._applier = MaskApplier(self.weights, self.masks)

    def _check_finite(self, step: int) -> None:
        for name, weight in self.weights.items():
            if not bool(torch.isfinite(weight.detach()).all()):
                bad = int((~torch.isfinite(weight.detach())).sum())
                raise FloatingPointError(
                    f"{bad} entries of {name!r} are NaN or Inf at step {step}: the pruning masks cannot be updated."
                    " Check the loss and the input batches (e.g. `Trainer(detect_anomaly=True)`), or lower the"
                    " learning rate."
                )


@dataclass(frozen=True)
class PruningReport:
    """What pruning achieved, measured from the weights.

    Attributes:
        target_sparsity: The configured final target.
        applied_target: The target the masks were last computed for (below ``target_sparsity`` when training
            stopped before the end of the ramp).
        stats: Exact zero counts per pruned tensor.
    """

    target_sparsity: float
    applied_target: float
    stats: SparsityStats

    @property
    def target_reached(self) -> bool:
        """Whether the masks were computed for the final target (the schedule ran to its end)."""
        return self.applied_target >= self.target_sparsity

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """The report as flat numbers: ``sparsity``, ``target_sparsity``, ``target_reached`` (0/1),
        ``nonzero_params``, ``total_params``, ``dense_bytes``, ``sparse_bytes`` and ``sparsity/<tensor>``."""
        stats = self.stats
        metrics = {
            "sparsity": stats.sparsity,
            "target_sparsity": self.target_sparsity,
            "target_reached": float(self.target_reached),
            "nonzero_params": float(stats.nonzero),
            "total_params": float(stats.total_numel),
            "dense_bytes": float(stats.dense_bytes()),
            "sparse_bytes": float(stats.sparse_bytes()),
            **{f"sparsity/{name}": value for name, value in stats.per_tensor().items()},
        }
        return {f"{prefix}{key}": value for key, value in metrics.items()}

    def markdown(self) -> str:
        """A table of every pruned tensor plus the total, and the storage sizes."""
        stats = self.stats
        lines = ["| parameter | weights | non-zero | sparsity |", "|---|---:|---:|---:|"]
        for name, sparsity in stats.per_tensor().items():
            numel = stats.numels[name]
            lines.append(f"| {name} | {numel:,} | {numel - stats.zeros[name]:,} | {sparsity:.2%} |")
        lines.append(f"| all selected weights | {stats.total_numel:,} | {stats.nonzero:,} | {stats.sparsity:.2%} |")
        size = (
            f"dense {stats.dense_bytes() / 1e6:.3f} MB, sparse (values + bitmask) {stats.sparse_bytes() / 1e6:.3f} MB"
        )
        return "\n".join(lines) + "\n\n" + size
