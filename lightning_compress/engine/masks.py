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

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress.engine.config import Criterion, Scope, Structure
from lightning_compress.engine.distributed import (
    CHUNK,
    KeySource,
    MagnitudeKeys,
    NonFiniteError,
    keep_masks,
    local_tensor,
    lowest_k_cut,
    scratch,
    sortable_keys,
)
from lightning_compress.engine.validation import check_choice, check_fraction

SCOPES: tuple[str, ...] = get_args(Scope)
STRUCTURES: tuple[str, ...] = get_args(Structure)
CRITERIA: tuple[str, ...] = get_args(Criterion)

_PRUNED_SCORE = -1.0  # below any magnitude or uniform random score, so pruned entries are always chosen first


def _lowest_k(scores: Tensor, k: int) -> Tensor:
    """Boolean "prune" vector marking exactly the ``k`` lowest scores; ties go to the lowest index.

    The plain definition (a ``kthvalue`` over one CPU copy of the scores), kept as the reference the chunked
    selection that ``compute_masks`` uses is tested against; nothing in the library calls it.
    """
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


class _RandomStream:
    """The uniform ``[0, 1)`` scores of the ``random`` criterion: one seeded CPU stream over the ranked tensors in
    order (the draws of ``torch.rand`` over each tensor in turn), produced chunk by chunk and drawn again on every
    pass of the selection, so no array of all scores exists. Drawn on the CPU whatever the weights' device, so the
    masks do not depend on it."""

    def __init__(self, seed: int, numels: Sequence[int]) -> None:
        self._seed = seed
        self.offsets = [0]
        for numel in numels:
            self.offsets.append(self.offsets[-1] + numel)
        self._generator = torch.Generator()
        self._position = -1  # no draw yet: the next one restarts the stream
        self._buffer = torch.empty(0)

    def draw(self, position: int, count: int) -> Tensor:
        """Scores ``[position, position + count)`` of the whole stream (valid until the next call)."""
        if position != self._position:  # a new pass (or an out-of-order read): start over and skip ahead
            self._generator.manual_seed(self._seed)
            self._position = 0
            while self._position < position:
                self._position += self.draw(self._position, min(CHUNK, position - self._position)).numel()
        if self._buffer.numel() < count:
            self._buffer = torch.empty(count)
        out = self._buffer[:count]
        torch.rand(count, generator=self._generator, out=out)
        self._position = position + count
        return out


class RandomKeys(KeySource):
    """Keys of the ``random`` criterion's scores for the ``index``-th ranked tensor, 0 where ``keep`` is ``False``.

    Args:
        stream: The scores of all ranked tensors (shared by their sources, read in order).
        index: This tensor's place among them.
        keep: Optional boolean keep-mask of the tensor: entries already pruned get key 0.
        device: Where the tensor lives (the keys are produced there).
    """

    def __init__(self, stream: _RandomStream, index: int, keep: Tensor | None, device: torch.device) -> None:
        self._stream = stream
        self._start = stream.offsets[index]
        self.numel = stream.offsets[index + 1] - self._start
        self.device = device
        self._keep = None if keep is None else keep.to(device).reshape(-1).view(torch.uint8)

    def keys(self, start: int, stop: int) -> Tensor:
        """The keys of the flat entries ``[start, stop)`` (in a buffer reused by the next call)."""
        scores = self._stream.draw(self._start + start, stop - start)
        keys = scores.view(torch.int32).add_(1).to(self.device)  # uniform scores are finite and non-negative
        if self._keep is not None:
            keys = keys.mul_(self._keep[start:stop])
        return keys


