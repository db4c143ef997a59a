"""Pruning masks: computing them, applying them in place, packing them for checkpoints, measuring sparsity.

Masks are boolean tensors shaped like the weights they belong to (``True`` = keep). They are applied in place
(``weight.mul_(mask)``) rather than through ``torch.nn.utils.prune``'s reparametrization, so parameter objects and
``state_dict`` keys never change.

Mask computation guarantees, at target sparsity ``s`` over ``N`` candidate weights (``unstructured``):

* exactly ``round(s * N)`` weights are pruned (``global``: counted over all tensors; ``local``: per tensor);
* already-pruned weights stay pruned (their score is below every live weight's), so masks only grow;
* ties are broken deterministically by position, so every DDP rank computes the same masks from the same weights.

With ``structure="channel"``, whole output channels (dim 0) are pruned by their RMS magnitude (L2 norm divided by
the square root of the channel's size, so channels of layers with different fan-in compare fairly in ``global``
scope), and ``round(s * C)`` of the ``C`` candidate channels are pruned.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress.engine.config import Criterion, Scope, Structure
from lightning_compress.engine.distributed import (
    MagnitudeKeys,
    NonFiniteError,
    keep_masks,
    local_tensor,
    lowest_k_cut,
    scratch,
)
from lightning_compress.engine.validation import check_choice, check_fraction

SCOPES: tuple[str, ...] = get_args(Scope)
STRUCTURES: tuple[str, ...] = get_args(Structure)
CRITERIA: tuple[str, ...] = get_args(Criterion)

_PRUNED_SCORE = -1.0  # below any magnitude or uniform random score, so pruned entries are always chosen first


def _scores(
    weight: Tensor, mask: Tensor | None, structure: str, criterion: str, generator: torch.Generator | None
) -> Tensor:
    """A flat score per prunable unit (weight or output channel); low scores are pruned first."""
    if structure == "channel":
        rows = weight.detach().reshape(weight.shape[0], -1).float()
        if criterion == "magnitude":
            score = rows.norm(dim=1) / rows.shape[1] ** 0.5
        else:
            score = torch.rand(rows.shape[0], generator=generator).to(weight.device)
        if mask is not None:
            score[~mask.reshape(mask.shape[0], -1).any(dim=1)] = _PRUNED_SCORE
        return score
    if criterion == "magnitude":
        score = weight.detach().abs().flatten().float()
    else:
        score = torch.rand(weight.numel(), generator=generator).to(weight.device)
    if mask is not None:
        score[~mask.flatten()] = _PRUNED_SCORE
    return score


def _lowest_k(scores: Tensor, k: int) -> Tensor:
    """Boolean "prune" vector marking exactly the ``k`` lowest scores; ties go to the lowest index."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return pruned
    if k >= scores.numel():
        return ~pruned
    threshold = torch.kthvalue(scores.cpu(), k).values.to(scores.device)
    pruned = scores < threshold
    ties = scores == threshold
    missing = k - int(pruned.sum())
    if missing == int(ties.sum()):
        return pruned | ties
    # Only some of the tied entries fit under k: take the first ones in flat order.
    return pruned | (ties & (torch.cumsum(ties, 0) <= missing))


