"""Exact k-smallest selection over tensors that may be sharded across processes, without gathering them.

Sharded training (FSDP2: parameters are ``DTensor`` shards, unevenly split by rows) cannot rank all weights in one
place: a gather of a billion-parameter model does not fit. The selection here works on each process's local shards
and exchanges only histograms:

1. every score becomes a non-negative ``int32`` *key* whose order is the order of the scores (the bit pattern of a
   non-negative ``float32`` is monotone in its value; already-pruned entries get key 0, below every live one);
2. a two-pass radix select finds the key of the ``k``-th smallest entry of the union of all shards: a histogram of
   the high 15 bits, summed across processes with one ``all_reduce``, picks the bin, then a histogram of the low 16
   bits of that bin's entries picks the key (2 reductions of 32-64 Ki counts, whatever the model size);
3. entries below that key are selected; of the entries equal to it, as many as are still missing are taken in rank
   order (rank 0 first), and within a rank in flat order, so exactly ``k`` are selected, the same on every run.

Keys are produced chunk by chunk (``KeySource``; ``MagnitudeKeys`` computes them from a weight and its mask in a
reused buffer on the weight's device), so the keys of all entries never exist at once: memory is the output masks (1
byte per entry) plus a few chunks; time: three passes over the local entries (two histograms, one writing the masks,
``lowest_k_cut`` then ``keep_masks``). With a single process (or no process group) the result equals a plain "lowest
``k`` with ties to the lowest index", so the same functions serve both.

The int8 conversions need the whole model in one place, once, at fit end: ``meta_copy`` keeps a weightless copy of
the model before ``fully_shard`` (a sharded module cannot be copied), ``gather_full_state`` collects the full state
dict on rank 0's CPU (every process takes part), ``materialize`` fills the copy with it, and ``run_on_rank_zero``
runs the conversion there while the other processes wait for its outcome (its result, or its error).

Examples:
    >>> scores = [torch.tensor([0.5, 0.1, 0.3]), torch.tensor([0.1, 0.9])]
    >>> [m.tolist() for m in lowest_k_mask([sortable_keys(s) for s in scores], k=3)]
    [[False, True, True], [True, False]]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

_HIGH_BINS = 1 << 15  # keys are < 2**31: the high 15 bits
_LOW_BINS = 1 << 16


def sortable_keys(scores: Tensor, pruned: Tensor | None = None) -> Tensor:
    """``int32`` keys ordered like the non-negative ``scores``; ``pruned`` entries get key 0 (selected first).

    Args:
        scores: Non-negative floating-point scores (magnitudes, channel norms, uniform random numbers), any shape.
        pruned: Optional boolean tensor shaped like ``scores``: entries already pruned.

    Returns:
        A flat ``int32`` tensor of keys in ``[0, 2**31)``: live entries ``1 + bits(score)``, pruned ones 0.

    Raises:
        ValueError: If a score is negative or NaN (the order of the bit patterns would not be the order of values).
    """
    flat = scores.detach().reshape(-1).float()
    if bool((flat < 0).any()) or bool(torch.isnan(flat).any()):
        raise ValueError("sortable_keys needs non-negative, non-NaN scores.")
    # +inf is 0x7F800000: +1 stays below 2**31, so no key overflows.
    keys = flat.view(torch.int32) + 1
    if pruned is not None:
        keys = keys.masked_fill(pruned.reshape(-1), 0)
    return keys


def _all_reduce_sum(tensor: Tensor, group: Any) -> Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _rank_and_world(group: Any) -> tuple[int, int]:
    if group is not None:
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _bin_holding(counts: Tensor, k: int) -> tuple[int, int]:
    """The first bin whose cumulative count reaches ``k``, and the count of all bins before it."""
    cumulative = torch.cumsum(counts, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor([k], dtype=cumulative.dtype)).item())
    before = int(cumulative[index - 1]) if index > 0 else 0
    return index, before


#: Entries per chunk: a chunk's keys and temporaries (a few MiB) stay in cache, and no array of all keys exists.
CHUNK = 1 << 18


class KeySource:
    """The ``int32`` keys of one flat tensor, produced chunk by chunk (``keys``); here, keys already computed.

    Subclasses compute keys on the fly (``MagnitudeKeys``), so the keys of a whole model never exist at once.
    """

    def __init__(self, keys: Tensor) -> None:
        self._flat = keys.reshape(-1)
        self.numel = self._flat.numel()
        self.device = self._flat.device

    def keys(self, start: int, stop: int) -> Tensor:
        """The keys of the flat entries ``[start, stop)`` (valid until the next call)."""
        return self._flat[start:stop]


class MagnitudeKeys(KeySource):
    """Keys of ``|weight|`` (``1 + bits(|w|)``), 0 where ``keep`` is ``False``; computed per chunk in a buffer.

    Args:
        weight: A floating-point tensor (a parameter or its local shard), any shape and device.
        keep: Optional boolean keep-mask shaped like ``weight``: entries already pruned get key 0.
        buffer: Optional ``float32`` scratch tensor on ``weight``'s device, at least a chunk long, shared by the
            sources of one selection (they are read one at a time); else one is allocated.
    """

    def __init__(self, weight: Tensor, keep: Tensor | None = None, buffer: Tensor | None = None) -> None:
        #: The flat weight (a view).
        self.weight = weight.detach().reshape(-1)
        self._keep = None if keep is None else keep.to(self.weight.device).reshape(-1).view(torch.uint8)
        self.numel = self.weight.numel()
        self.device = self.weight.device
        size = min(_chunk(self.device), self.numel)
        if buffer is None or buffer.device != self.device or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.float32, device=self.device)
        self._buffer = buffer

    def keys(self, start: int, stop: int) -> Tensor:
        """The keys of the flat entries ``[start, stop)`` (in a buffer reused by the next call)."""
        buffer = self._buffer[: stop - start]
        torch.abs(self.weight[start:stop], out=buffer)  # casts a lower-precision weight to float32
        keys = buffer.view(torch.int32).add_(1)  # NaN of payload 0x7FFFFFFF wraps below 0: caught by the histogram
        if self._keep is not None:
            keys.mul_(self._keep[start:stop])
        return keys


def scratch(device: torch.device | str) -> Tensor:
    """A ``float32`` buffer of one chunk on ``device``, to share between the ``MagnitudeKeys`` of one selection."""
    device = torch.device(device)
    return torch.empty(_chunk(device), dtype=torch.float32, device=device)


def _chunk(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else 16 * CHUNK  # accelerators: fewer, larger kernels


def _chunks(source: KeySource) -> Iterator[tuple[int, int]]:
    size = _chunk(source.device)
    for start in range(0, source.numel, size):
        yield start, min(start + size, source.numel)


#: High-bits bin of the key of the largest finite float, ``inf`` (``0x7F800000``) and the NaNs above it: a count in
#: it or above sends the ranking through an exact check for NaN/Inf (free otherwise).
_NONFINITE_BIN = (0x7F800000 + 1) >> 16


class Cut(NamedTuple):
    """Where the ``k`` smallest keys end: every key below ``threshold`` is among them, and of this process's keys
    equal to it (``ties`` of them), the first ``take`` (in source order, then flat order)."""

    threshold: int
    take: int
    ties: int


def lowest_k_cut(sources: Sequence[KeySource], k: int, group: Any = None) -> Cut:
    """Where the ``k`` smallest keys of all ``sources`` (over all processes of ``group``) end.

    Two passes over the keys, chunk by chunk (a histogram of the high 15 bits, then of the low 16 bits of the
    chosen bin, at the same cost however many keys tie in it); collectives: four ``all_reduce`` calls (the total,
    two histograms, the tie counts per process).

    Raises:
        ValueError: If ``k`` is negative or exceeds the number of entries over all processes.
        NonFiniteError: If a magnitude is NaN or Inf (on every process of ``group``).
    """
    device = sources[0].device if sources else torch.device("cpu")
    total = _all_reduce_sum(torch.tensor([sum(s.numel for s in sources)], dtype=torch.int64, device=device), group)
    if not 0 <= k <= int(total):
        raise ValueError(f"`k` must be in [0, {int(total)}], got {k}.")
    high_counts = torch.zeros(_HIGH_BINS + 1, dtype=torch.int64, device=device)
    for source in sources:
        for start, stop in _chunks(source):
            # A wrapped (negative) key lands in the extra last bin.
            high_counts += torch.bincount((source.keys(start, stop) >> 16) & 0xFFFF, minlength=_HIGH_BINS + 1)
    high_counts = _all_reduce_sum(high_counts, group)
    if int(high_counts[_NONFINITE_BIN:].sum()):  # the largest finite float, Inf or NaN: count them exactly
        _check_finite(sources, group)
    if k == 0:
        return Cut(0, 0, 0)
    high_bin, below_high = _bin_holding(high_counts[:_HIGH_BINS], k)
    # Keys shifted so that the chosen bin's 65,536 values land on 1..65,536; the clamp puts every key below it on 0
    # and every key above it on 65,537, both dropped. The same few passes whatever the share of keys in that bin
    # (selecting them by a boolean index costs more the more of them tie there: many exact zeros).
    low_counts = torch.zeros(_LOW_BINS + 2, dtype=torch.int64, device=device)
    buffers: dict[torch.device, Tensor] = {}
    for source in sources:
        if source.device not in buffers:
            buffers[source.device] = torch.empty(_chunk(source.device), dtype=torch.int32, device=source.device)
        for start, stop in _chunks(source):
            out = buffers[source.device][: stop - start]
            shifted = torch.sub(source.keys(start, stop), (high_bin << 16) - 1, out=out)
            low_counts += torch.bincount(shifted.clamp_(0, _LOW_BINS + 1), minlength=_LOW_BINS + 2)
    low_counts = low_counts[1:-1]
    local_low = low_counts.clone() if group is not None else low_counts
    low_bin, below_low = _bin_holding(_all_reduce_sum(low_counts, group), k - below_high)
    missing = k - (below_high + below_low)  # entries equal to the threshold still to take
    rank, world = _rank_and_world(group)
    tie_counts = torch.zeros(world, dtype=torch.int64, device=device)
    tie_counts[rank] = local_low[low_bin]
    tie_counts = _all_reduce_sum(tie_counts, group)
    ties = int(tie_counts[rank])
    return Cut((high_bin << 16) | low_bin, min(ties, max(0, missing - int(tie_counts[:rank].sum()))), ties)


class NonFiniteError(ValueError):
    """Magnitudes that are NaN or Inf (a ranking of them is meaningless).

    Attributes:
        counts: Non-finite entries per source, over all processes.
    """

    def __init__(self, counts: list[int]) -> None:
        super().__init__(f"Magnitude ranking needs finite weights, got {sum(counts)} NaN or Inf entries.")
        self.counts = counts


def _check_finite(sources: Sequence[KeySource], group: Any) -> None:
    """Count non-finite magnitudes exactly (only when the histogram shows keys at or above ``inf``'s bin)."""
    device = sources[0].device if sources else torch.device("cpu")
    counts = torch.zeros(len(sources), dtype=torch.int64, device=device)
    for i, source in enumerate(sources):
        for start, stop in _chunks(source):
            if isinstance(source, MagnitudeKeys):
                counts[i] += (~torch.isfinite(source.weight[start:stop])).sum()
            else:
                counts[i] += (source.keys(start, stop) < 0).sum()
    found = _all_reduce_sum(counts, group).tolist()
    if any(found):
        raise NonFiniteError(found)


def keep_masks(
    sources: Sequence[KeySource],
    cut: Cut,
    current: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """Boolean keep-masks (flat, ``True`` = not among the selected) of the ``sources`` for a ``lowest_k_cut``,
    written chunk by chunk; ``current`` masks (or ``None``) are and-ed in, so masks only grow."""
    threshold, take, ties_left = cut
    masks = []
    for i, source in enumerate(sources):
        keep = torch.empty(source.numel, dtype=torch.bool, device=source.device)
        old = current[i] if current is not None else None
        old_flat = None if old is None else old.to(source.device).reshape(-1)
        for start, stop in _chunks(source):
            keys, out = source.keys(start, stop), keep[start:stop]
            if take == 0:  # no tied entry left to select
                torch.ge(keys, threshold, out=out)
            elif take == ties_left:  # every tied entry left is selected
                torch.gt(keys, threshold, out=out)
            else:
                torch.gt(keys, threshold, out=out)
                ties = keys == threshold
                count = int(ties.sum())
                if count > take:  # only the first ``take`` of these tied entries are selected
                    out |= ties & (torch.cumsum(ties, 0) > take)
                take, ties_left = take - min(count, take), ties_left - count
            if old_flat is not None:
                out &= old_flat[start:stop]
        masks.append(keep)
    return masks


def lowest_k_mask(keys: Sequence[Tensor], k: int, group: Any = None) -> list[Tensor]:
    """Select exactly the ``k`` smallest keys of the union of ``keys`` over all processes of ``group``.

    With a ``group``, every process of it calls this with its own local key tensors (the same number of tensors
    on every process; a tensor may be empty) and the same ``k``. Collectives: four ``all_reduce`` calls (the total,
    two histograms, the tie counts).

    Args:
        keys: Flat ``int32`` keys from ``sortable_keys``, one tensor per (local shard of a) parameter.
        k: How many entries to select over all processes, in ``[0, total]``.
        group: The process group whose processes hold the shards (e.g. FSDP2's data-parallel group; the default
            group is ``torch.distributed.group.WORLD``). ``None``: the tensors are complete here (single process, or
            replicated as under DDP), nothing is exchanged.

    Returns:
        Boolean tensors shaped like ``keys``: ``True`` where the entry is among the ``k`` smallest.

    Raises:
        ValueError: If ``k`` is negative or exceeds the number of entries over all processes.
    """
    sources = [KeySource(t) for t in keys]
    cut = lowest_k_cut(sources, k, group)
    if k == 0:
        return [torch.zeros(s.numel, dtype=torch.bool, device=s.device) for s in sources]
    return [keep.logical_not_() for keep in keep_masks(sources, cut)]


def local_tensor(tensor: Tensor) -> Tensor:
    """The process-local part of ``tensor``: the shard of a ``DTensor`` (a view that in-place ops write through),
    else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def shard_group(tensors: Sequence[Tensor]) -> Any:
    """The process group over which ``tensors`` are sharded (FSDP2 ``DTensor`` parameters), or ``None``.

    Raises:
        ValueError: If only some tensors are sharded, if they are sharded over different or multi-dimensional
            meshes (tensor parallelism), or along another dimension than rows (``Shard(0)``, FSDP2's layout).
    """
    from torch.distributed.tensor import DTensor, Shard

    sharded = [t for t in tensors if isinstance(t, DTensor)]
    if not sharded:
        return None
    if len(sharded) != len(tensors):
        raise ValueError("Either all pruned parameters are sharded (FSDP2 DTensors) or none: shard every layer.")
    meshes = {id(t.device_mesh) for t in sharded}
    mesh = sharded[0].device_mesh
    if len(meshes) > 1 or mesh.ndim != 1 or any(tuple(t.placements) != (Shard(0),) for t in sharded):
        raise ValueError(
            "Pruning supports FSDP2 sharding by rows over one data-parallel mesh (`fully_shard(...,"
            " mesh=device_mesh['data_parallel'])`); tensor-parallel or other placements are not supported."
        )
    return mesh.get_group()


# --------------------------------------------------------------------------------------------------------------------
# Whole-model work on rank zero under FSDP2: a meta-device skeleton, the gathered full state, one outcome for all
# --------------------------------------------------------------------------------------------------------------------


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module`` or one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def meta_copy(module: nn.Module, share: Sequence[object] = ()) -> nn.Module:
    """A copy of ``module`` whose parameters and persistent buffers are empty tensors on the ``meta`` device.

    It costs no memory for the weights, and it is what ``materialize`` fills with a gathered full state dict: FSDP2
    modules cannot be copied (their ``__deepcopy__`` raises), so the copy is taken before ``fully_shard``.
    Non-persistent buffers (absent from state dicts) are copied for real; the objects in ``share`` (a trainer, a
    device mesh) are referenced, not copied.

    Raises:
        ValueError: If ``module`` is already sharded with ``fully_shard``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> skeleton = meta_copy(model)
        >>> skeleton[0].weight.device.type, skeleton[0].weight.shape
        ('meta', torch.Size([3, 4]))
        >>> torch.equal(materialize(skeleton, model.state_dict())[0].weight, model[0].weight)
        True
    """
    if is_fully_sharded(module):
        raise ValueError(
            f"{type(module).__name__} is already sharded with `fully_shard` (FSDP2), and a sharded module cannot be"
            " copied: apply `fully_shard` in `configure_model`, which runs after the callbacks' `setup`."
        )
    memo: dict[int, Any] = {id(obj): obj for obj in share}
    for owner in module.modules():
        for param in owner._parameters.values():
            if param is not None and id(param) not in memo:
                meta = torch.empty_like(param.detach(), device="meta")
                memo[id(param)] = nn.Parameter(meta, requires_grad=param.requires_grad)
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set and id(buffer) not in memo:
                memo[id(buffer)] = torch.empty_like(buffer.detach(), device="meta")
    return copy.deepcopy(module, memo)


def gather_full_state(module: nn.Module) -> dict[str, Any]:
    """The full (unsharded) state dict of a ``fully_shard``-ed ``module`` on the CPU of rank 0; ``{}`` elsewhere.

    A collective: every process of the mesh must call it at the same point. Rank 0 holds one CPU copy of the model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return dict(get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def materialize(skeleton: nn.Module, state: dict[str, Any], buffers: dict[str, Tensor] | None = None) -> nn.Module:
    """Fill a ``meta_copy`` with ``state`` (its tensors become the module's, no second copy) and return it.

    Args:
        skeleton: A ``meta_copy``.
        state: A full state dict of the same module (``gather_full_state``).
        buffers: Buffers by name (e.g. ``named_buffers()`` of the sharded module: FSDP2 shards no buffer) for the
            non-persistent ones a state dict lacks, where the skeleton has none (a model built on ``meta``).

    Raises:
        ValueError: If ``state`` has keys the skeleton lacks, or leaves a parameter or buffer on ``meta``.
    """
    result = skeleton.load_state_dict(state, strict=False, assign=True)
    for name, buffer in list(skeleton.named_buffers()):
        if buffer.is_meta and buffers is not None and name in buffers and name not in state:
            owner, _, leaf = name.rpartition(".")
            skeleton.get_submodule(owner)._buffers[leaf] = buffers[name].detach().cpu().clone()
    left = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if result.unexpected_keys or left:
        raise ValueError(
            "The gathered full state dict does not match the model copied before sharding: unexpected keys"
            f" {result.unexpected_keys[:5]}, tensors without a value {left[:5]}. Create every layer in `__init__`"
            " and only shard it in `configure_model`."
        )
    return skeleton


class RankZeroError(RuntimeError):
    """Raised on the other processes when the work ``run_on_rank_zero`` gave rank 0 failed there."""


def run_on_rank_zero(work: Callable[[], Any], group: Any = None) -> Any:
    """Run ``work`` on rank 0 only and give every process its outcome: the (picklable) result, or the error.

    The other processes wait in a broadcast (under the process group's timeout) instead of running ahead into
    a collective rank 0 never joins, and they fail with rank 0 (``RankZeroError`` quoting it) rather than finish as
    if nothing happened. Without a process group, ``work`` just runs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return work()
    rank = dist.get_rank(group)
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            outcome[0] = (True, work())
        except Exception as err:  # every process must hear of it; rank 0 re-raises the original below
            error = err
            outcome[0] = (False, f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    ok, payload = outcome[0]
    if error is not None:
        raise error
    if not ok:
        raise RankZeroError(f"Rank 0 failed in work every process waited for: {payload}")
    return payload