def _channel_scores(weight: Tensor, mask: Tensor | None, criterion: str, generator: torch.Generator | None) -> Tensor:
    """The score of each output channel (dim 0) of ``weight`` (RMS magnitude or uniform random), ``_PRUNED_SCORE``
    where ``mask`` prunes the whole channel; one float per channel, so never more than ``C`` numbers."""
    if criterion == "magnitude":
        rows = weight.detach().reshape(weight.shape[0], -1)
        score = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32) / max(rows.shape[1], 1) ** 0.5
    else:
        score = torch.rand(weight.shape[0], generator=generator).to(weight.device)
    if mask is not None:
        score[~mask.reshape(mask.shape[0], -1).any(dim=1)] = _PRUNED_SCORE
    return score


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

    Every ranking is the exact chunked radix selection of ``engine.distributed`` (``lowest_k_cut``, ``keep_masks``):
    no sort, no ``kthvalue``, no concatenated or CPU copy of the scores. Unstructured scores are produced chunk by
    chunk (``MagnitudeKeys``, ``RandomKeys``), so an update holds the new masks (1 byte per weight) plus a few MiB;
    channel scores are one number per channel.

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
        NonFiniteWeightsError: If magnitude ranking meets NaN or Inf weights (a ``ValueError``).

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
    if group is not None and (structure != "unstructured" or criterion != "magnitude"):
        raise ValueError(
            f"Sharded weights (FSDP2) are pruned with `structure`='unstructured' and `criterion`='magnitude', got"
            f" `structure`={structure!r}, `criterion`={criterion!r}: channel groups and random scores span shards."
        )
    if structure == "unstructured":
        return _unstructured_masks(weights, sparsity, scope, criterion, current_masks, protected, group, seed)
    return _channel_masks(weights, sparsity, scope, criterion, current_masks, protected, seed)


def _channel_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    criterion: str,
    current_masks: Mapping[str, Tensor],
    protected: Collection[str],
    seed: int,
) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed) if criterion == "random" else None
    ranked = [name for name in weights if name not in protected]
    scores = {name: _channel_scores(weights[name], current_masks.get(name), criterion, generator) for name in ranked}
    bad = {name: int((~torch.isfinite(weights[name].detach())).sum()) for name, s in scores.items() if s.isnan().any()}
    if bad:
        raise NonFiniteWeightsError(bad)
    for score in scores.values():
        if score.numel():
            score[score.argmax()] = float("inf")  # the best channel of every layer stays
    # Pruned channels get key 0, the others 1 + the bits of their score (the order of the scores).
    sources = {name: KeySource(sortable_keys(s.clamp(min=0), s < 0)) for name, s in scores.items()}
    keeps: dict[str, Tensor] = {}
    if scope == "global" and sources:
        channels = sum(s.numel for s in sources.values())
        sparsity = min(sparsity, 1.0 - len(sources) / max(channels, 1))  # never more than all but one per layer
        chosen = list(sources.values())
        keeps = dict(zip(sources, keep_masks(chosen, lowest_k_cut(chosen, round(sparsity * channels))), strict=True))
    else:
        for name, source in sources.items():
            k = min(round(sparsity * source.numel), max(source.numel - 1, 0))
            keeps[name] = keep_masks([source], lowest_k_cut([source], k))[0]
    masks = {}
    for name, w in weights.items():
        if name in keeps:
            keep = keeps[name].to(w.device).reshape(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
        else:
            keep = torch.ones_like(w, dtype=torch.bool)
        if name in current_masks:  # masks only grow, even if the target went down (protected tensors too)
            keep &= current_masks[name].to(w.device)
        masks[name] = keep
    return masks


def _unstructured_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    criterion: str,
    current_masks: Mapping[str, Tensor],
    protected: Collection[str],
    group: Any,
    seed: int,
) -> dict[str, Tensor]:
    """Unstructured masks by radix selection over ``int32`` keys computed chunk by chunk on the weights' device
    (magnitudes) or drawn chunk by chunk (random scores): no sort, no copy to the CPU, no array of all keys, so the
    new masks (1 byte per weight) plus a few MiB; with a ``group``, over local shards with exact global counts and no
    gather."""
    ranked = [name for name in weights if name not in protected]
    sources: dict[str, KeySource] = {}
    if criterion == "random":
        stream = _RandomStream(seed, [weights[name].numel() for name in ranked])
        for i, name in enumerate(ranked):
            sources[name] = RandomKeys(stream, i, current_masks.get(name), weights[name].device)
    else:
        buffers: dict[torch.device, Tensor] = {}  # one chunk of scratch per device, shared by all tensors
        for name in ranked:
            device = weights[name].device
            if device not in buffers:
                buffers[device] = scratch(device)
            sources[name] = MagnitudeKeys(weights[name], current_masks.get(name), buffers[device])
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
        if name in protected and name in current_masks:  # never pruned, but what is pruned stays pruned
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


