import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress.engine.masks import (
    MaskApplier,
    compute_masks,
    measure_sparsity,
    pack_mask,
    unpack_mask,
)
from lightning_compress.engine.selection import select_modules, select_parameters


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(30, 20, generator=g),
        "b": torch.randn(8, 4, 3, 3, generator=g),
        "c": torch.randn(7, generator=g),
    }


def _pruned(masks):
    return {n: int((~m).sum()) for n, m in masks.items()}


@settings(deadline=None, max_examples=40)
@given(st.floats(0.0, 1.0), st.sampled_from(["global", "local"]), st.sampled_from(["magnitude", "random"]))
def test_exact_count(sparsity, scope, criterion):
    weights = _weights()
    masks = compute_masks(weights, sparsity, scope=scope, criterion=criterion)
    if scope == "global":
        total = sum(w.numel() for w in weights.values())
        assert sum(_pruned(masks).values()) == round(sparsity * total)
    else:
        assert _pruned(masks) == {n: round(sparsity * w.numel()) for n, w in weights.items()}


def test_global_magnitude_prunes_smallest():
    weights = _weights()
    masks = compute_masks(weights, 0.5)
    kept = torch.cat([w[m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    pruned = torch.cat([w[~m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    assert pruned.max() <= kept.min()


def test_ties_are_deterministic_and_exact():
    weights = {"a": torch.ones(10, 10), "b": torch.zeros(5, 5)}
    first = compute_masks(weights, 0.6)
    assert sum(_pruned(first).values()) == 75
    assert all(torch.equal(first[n], m) for n, m in compute_masks(weights, 0.6).items())
    assert _pruned(first)["b"] == 25  # zeros first, then the earliest of the tied ones


@given(st.floats(0.0, 0.9), st.floats(0.0, 0.9), st.sampled_from(["magnitude", "random"]))
@settings(deadline=None, max_examples=30)
def test_masks_only_grow(s1, s2, criterion):
    weights = _weights()
    first = compute_masks(weights, s1, criterion=criterion)
    for name, w in weights.items():
        w.mul_(first[name])
        w.add_(torch.randn_like(w) * 0.01 * first[name])  # training moves surviving weights
    second = compute_masks(weights, s2, criterion=criterion, current_masks=first)
    for name in weights:
        assert not (second[name] & ~first[name]).any()


def test_random_is_seeded():
    weights = _weights()
    a = compute_masks(weights, 0.5, criterion="random", seed=3)
    b = compute_masks(weights, 0.5, criterion="random", seed=3)
    c = compute_masks(weights, 0.5, criterion="random", seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_channel_structure_prunes_whole_output_channels(scope):
    weights = {"conv": torch.randn(16, 3, 3, 3), "fc": torch.randn(12, 40)}
    masks = compute_masks(weights, 0.5, scope=scope, structure="channel")
    pruned_channels = 0
    for mask in masks.values():
        rows = mask.reshape(mask.shape[0], -1)
        assert torch.all(rows.all(dim=1) | ~rows.any(dim=1))  # each channel entirely kept or entirely pruned
        pruned_channels += int((~rows.any(dim=1)).sum())
    assert pruned_channels == 14


def test_apply_and_mask_gradients_in_place():
    layer = nn.Linear(6, 5)
    weights = {"w": layer.weight}
    masks = compute_masks(weights, 0.4)
    param_before = layer.weight
    layer(torch.randn(3, 6)).sum().backward()
    applier = MaskApplier(weights, masks)
    applier.mask_gradients()
    applier.apply()
    assert layer.weight is param_before
    assert torch.all(layer.weight[~masks["w"]] == 0) and torch.all(layer.weight.grad[~masks["w"]] == 0)
    assert measure_sparsity(weights).sparsity == pytest.approx(12 / 30)


@given(st.lists(st.booleans(), min_size=1, max_size=100))
def test_pack_roundtrip(bits):
    mask = torch.tensor(bits)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(bits) + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_sparsity_stats_sizes():
    stats = measure_sparsity({"w": torch.tensor([0.0, 1.0, 0.0, 2.0])})
    assert (stats.total_zeros, stats.nonzero, stats.dense_bytes(), stats.sparse_bytes()) == (2, 2, 16, 9)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.norm = nn.LayerNorm(8)


def test_default_selection_is_linear_and_conv_weights_only():
    assert list(select_parameters(Net())) == ["conv.weight", "fc1.weight", "head.weight"]


def test_include_exclude():
    assert list(select_parameters(Net(), exclude=["^head"])) == ["conv.weight", "fc1.weight"]
    # include narrows the Linear/Conv weights (not their biases and norms, e.g. a block's LayerNorm) ...
    assert list(select_parameters(Net(), include=[r"fc1\.", "norm"])) == ["fc1.weight", "norm.weight", "norm.bias"]
    assert list(select_parameters(Net(), include=[r"fc1\.|head\."])) == ["fc1.weight", "head.weight"]
    # ... and a pattern matching none of them targets other parameters on purpose
    assert list(select_parameters(Net(), include=[r"fc1\.bias"])) == ["fc1.bias"]
    assert list(select_modules(Net(), exclude=["conv"])) == ["fc1", "head"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": ["nothing"]}, r"`include` pattern 'nothing' matches no parameter name\. Available .*conv\.weight"),
        ({"exclude": ["zzz"]}, r"`exclude` pattern 'zzz' matches no parameter name"),
        ({"exclude": ["weight"]}, r"leaves no parameter to compress\. Available parameter names: conv\.weight"),
        ({"include": ["("]}, r"`include` has an invalid regular expression '\('"),
    ],
)
def test_selection_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_parameters(Net(), **kwargs)


def test_global_mask_on_11m_parameters_is_fast_enough_to_run():
    # Not a timing assertion (see bench/), only that 11M parameters are handled without blowing memory up.
    weights = {f"l{i}": torch.randn(1000, 1100) for i in range(10)}
    masks = compute_masks(weights, 0.9)
    assert sum(_pruned(masks).values()) == round(0.9 * 11_000_000)


def test_channel_masks_keep_a_channel_per_layer_and_skip_protected_tensors():
    torch.manual_seed(0)
    weights = {"a": torch.randn(8, 3), "b": torch.randn(4, 8), "head": torch.randn(2, 4)}
    for scope in ("global", "local"):
        masks = compute_masks(weights, 0.99, scope=scope, structure="channel", protected=["head"])
        assert bool(masks["head"].all()), scope
        for name in ("a", "b"):
            assert int(masks[name].any(dim=1).sum()) == 1, (scope, name)


def test_compute_masks_validates_its_arguments():
    w = {"w": torch.randn(4, 4)}
    with pytest.raises(ValueError, match=r"`scope` must be one of 'global', 'local', got 'layer'"):
        compute_masks(w, 0.5, scope="layer")
    with pytest.raises(ValueError, match=r"`criterion` must be one of 'magnitude', 'random', got 'l1'"):
        compute_masks(w, 0.5, criterion="l1")
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\], got 1.5"):
        compute_masks(w, 1.5)


def _sorted_reference(weights, sparsity, current):
    """Global magnitude masks by a full stable sort: pruned entries first, then by |w|, ties by flat position."""
    names = list(weights)
    scores = torch.cat([torch.where(current[n], weights[n].abs(), -1.0).flatten().double() for n in names])
    k = round(sparsity * scores.numel())
    order = torch.sort(scores, stable=True).indices
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    pruned[order[:k]] = True
    parts = torch.split(pruned, [weights[n].numel() for n in names])
    return {n: ~p.reshape(weights[n].shape) & current[n] for n, p in zip(names, parts, strict=True)}  # only grow


@settings(deadline=None, max_examples=25)
@given(
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=4),
    levels=st.integers(1, 5),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_chunked_select_equals_a_sort_on_ties_across_chunks(sizes, levels, sparsity, seed):
    """Chunks of 64 entries: ties at the threshold span chunks and tensors; the masks equal a stable sort's."""
    import lightning_compress.engine.distributed as distributed

    g = torch.Generator().manual_seed(seed)
    weights = {f"w{i}": (torch.randint(-levels, levels + 1, (n,), generator=g) / levels) for i, n in enumerate(sizes)}
    current = {n: torch.rand(w.shape, generator=g) > 0.2 for n, w in weights.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "CHUNK", 64)
        got = compute_masks(weights, sparsity, current_masks=current)
    expected = _sorted_reference(weights, sparsity, current)
    assert all(torch.equal(got[n], expected[n]) for n in weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_nan_or_inf_weights_are_named(bad, scope):
    from lightning_compress.engine.masks import NonFiniteWeightsError

    weights = {"a": torch.randn(5, 5), "b": torch.randn(300)}
    weights["b"][7] = bad
    with pytest.raises(NonFiniteWeightsError, match=r"NaN or Inf entries: 'b': 1") as caught:
        compute_masks(weights, 0.5, scope=scope)
    assert caught.value.counts == {"b": 1}


def test_largest_finite_weight_is_ranked_not_refused():
    weights = {"a": torch.tensor([torch.finfo(torch.float32).max, 1.0, 0.5, 2.0])}
    assert compute_masks(weights, 0.5)["a"].tolist() == [True, False, False, True]


def test_applier_holds_the_boolean_masks_only():
    weights = _weights()
    masks = compute_masks(weights, 0.5)
    applier = MaskApplier(weights, masks)
    for multiplier, mask in zip(applier._multipliers, masks.values(), strict=True):
        assert multiplier.dtype == torch.uint8 and multiplier.data_ptr() == mask.data_ptr()  # a view, no copy
    with pytest.raises(ValueError, match=r"must be boolean and shaped like its weight"):
        MaskApplier(weights, {"a": masks["a"].float()})


def _old_scores_reference(weights, sparsity, scope, structure, criterion, current, protected, seed):
    """The masks of the former implementation: every score in one tensor, ``kthvalue``, ties to the lowest index."""
    from lightning_compress.engine.masks import _lowest_k

    generator = torch.Generator().manual_seed(seed)
    ranked = [n for n in weights if n not in protected]
    scores = {}
    for name in ranked:
        w, mask = weights[name], current.get(name)
        if structure == "channel":
            rows = w.reshape(w.shape[0], -1).float()
            s = (
                rows.norm(dim=1) / rows.shape[1] ** 0.5
                if criterion == "magnitude"
                else torch.rand(w.shape[0], generator=generator)
            )
            if mask is not None:
                s[~mask.reshape(mask.shape[0], -1).any(dim=1)] = -1.0
            s[s.argmax()] = float("inf")
        else:
            s = w.abs().flatten() if criterion == "magnitude" else torch.rand(w.numel(), generator=generator)
            if mask is not None:
                s[~mask.flatten()] = -1.0
        scores[name] = s
    if structure == "channel" and scope == "global":
        sparsity = min(sparsity, 1.0 - len(scores) / sum(s.numel() for s in scores.values()))
    if scope == "global":
        flat = torch.cat(list(scores.values()))
        pruned = dict(
            zip(
                scores,
                torch.split(_lowest_k(flat, round(sparsity * flat.numel())), [s.numel() for s in scores.values()]),
                strict=True,
            )
        )
    else:
        keep_one = int(structure == "channel")
        pruned = {n: _lowest_k(s, min(round(sparsity * s.numel()), s.numel() - keep_one)) for n, s in scores.items()}
    masks = {}
    for name, w in weights.items():
        if name not in pruned:  # protected: never pruned, but what is pruned already stays pruned
            masks[name] = current.get(name, torch.ones_like(w, dtype=torch.bool)).clone()
            continue
        keep = ~pruned[name]
        if structure == "channel":
            keep = keep.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)
        masks[name] = keep.reshape(w.shape).clone() & current.get(name, torch.ones_like(w, dtype=torch.bool))
    return masks


@settings(deadline=None, max_examples=30)
@given(
    structure=st.sampled_from(["unstructured", "channel"]),
    criterion=st.sampled_from(["random", "magnitude"]),
    scope=st.sampled_from(["global", "local"]),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    ties=st.booleans(),
    protect=st.booleans(),
)
def test_random_and_channel_rankings_equal_the_former_kthvalue_masks(
    structure, criterion, scope, sparsity, seed, ties, protect
):
    """Random and channel rankings go through the chunked radix selection (chunks of 64 entries here, so tensors span
    many): the same masks as the former concatenated ``kthvalue``, ties and pruned entries included."""
    import lightning_compress.engine.distributed as distributed

    g = torch.Generator().manual_seed(seed)
    weights = {
        "a": torch.randn(40, 9, generator=g),
        "b": torch.randn(12, 3, 2, 2, generator=g),
        "c": torch.randn(300, generator=g),
    }
    if ties:
        weights = {n: (w * 2).round() / 2 for n, w in weights.items()}
    current = {n: torch.rand(w.shape, generator=g) > 0.3 for n, w in weights.items()}
    if structure == "channel":  # whole channels pruned in the current masks
        current = {
            n: m.reshape(m.shape[0], -1)[:, :1].expand(m.shape[0], m[0].numel()).reshape(m.shape)
            for n, m in current.items()
        }
    protected = ["b"] if protect else []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "CHUNK", 64)
        got = compute_masks(
            weights,
            sparsity,
            scope=scope,
            structure=structure,
            criterion=criterion,
            current_masks=current,
            seed=seed,
            protected=protected,
        )
    expected = _old_scores_reference(weights, sparsity, scope, structure, criterion, current, protected, seed)
    assert all(torch.equal(got[n], expected[n]) for n in weights)


def test_random_scores_are_drawn_again_for_out_of_order_reads():
    from lightning_compress.engine.masks import RandomKeys, _RandomStream

    stream = _RandomStream(7, [5, 0, 9])
    first, last = RandomKeys(stream, 0, None, torch.device("cpu")), RandomKeys(stream, 2, None, torch.device("cpu"))
    in_order = [first.keys(0, 5).clone(), last.keys(0, 4).clone(), last.keys(4, 9).clone()]
    expected = torch.rand(14, generator=torch.Generator().manual_seed(7)).view(torch.int32) + 1
    assert torch.equal(torch.cat(in_order), expected)
    assert torch.equal(last.keys(4, 9), expected[9:])  # a read that does not continue the stream: drawn again
    assert torch.equal(first.keys(2, 5), expected[2:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_applier_masks_tensors_larger_than_a_chunk_exactly(dtype):
    """CPU tensors longer than ``APPLY_CHUNK`` are masked chunk by chunk through a cached buffer; small ones, and
    gradients laid out unlike their masks, in one ``torch._foreach_mul_``: every result equals ``tensor * mask``."""
    from lightning_compress.engine.masks import APPLY_CHUNK

    g = torch.Generator().manual_seed(0)
    shapes = {"big": (APPLY_CHUNK // 100 + 3, 250), "small": (7, 5), "exact": (APPLY_CHUNK,)}
    weights = {n: nn.Parameter(torch.randn(s, generator=g).to(dtype)) for n, s in shapes.items()}
    masks = {n: torch.rand(s, generator=g) > 0.6 for n, s in shapes.items()}
    expected = {n: w.detach() * masks[n].to(dtype) for n, w in weights.items()}
    grads = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    grads["big"] = grads["big"].t().contiguous().t()  # same shape, column-major: not chunked
    for name, weight in weights.items():
        weight.grad = grads[name].clone()
    optimizer = torch.optim.Adam(weights.values())
    optimizer.state[weights["big"]] = {"exp_avg": torch.randn(shapes["big"], generator=g), "step": torch.tensor(3.0)}
    state_before = optimizer.state[weights["big"]]["exp_avg"].clone()
    applier = MaskApplier(weights, masks)
    applier.apply()
    applier.mask_gradients()
    applier.mask_state(optimizer)
    for name, weight in weights.items():
        assert torch.equal(weight.detach(), expected[name]), name
        assert torch.equal(weight.grad, grads[name] * masks[name].to(dtype)), name
    assert torch.equal(optimizer.state[weights["big"]]["exp_avg"], state_before * masks["big"])
    assert optimizer.state[weights["big"]]["step"] == 3.0
    assert len(applier._buffers) == 1 + (dtype != torch.float32)  # one chunk per dtype (the fp32 Adam state)
