"""``GradualPruner``: the masks of a set of weights, moved along a sparsity schedule, one optimizer step at a time.

The pruner owns everything about pruning that does not depend on Lightning: which target the schedule gives at a
step, when masks are recomputed, applying them in place, rewinding, statistics, and the checkpoint form of its
state (bit-packed masks, with shape and integrity checks on load). A training loop calls ``GradualPruner.step``
after every optimizer step, ``GradualPruner.mask_gradients`` before it and ``GradualPruner.after_optimizer_step``
right after ``optimizer.step()`` (an optimizer step post-hook); that is all.

Examples:
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

import warnings
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress.engine.config import PruningConfig
from lightning_compress.engine.distributed import local_tensor
from lightning_compress.engine.masks import (
    MaskApplier,
    NonFiniteWeightsError,
    SparsityStats,
    compute_masks,
    measure_sparsity,
    pack_mask,
    unpack_mask,
)
from lightning_compress.engine.schedules import sparsity_at_step
from lightning_compress.engine.structured import (
    ChannelGroup,
    compute_group_masks,
    n_m_eligible,
    n_m_masks,
    tensor_masks,
)

#: Optimizers that leave an entry with zero weight, zero gradient and zero state exactly zero (their updates are
#: elementwise and proportional to the gradient, the state or the weight), so masked gradients keep pruned weights at
#: zero without a pass over the weights. Exact types: a subclass may change ``step``.
ZERO_PRESERVING: frozenset[type] = frozenset(
    {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
    }
)


class GradualPruner:
    """Prune ``weights`` gradually to ``config.target_sparsity``, in place.

    Args:
        weights: The tensors to prune, by name (usually ``nn.Parameter`` objects of a model; they are modified in
            place and never replaced).
        config: A resolved ``PruningConfig`` (see its ``resolve``).
        protected: Names of weights never pruned (kept in the statistics).
        groups: With ``structure="channel"``, the channel groups to prune
            (``find_channel_groups``); ``weights`` must then hold every
            tensor they couple (parameters and BatchNorm running means). Masks cover all of them.

    With an ``"N:M"`` structure, weights whose input dimension is not a multiple of ``M`` are left out (with a
    warning naming them). The N:M masks are computed at ``start_step`` and recomputed at every update until
    ``end_step`` (the schedule's intermediate targets do not apply: the pattern has one sparsity), then fixed;
    pruned weights are held at zero, so a recomputation only moves where live weights shrank to zero.

    Sharded weights (FSDP2 ``DTensor`` parameters, ``shard_group`` given): masks, statistics and checkpoints hold
    this process's rows; the ranking is exact over all shards without a gather
    (``distributed``), so exactly ``round(s * N)`` weights of the full model are zero.

    Raises:
        ValueError: If ``config`` still has ``end_step`` or ``update_every_n_steps`` left open, or
            ``structure="channel"`` comes without ``groups``, or sharded weights come with channel structure or
            rewinding.
    """

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        config: PruningConfig,
        protected: Collection[str] = (),
        groups: Sequence[ChannelGroup] | None = None,
        shard_group: Any = None,
    ) -> None:
        if not config.is_resolved:
            raise ValueError(
                "GradualPruner needs a resolved config: call `config.resolve(total_steps)` first"
                f" (got end_step={config.end_step}, update_every_n_steps={config.update_every_n_steps})."
            )
        if config.structure == "channel" and groups is None:
            raise ValueError(
                "GradualPruner with `structure`='channel' needs `groups` (engine.structured.find_channel_groups)."
            )
        weights = dict(weights)
        n_m = config.n_m
        if n_m is not None:
            eligible, excluded = n_m_eligible(weights, n_m[1])
            if excluded:
                warnings.warn(
                    f"`structure`={config.structure!r} leaves out {len(excluded)} weight(s) whose input dimension is"
                    f" not a multiple of {n_m[1]}: {', '.join(excluded)}.",
                    stacklevel=2,
                )
            weights = {name: weights[name] for name in eligible}
        #: The channel groups (``structure="channel"``), else empty.
        self.groups: list[ChannelGroup] = list(groups or [])
        missing = sorted({t for g in self.groups for t in g.tensors} - set(weights))
        if missing:
            raise ValueError(f"`weights` lacks tensors the channel groups couple: {missing}.")
        #: Channel keep-vectors by group name (``structure="channel"``).
        self.group_masks: dict[str, Tensor] = {}
        self.weights = weights
        self.config = config
        #: The process group over which the weights are sharded (FSDP2), else ``None``.
        self.shard_group = shard_group
        if shard_group is not None and (config.structure == "channel" or config.rewind_to_step is not None):
            raise ValueError(
                "Sharded weights (FSDP2) are pruned with unstructured or N:M masks and without rewinding, got"
                f" `structure`={config.structure!r}, `rewind_to_step`={config.rewind_to_step!r}."
            )
        self.protected = tuple(name for name in protected if name in self.weights)
        #: Boolean keep-masks (``True`` = kept) of the weights pruned so far.
        self.masks: dict[str, Tensor] = {}
        #: The target sparsity the masks were last computed for.
        self.current_target = 0.0
        #: The last step ``step`` was called with (``-1`` before the first call).
        self.last_step = -1
        self._rewind_snapshot: dict[str, Tensor] = {}
        self._applier = MaskApplier({}, {})
        self._masks_version = 0  # bumped whenever the masks change
        self._grads_masked = False  # mask_gradients ran since the last optimizer step
        # Optimizers whose state was masked, with the masks version they were masked for.
        self._clean_state: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

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

        Call it after every optimizer step (and ``apply`` right after each ``optimizer.step()``, e.g. as an
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
        config = self.config
        if config.rewind_to_step == step and not self._rewind_snapshot:
            self._rewind_snapshot = {name: w.detach().clone() for name, w in self.weights.items()}
        if config.n_m is not None:
            return self._step_n_m(step)
        target = self.target(step)
        if target <= self.current_target:
            return False
        if config.structure == "channel":
            self._check_finite(step)
            self.group_masks = compute_group_masks(
                self.groups,
                self.weights,
                target,
                scope=config.scope,
                criterion=config.criterion,
                current=self.group_masks,
                seed=config.seed,
                round_to=config.round_to,
                min_channels_per_group=config.min_channels_per_group,
            )
            self.masks = self._group_tensor_masks()
        else:
            if config.criterion != "magnitude":
                self._check_finite(step)
            try:  # magnitude ranking finds NaN/Inf itself, at no cost when there is none
                self.masks = compute_masks(
                    self._local_weights(),
                    target,
                    scope=config.scope,
                    structure=config.structure,  # type: ignore[arg-type]  # "unstructured" here
                    criterion=config.criterion,
                    current_masks=self.masks,
                    seed=config.seed,
                    protected=self.protected,
                    group=self.shard_group,
                )
            except NonFiniteWeightsError as error:
                self._raise_non_finite(error.counts, step)
        self._set_masks(target)
        return True

    def _step_n_m(self, step: int) -> bool:
        config = self.config
        assert config.n_m is not None and config.end_step is not None and config.update_every_n_steps is not None
        due = (step - config.start_step) % config.update_every_n_steps == 0 or not self.masks
        if step < config.start_step or (self.masks and step > config.end_step) or not due:
            return False
        self._check_finite(step)
        masks = n_m_masks(self._local_weights(), *config.n_m)
        if self.masks and all(torch.equal(masks[n], self.masks[n]) for n in masks):
            return False
        self.masks = masks
        self._set_masks(config.target_sparsity)
        return True

    def _group_tensor_masks(self) -> dict[str, Tensor]:
        shapes = {name: w.shape for name, w in self.weights.items()}
        masks = tensor_masks(self.groups, self.group_masks, shapes)
        return {name: mask.to(self.weights[name].device) for name, mask in masks.items()}

    def channel_counts(self) -> tuple[int, int]:
        """``(pruned, C)`` channels over the groups (``structure="channel"``)."""
        total = sum(g.channels for g in self.groups)
        kept = sum(
            int(self.group_masks[g.name].sum()) if g.name in self.group_masks else g.channels for g in self.groups
        )
        return total - kept, total

    def _set_masks(self, target: float) -> None:
        self.current_target = target
        self._new_applier()
        if self._rewind_snapshot:
            with torch.no_grad():
                for name, weight in self.weights.items():
                    weight.copy_(self._rewind_snapshot[name].to(weight.device))
        self._applier.apply()

    def _new_applier(self) -> None:
        self._applier = MaskApplier(self.weights, self.masks)
        self._masks_version += 1

    def apply(self) -> None:
        """Zero the pruned weights in place."""
        self._applier.apply()

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights in place (before an optimizer step, so gradient clipping and the
        optimizer's statistics ignore them)."""
        self._applier.mask_gradients()
        self._grads_masked = True

    def after_optimizer_step(self, optimizer: Any) -> None:
        """Keep the pruned weights exactly zero after ``optimizer.step()`` (an optimizer step post-hook).

        A full pass over the weights is skipped when it would change nothing: the gradients were masked before
        this step (``mask_gradients``) and ``optimizer`` is one whose update of an entry with zero weight, zero
        gradient and zero state is exactly zero (``ZERO_PRESERVING``: SGD with any momentum, Nesterov or weight
        decay; Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad), with its state zeroed at the pruned entries
        since the masks last changed. Otherwise the weights are re-zeroed (and such an optimizer's state is
        masked, once per mask change), so the guarantee holds for every optimizer.
        """
        grads_masked, self._grads_masked = self._grads_masked, False
        preserving = type(optimizer) in ZERO_PRESERVING
        if grads_masked and preserving and self._clean_state.get(optimizer) == self._masks_version:
            self._applier.apply_static()  # buffers (BatchNorm running means) move in forward, not in the step
            return
        self._applier.apply()
        if preserving:
            self._applier.mask_state(optimizer)
            self._clean_state[optimizer] = self._masks_version

    def stats(self) -> SparsityStats:
        """Exact zero counts of the pruned weights, now (of the whole tensors when they are sharded)."""
        stats = measure_sparsity(self._local_weights())
        if self.shard_group is None:
            return stats
        names = list(stats.numels)
        counts = torch.tensor([[stats.zeros[n], stats.numels[n]] for n in names], dtype=torch.int64)
        dist.all_reduce(counts, group=self.shard_group)
        return SparsityStats(
            zeros={n: int(c[0]) for n, c in zip(names, counts, strict=True)},
            numels={n: int(c[1]) for n, c in zip(names, counts, strict=True)},
        )

    def _local_weights(self) -> dict[str, Tensor]:
        """The weights, or this process's shards of them."""
        return {name: local_tensor(w) for name, w in self.weights.items()}

    def report(self) -> PruningReport:
        """The measured sparsity against the final target."""
        channels = self.channel_counts() if self.config.structure == "channel" else None
        return PruningReport(self.config.target_sparsity, self.current_target, self.stats(), channels)

    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed) and progress as tensors and plain values (loadable with ``weights_only=True``).

        With sharded weights every process's masks are gathered (a collective: call it on every process), because
        a distributed checkpoint keeps the callback state of rank zero only; each process loads its own part.
        """
        state = self._own_state_dict()
        if self.shard_group is None:
            return state
        parts: list[Any] = [None] * dist.get_world_size(self.shard_group)
        dist.all_gather_object(parts, {k: state.pop(k) for k in ("masks", "mask_shapes")}, group=self.shard_group)
        return {**state, "shards": parts}

    def _own_state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: pack_mask(mask) for name, mask in self.masks.items()},
            "mask_shapes": {name: list(mask.shape) for name, mask in self.masks.items()},
            "current_target": self.current_target,
            "last_step": self.last_step,
            "rewind_snapshot": {name: t.detach().cpu().clone() for name, t in self._rewind_snapshot.items()},
            "group_masks": {name: pack_mask(keep) for name, keep in self.group_masks.items()},
            "group_channels": {name: int(keep.numel()) for name, keep in self.group_masks.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and progress saved by ``state_dict``, checking that they fit the weights.

        Call it once the weights hold the checkpoint's values: every position a mask prunes must be exactly zero
        in them, else the checkpoint does not belong to these weights (or its masks were altered).

        Raises:
            ValueError: If a mask names a weight that is not pruned here, has another shape, is truncated, or
                prunes positions whose weights are not zero.
        """
        if "shards" in state:
            state = self._own_shard_state(state)
        shapes = state["mask_shapes"]
        unknown = sorted(set(shapes) - set(self.weights))
        if unknown:
            raise ValueError(
                f"The checkpoint has pruning masks for {unknown}, which the current selection"
                f" (`include`={self.config.include!r}, `exclude`={self.config.exclude!r}) does not contain."
            )
        masks = {}
        local_weights = self._local_weights()
        for name, shape in shapes.items():
            weight = local_weights[name]
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
        groups = {g.name: g for g in self.groups}
        group_masks = {}
        for name, channels in state.get("group_channels", {}).items():
            if name not in groups or groups[name].channels != int(channels):
                raise ValueError(
                    f"The checkpoint has a channel mask for group {name!r} ({channels} channels), which the network's"
                    f" channel groups do not have ({ {g.name: g.channels for g in self.groups} }): the model or the"
                    " selection changed."
                )
            group_masks[name] = unpack_mask(state["group_masks"][name], [int(channels)])
        self.group_masks = group_masks
        if self.groups:
            rebuilt = self._group_tensor_masks()
            if set(rebuilt) != set(masks) or any(not torch.equal(rebuilt[n], masks[n]) for n in masks):
                raise ValueError("The checkpoint's channel masks and tensor masks disagree (the masks were altered).")
        self.masks = masks
        self.current_target = float(state["current_target"])
        self.last_step = int(state["last_step"])
        self._rewind_snapshot = {
            name: t.to(self.weights[name].device) for name, t in state.get("rewind_snapshot", {}).items()
        }
        self._new_applier()

    def _own_shard_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """This process's masks out of a checkpoint written with sharded weights."""
        shards = state["shards"]
        world = dist.get_world_size(self.shard_group) if self.shard_group is not None else 1
        if len(shards) != world:
            raise ValueError(
                f"The checkpoint's pruning masks were written by {len(shards)} sharded processes, this run has {world}:"
                " resume with the same number of data-parallel processes."
            )
        rank = dist.get_rank(self.shard_group) if self.shard_group is not None else 0
        return {**state, **shards[rank]}

    def _check_finite(self, step: int) -> None:
        local = self._local_weights()
        # A sum is NaN or Inf when an entry is (or, rarely, when finite entries overflow it): one read of each weight
        # and no tensor-sized temporary; entries are counted exactly only in a tensor whose sum is not finite.
        counts = []
        for weight in local.values():
            finite = bool(torch.isfinite(weight.detach().sum(dtype=torch.float32)))
            counts.append(0 if finite else int((~torch.isfinite(weight.detach())).sum()))
        bad_counts = torch.tensor(counts, dtype=torch.int64)
        if self.shard_group is not None:  # every process raises together (else the others hang in a collective)
            dist.all_reduce(bad_counts, group=self.shard_group)
        self._raise_non_finite(dict(zip(local, bad_counts.tolist(), strict=True)), step)

    @staticmethod
    def _raise_non_finite(counts: Mapping[str, int], step: int) -> None:
        for name, bad in counts.items():
            if bad:
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
        channels: ``(pruned, C)`` channels of channel pruning (``None`` otherwise).
    """

    target_sparsity: float
    applied_target: float
    stats: SparsityStats
    channels: tuple[int, int] | None = None

    @property
    def target_reached(self) -> bool:
        """Whether the masks were computed for the final target (the schedule ran to its end)."""
        return self.applied_target >= self.target_sparsity

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """The report as flat numbers: ``sparsity``, ``target_sparsity``, ``target_reached`` (0/1),
        ``nonzero_params``, ``total_params``, ``dense_bytes``, ``sparse_bytes`` and ``sparsity/<tensor>``; with channel
        pruning also ``channel_sparsity``, ``pruned_channels`` and ``prunable_channels`` (``C``)."""
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
        if self.channels is not None:
            pruned, total = self.channels
            metrics.update(
                {
                    "channel_sparsity": pruned / max(total, 1),
                    "pruned_channels": float(pruned),
                    "prunable_channels": float(total),
                }
            )
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
        if self.channels is not None:
            pruned, total = self.channels
            share = pruned / max(total, 1)
            size += f"; channels pruned {pruned} of {total} ({share:.2%}, target {self.target_sparsity:.2%})"
        return "\n".join(lines) + "\n\n" + size