#: CPU: entries of a mask converted to the weight's dtype at a time, in a reused buffer (1 MiB at float32: it stays in
#: the L2 cache). Tensors at most this long are masked together in one ``torch._foreach_mul_``.
APPLY_CHUNK = 1 << 18


class MaskApplier:
    """Masks ready for the training hot path: zero pruned weights or gradients in place, one pass, no allocation.

    The boolean keep-masks themselves are used (1 byte per weight, no copy), through their ``uint8`` views. On an
    accelerator a tensor is multiplied by its mask directly (the kernel converts the bytes in registers). On the CPU
    PyTorch would first convert a mixed-dtype operand into a temporary as large as the tensor (4 bytes per weight,
    allocated and page-faulted at every call: about twice the time of a float multiply), so each large tensor is
    masked in chunks of ``APPLY_CHUNK`` entries: the chunk of the mask is converted into one reused buffer of the
    tensor's dtype that stays in cache, then multiplied in. Measured on this CPU at 4M weights: 1.1-1.3 ms per pass,
    as fast as a float32 multiplier, against 2.1 ms for the direct ``uint8`` multiply, 8 ms for a ``bool`` operand and
    13-16 ms for ``masked_fill_``/``torch.where``.

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
        # CPU tensors longer than a chunk: their masks' chunks, made once (the hot path only splits the tensor).
        self._chunks: dict[int, tuple[Tensor, ...]] = {
            i: m.reshape(-1).split(APPLY_CHUNK)
            for i, (m, t) in enumerate(zip(self._multipliers, local, strict=True))
            if t.device.type == "cpu" and t.numel() > APPLY_CHUNK and m.is_contiguous()
        }
        self._buffers: dict[torch.dtype, Tensor] = {}  # one chunk per dtype, shared by every tensor

    def _local(self, tensors: list[Tensor]) -> list[Tensor]:
        return [local_tensor(t) for t in tensors] if self._sharded else tensors

    def _zero_pruned(self, tensors: list[Tensor], indices: Sequence[int]) -> None:
        """Multiply ``tensors`` (local tensors of the weights at ``indices``, or their gradients) by their masks."""
        together: list[Tensor] = []
        multipliers: list[Tensor] = []
        for tensor, i in zip(tensors, indices, strict=True):
            chunks = self._chunks.get(i)
            if chunks is None or not tensor.is_contiguous() or not tensor.is_floating_point():
                together.append(tensor)
                multipliers.append(self._multipliers[i])
                continue
            buffer = self._buffers.get(tensor.dtype)
            if buffer is None:
                buffer = self._buffers[tensor.dtype] = torch.empty(APPLY_CHUNK, dtype=tensor.dtype)
            for part, mask in zip(tensor.view(-1).split(APPLY_CHUNK), chunks, strict=True):
                converted = buffer if mask.numel() == APPLY_CHUNK else buffer[: mask.numel()]
                part.mul_(converted.copy_(mask))
        if together:
            torch._foreach_mul_(together, multipliers)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned entries of every weight in place."""
        if self._weights:
            self._zero_pruned(self._local(self._weights), range(len(self._weights)))

    @torch.no_grad()
    def apply_static(self) -> None:
        """Zero the pruned entries of the tensors that do not require gradients (buffers, frozen weights)."""
        if self._static:
            self._zero_pruned(self._local([self._weights[i] for i in self._static]), self._static)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned entries in place, so clipping and optimizer statistics ignore them."""
        indices = [i for i, w in enumerate(self._weights) if w.grad is not None]
        if indices:
            grads = [self._weights[i].grad for i in indices]
            self._zero_pruned(self._local(grads), indices)  # type: ignore[arg-type]  # not None, checked above

    @torch.no_grad()
    def mask_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the pruned entries of ``optimizer``'s per-weight state (momentum, Adam moments), so that with masked
        gradients its next steps leave pruned weights at zero."""
        tensors, indices = [], []
        for i, weight in enumerate(self._weights):
            for value in optimizer.state.get(weight, {}).values():
                if isinstance(value, Tensor) and value.shape == weight.shape and value.is_floating_point():
                    tensors.append(local_tensor(value))
                    indices.append(i)
        if tensors:
            self._zero_pruned(tensors, indices)


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