def compute_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Scope = "global",
    structure: Structure = "unstructured",
    criterion: Criterion = "magnitude",
    current_masks: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    protected: Collection[str] = (),
    group: Any = None,
) -> dict[str, Tensor]:
    """Compute boolean keep-masks so that a fraction ``sparsity`` of the weights (or channels) is pruned.

    With ``structure="channel"`` every tensor keeps at least its highest-scored channel (a layer with no output
    channel left would cut the network), so at most ``C - (number of tensors)`` channels are pruned.

    Args:
        weights: The tensors to prune, by name.
        sparsity: Target fraction of pruned units, in [0, 1].
        scope: ``"global"`` (one ranking across all tensors) or ``"local"`` (each tensor separately).
        structure: ``"unstructured"`` (single weights) or ``"channel"`` (whole output channels).
        criterion: ``"magnitude"`` (smallest absolute values / channel RMS first) or ``"random"``.
        current_masks: Masks already in force; every unit they prune stays pruned.
        seed: Seed of the ``random`` criterion. The same seed gives the same random ranking on every call and every
            rank, so random masks also only grow.
        protected: Names of tensors never pruned (an all-``True`` mask); they do not count in the ranking.
        group: For sharded weights (FSDP2): the process group whose processes hold the other shards. ``weights``
            are then this process's local shards, counts are over the whole tensors, and the ranking is exact over
            all shards (``lowest_k_mask``); unstructured magnitude only.

    Returns:
        A new keep-mask (``torch.bool``, shaped like the weight) for every tensor in ``weights``.

    Raises:
        ValueError: If ``sparsity``, ``scope``, ``structure`` or ``criterion`` is not an allowed value.
        NonFiniteWeightsError: If unstructured magnitude ranking meets NaN or Inf weights (a ``ValueError``).

    Examples:
        >>> masks = compute_masks({"w": torch.tensor([[0.1, -2.0], [0.5, 3.0]])}, 0.5)
        >>> masks["w"]
        tensor([[False,  True],
                [False,  True]])
    """
    check_fraction("sparsity", sparsity, include_one=True)
    check_choice("scope", scope, SCOPES)
    check_choice("structure", structure, STRUCTURES)
    check_choice("criterion", criterion, CRITERIA)
    current_masks = current_masks or {}
    if group is not None or (structure == "unstructured" and criterion == "magnitude"):
        return _magnitude_masks(weights, sparsity, scope, structure, criterion, current_masks, protected, group)
    generator = torch.Generator().manual_seed(seed) if criterion == "random" else None
    ranked = {name: w for name, w in weights.items() if name not in protected}
    scores = {name: _scores(w, current_masks.get(name), structure, criterion, generator) for name, w in ranked.items()}
    if structure == "channel":
        for score in scores.values():
            score[score.argmax()] = float("inf")  # the best channel of every layer stays
        if scope == "global" and scores:  # never more than all but one channel per layer
            sparsity = min(sparsity, 1.0 - len(scores) / sum(s.numel() for s in scores.values()))
    if scope == "global" and scores:
        flat = torch.cat([s.to(next(iter(scores.values())).device) for s in scores.values()])
        pruned_flat = _lowest_k(flat, round(sparsity * flat.numel()))
        pruned = dict(zip(scores, torch.split(pruned_flat, [s.numel() for s in scores.values()]), strict=True))
    else:
        keep_one = int(structure == "channel")
        pruned = {
            name: _lowest_k(s, min(round(sparsity * s.numel()), s.numel() - keep_one)) for name, s in scores.items()
        }

    masks = {}
    for name, w in weights.items():
        if name in protected:
            masks[name] = torch.ones_like(w, dtype=torch.bool)
            continue
        keep = ~pruned[name].to(w.device)
        if structure == "channel":
            keep = keep.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)
        masks[name] = keep.reshape(w.shape).clone()
        if name in current_masks:  # masks only grow, even if the target went down
            masks[name] &= current_masks[name].to(w.device)
    return masks


