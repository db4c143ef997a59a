"""The sharded k-smallest selection equals the single-tensor one: on one process, and on 2 gloo processes whose
shards are uneven slices of the same scores (ties broken in rank order, then flat order)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.engine.distributed import local_tensor, lowest_k_mask, sortable_keys
from lightning_compress.engine.masks import _lowest_k


def _reference(scores: list[torch.Tensor], pruned: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([torch.where(p, -1.0, s).flatten() for s, p in zip(scores, pruned, strict=True)])
    return list(torch.split(_lowest_k(flat, k), [s.numel() for s in scores]))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    levels=st.integers(1, 6),  # few distinct values: many ties
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_single_process_equals_lowest_k_with_ties_and_pruned(sizes, levels, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, levels, (n,), generator=g).float() / levels for n in sizes]
    pruned = [torch.rand(n, generator=g) < 0.2 for n in sizes]
    k = round(fraction * sum(sizes))
    got = lowest_k_mask([sortable_keys(s, p) for s, p in zip(scores, pruned, strict=True)], k)
    assert sum(int(m.sum()) for m in got) == k
    assert all(torch.equal(a, b) for a, b in zip(got, _reference(scores, pruned, k), strict=True))


@pytest.mark.parametrize("high_bin", [0, 1, 0x3F80, (1 << 15) - 1])
def test_keys_on_the_edges_of_the_chosen_bin_are_counted_in_the_right_bin(high_bin):
    # The second pass shifts keys by the chosen bin's start and clamps: keys just below and just above the bin (and
    # the largest key) must fall outside it, its first and last values inside.
    base = high_bin << 16
    edges = [base - 1, base, base + 1, base + 0xFFFF, base + 0x10000, 0x7FFFFFFF, 0, 1]
    edges = [e for e in edges if 0 <= e <= 0x7FFFFFFF]
    keys = torch.tensor(edges * 3, dtype=torch.int32)[torch.randperm(3 * len(edges), generator=torch.Generator())]
    order = torch.sort(keys.long() * keys.numel() + torch.arange(keys.numel()), stable=True).indices
    for k in range(keys.numel() + 1):
        expected = torch.zeros(keys.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        (got,) = lowest_k_mask([keys], k)
        assert torch.equal(got, expected), k


def test_keys_keep_the_order_of_magnitudes_including_tiny_and_huge():
    values = torch.tensor([0.0, 1e-38, 1e-30, 0.5, 1.0, 3e38, float("inf")])
    keys = sortable_keys(values)
    assert bool((keys[1:] > keys[:-1]).all()) and int(keys.min()) == 1
    with pytest.raises(ValueError, match="non-negative, non-NaN"):
        sortable_keys(torch.tensor([-1.0]))


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"`k` must be in \[0, 3\], got 4"):
        lowest_k_mask([sortable_keys(torch.rand(3))], 4)


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same full tensors on every rank; each keeps its uneven slice
    full = [(torch.randint(0, 5, (65, 3)).float() / 5), torch.randint(0, 3, (7,)).float()]
    pruned = [torch.rand(65, 3) < 0.1, torch.zeros(7, dtype=torch.bool)]
    bounds = [(0, 33), (33, 65)]  # FSDP2's uneven split of 65 rows
    lo, hi = bounds[rank]
    small = [(0, 4), (4, 7)][rank]
    local = [full[0][lo:hi], full[1][small[0] : small[1]]]
    local_pruned = [pruned[0][lo:hi], pruned[1][small[0] : small[1]]]
    k = 101
    keys = [sortable_keys(s, p) for s, p in zip(local, local_pruned, strict=True)]
    masks = lowest_k_mask(keys, k, group=dist.group.WORLD)
    out[rank] = [m.clone() for m in masks]
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_processes_select_exactly_k_like_the_gathered_tensor(tmp_path):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    torch.manual_seed(0)
    full = [(torch.randint(0, 5, (65, 3)).float() / 5), torch.randint(0, 3, (7,)).float()]
    pruned = [torch.rand(65, 3) < 0.1, torch.zeros(7, dtype=torch.bool)]
    # The reference ranks the rank-ordered concatenation: rank 0's shards, then rank 1's.
    order = [full[0][:33], full[1][:4], full[0][33:], full[1][4:]]
    order_pruned = [pruned[0][:33], pruned[1][:4], pruned[0][33:], pruned[1][4:]]
    expected = _reference(order, order_pruned, 101)
    got = [*out[0], *out[1]]
    assert sum(int(m.sum()) for m in got) == 101
    assert all(torch.equal(a.flatten(), b) for a, b in zip(got, expected, strict=True))
    assert os.path.exists(tmp_path)


def test_local_tensor_of_a_plain_tensor_is_itself():
    t = torch.zeros(3)
    assert local_tensor(t) is t
