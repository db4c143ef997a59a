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