def _magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    structure: str,
    criterion: str,
    current_masks: Mapping[str, Tensor],
    protected: Collection[str],
    group: Any,
) -> dict[str, Tensor]:
    """Unstructured magnitude masks by radix selection over ``int32`` keys computed chunk by chunk on the weights'
    device (no sort, no copy to the CPU, no array of all keys: the new masks, 1 byte per weight, plus a few MiB);
    with a ``group``, over local shards with exact global counts and no gather."""
    if structure != "unstructured" or criterion != "magnitude":
        raise ValueError(
            f"Sharded weights (FSDP2) are pruned with `structure`='unstructured' and `criterion`='magnitude', got"
            f" `structure`={structure!r}, `criterion`={criterion!r}: channel groups and random scores span shards."
        )
    ranked = [name for name in weights if name not in protected]
    buffers: dict[torch.device, Tensor] = {}  # one chunk of scratch per device, shared by all tensors
    for name in ranked:
        device = weights[name].device
        if device not in buffers:
            buffers[device] = scratch(device)
    sources = {
        name: MagnitudeKeys(weights[name], current_masks.get(name), buffers[weights[name].device]) for name in ranked
    }
    numels = torch.tensor([weights[name].numel() for name in ranked], dtype=torch.int64)
    if group is not None:
        dist.all_reduce(numels, group=group)  # whole-tensor sizes
    keeps: dict[str, Tensor] = {}
    try:
        if ranked and scope == "global":
            chosen = [sources[n] for n in ranked]
            cut = lowest_k_cut(chosen, round(sparsity * int(numels.sum())), group)
            current = [current_masks.get(n) for n in ranked]
            keeps = dict(zip(ranked, keep_masks(chosen, cut, current), strict=True))
        else:
            for name, total in zip(ranked, numels.tolist(), strict=True):
                cut = lowest_k_cut([sources[name]], round(sparsity * int(total)), group)
                keeps[name] = keep_masks([sources[name]], cut, [current_masks.get(name)])[0]
    except NonFiniteError as error:
        names = ranked if scope == "global" else [name]
        raise NonFiniteWeightsError(dict(zip(names, error.counts, strict=True))) from None
    masks = {}
    for name, w in weights.items():
        keep = keeps[name].reshape(w.shape) if name in keeps else torch.ones_like(w, dtype=torch.bool)
        if name in protected and name in current_masks:
            keep &= current_masks[name].to(w.device)
        masks[name] = keep
    return masks


class NonFiniteWeightsError(ValueError):
    """Weights to rank by magnitude hold NaN or Inf.

    Attributes:
        counts: NaN/Inf entries per tensor name (of the whole tensors when sharded); only tensors with some.
    """

    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = {name: int(count) for name, count in counts.items() if count}
        found = ", ".join(f"{name!r}: {count}" for name, count in self.counts.items())
        super().__init__(f"Magnitude pruning needs finite weights; NaN or Inf entries: {found}.")


