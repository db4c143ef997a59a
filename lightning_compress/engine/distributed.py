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

Memory: one ``int32`` key per local entry plus a boolean; time: about three passes over the local entries. With a
single process (or no process group) the result equals a plain "lowest ``k`` with ties to the lowest index", so the
same function serves both.

Examples:
    >>> scores = [torch.tensor([0.5, 0.1, 0.3]), torch.tensor([0.1, 0.9])]
    >>> [m.tolist() for m in lowest_k_mask([sortable_keys(s) for s in scores], k=3)]
    [[False, True, True], [True, False]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

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


def lowest_k_mask(keys: Sequence[Tensor], k: int, group: Any = None) -> list[Tensor]:
    """Select exactly the ``k`` smallest keys of the union of ``keys`` over all processes of ``group``.

    With a ``group``, every process of it calls this with its own local key tensors (the same number of tensors
    on every process; a tensor may be empty) and the same ``k``. Collectives: three ``all_reduce`` calls (two
    histograms, the tie counts).

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
    device = keys[0].device if keys else torch.device("cpu")
    flats = [t.reshape(-1) for t in keys]  # views: no concatenated copy of all keys
    total = _all_reduce_sum(torch.tensor([sum(f.numel() for f in flats)], dtype=torch.int64, device=device), group)
    if not 0 <= k <= int(total):
        raise ValueError(f"`k` must be in [0, {int(total)}], got {k}.")
    if k == 0:
        return [torch.zeros(f.numel(), dtype=torch.bool, device=f.device) for f in flats]
    high_counts = torch.zeros(_HIGH_BINS, dtype=torch.int64, device=device)
    for f in flats:
        high_counts += torch.bincount(f >> 16, minlength=_HIGH_BINS)
    high_bin, below_high = _bin_holding(_all_reduce_sum(high_counts, group), k)
    low_counts = torch.zeros(_LOW_BINS, dtype=torch.int64, device=device)
    for f in flats:
        low_counts += torch.bincount(f[(f >> 16) == high_bin] & 0xFFFF, minlength=_LOW_BINS)
    low_bin, below_low = _bin_holding(_all_reduce_sum(low_counts, group), k - below_high)
    threshold = (high_bin << 16) | low_bin
    missing = k - (below_high + below_low)  # entries equal to the threshold still to take
    ties = [f == threshold for f in flats]
    rank, world = _rank_and_world(group)
    tie_counts = torch.zeros(world, dtype=torch.int64, device=device)
    tie_counts[rank] = sum(int(t.sum()) for t in ties)
    tie_counts = _all_reduce_sum(tie_counts, group)
    take = min(int(tie_counts[rank]), max(0, missing - int(tie_counts[:rank].sum())))  # ties this process takes
    selected = []
    for f, tie in zip(flats, ties, strict=True):
        chosen = f < threshold
        if take > 0:
            first = tie & (torch.cumsum(tie, 0) <= take)
            take -= int(first.sum())
            chosen |= first
        selected.append(chosen)
    return selected


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