class MaskApplier:
    """Masks ready for the training hot path: zero pruned weights or gradients in one fused op.

    The boolean keep-masks themselves are used (1 byte per weight, no copy): each is multiplied in through its
    ``uint8`` view, which ``torch._foreach_mul_`` runs nearly as fast as a float multiplier in the weight's dtype
    (4 bytes per weight) and several times faster than a ``bool`` operand or ``masked_fill_`` (measured on CPU,
    50M weights: 13-15 ms uint8, 12-13 ms float32, 40 ms bool, 80 ms ``masked_fill_``).

    Args:
        weights: The pruned tensors, by name.
        masks: Boolean keep-masks for (some of) them, on their weights' devices.
    """

    def __init__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
        names = [n for n in weights if n in masks]
        self._weights = [weights[n] for n in names]
        local = [local_tensor(w) for w in self._weights]
        # Sharded (DTensor) weights are masked through their local shard: a DTensor times a plain mask fails.
        self._sharded = any(shard is not w for shard, w in zip(local, self._weights, strict=True))
        self._multipliers = [_as_multiplier(masks[n], t) for n, t in zip(names, local, strict=True)]
        # Tensors no optimizer updates but that change anyway (BatchNorm running means of pruned channels).
        self._static = [i for i, w in enumerate(self._weights) if not w.requires_grad]

    def _local(self, tensors: list[Tensor]) -> list[Tensor]:
        return [local_tensor(t) for t in tensors] if self._sharded else tensors

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned entries of every weight in place."""
        if self._weights:
            torch._foreach_mul_(self._local(self._weights), self._multipliers)

    @torch.no_grad()
    def apply_static(self) -> None:
        """Zero the pruned entries of the tensors that do not require gradients (buffers, frozen weights)."""
        if self._static:
            weights = self._local([self._weights[i] for i in self._static])
            torch._foreach_mul_(weights, [self._multipliers[i] for i in self._static])

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned entries in place, so clipping and optimizer statistics ignore them."""
        pairs = [(w.grad, m) for w, m in zip(self._weights, self._multipliers, strict=True) if w.grad is not None]
        if pairs:
            torch._foreach_mul_(self._local([g for g, _ in pairs]), [m for _, m in pairs])

    @torch.no_grad()
    def mask_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the pruned entries of ``optimizer``'s per-weight state (momentum, Adam moments), so that with masked
        gradients its next steps leave pruned weights at zero."""
        for weight, multiplier in zip(self._weights, self._multipliers, strict=True):
            for value in optimizer.state.get(weight, {}).values():
                if isinstance(value, Tensor) and value.shape == weight.shape and value.is_floating_point():
                    local_tensor(value).mul_(multiplier)


def _as_multiplier(mask: Tensor, like: Tensor) -> Tensor:
    """The ``uint8`` view of a boolean mask on ``like``'s device (no copy when it is there already)."""
    if mask.dtype != torch.bool or mask.shape != like.shape:
        raise ValueError(
            f"A mask must be boolean and shaped like its weight {list(like.shape)}, got {mask.dtype}"
            f" {list(mask.shape)}."
        )
    return mask.to(like.device).view(torch.uint8)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a boolean mask into a ``uint8`` tensor with 8 entries per byte (for compact checkpoints)."""
    flat = mask.detach().flatten().cpu().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size | list[int] | tuple[int, ...]) -> Tensor:
    """Inverse of ``pack_mask``.

    Raises:
        ValueError: If ``packed`` does not hold exactly the bytes a mask of ``shape`` packs into.
    """
    numel = 1
    for dim in shape:
        numel *= int(dim)
    if packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"A packed mask of shape {list(shape)} takes {(numel + 7) // 8} bytes, got {packed.numel()}: the"
            " checkpoint's mask is truncated or belongs to another parameter."
        )
    bits = (packed.cpu().unsqueeze(1) & _BIT_WEIGHTS) != 0
    return bits.flatten()[:numel].reshape(tuple(shape))


@dataclass(frozen=True)
class SparsityStats:
    """Zero counts of a set of tensors.

    Attributes:
        zeros: Number of exactly-zero entries per tensor.
        numels: Number of entries per tensor.
    """

    zeros: dict[str, int]
    numels: dict[str, int]

    @property
    def total_zeros(self) -> int:
        """Zero entries over all tensors."""
        return sum(self.zeros.values())

    @property
    def total_numel(self) -> int:
        """Entries over all tensors."""
        return sum(self.numels.values())

    @property
    def sparsity(self) -> float:
        """Fraction of zero entries over all tensors."""
        return self.total_zeros / max(self.total_numel, 1)

    def per_tensor(self) -> dict[str, float]:
        """Fraction of zero entries of each tensor."""
        return {n: self.zeros[n] / max(self.numels[n], 1) for n in self.numels}

    @property
    def nonzero(self) -> int:
        """Non-zero entries over all tensors."""
        return self.total_numel - self.total_zeros

    def dense_bytes(self, bytes_per_value: int = 4) -> int:
        """Storage of the tensors as dense arrays."""
        return self.total_numel * bytes_per_value

    def sparse_bytes(self, bytes_per_value: int = 4) -> int:
        """Storage in a bitmask format: the non-zero values plus one bit per entry."""
        return self.nonzero * bytes_per_value + (self.total_numel + 7) // 8


@torch.no_grad()
def measure_sparsity(weights: Mapping[str, Tensor]) -> SparsityStats:
    """Count the exact zeros of every tensor."""
    numels = {n: w.numel() for n, w in weights.items()}
    zeros = {n: numels[n] - int(torch.count_nonzero(w)) for n, w in weights.items()}
    return SparsityStats(zeros=zeros, numels=numels)
