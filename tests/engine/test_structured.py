"""Structured pruning on plain modules: channel groups, group-complete masks, exact physical removal on each
supported pattern, layer sizes after removal, the classifier intact, counts with and without rounding, N:M."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demos.models import LeNet5, ResidualCNN
from lightning_compress.engine.config import PruningConfig
from lightning_compress.engine.pruner import GradualPruner
from lightning_compress.engine.structured import (
    compute_group_masks,
    count_params_and_macs,
    find_channel_groups,
    load_compact,
    n_m_masks,
    parse_n_m,
    remove_channels,
    save_compact,
    tensor_masks,
)


class DepthwiseConcat(nn.Module):
    """Conv-BN, a depthwise + pointwise branch concatenated with a 1x1 branch, a 1x1 mix, flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.side = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = torch.cat([self.pw(F.relu(self.dw(x))), self.side(x)], 1)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.mix(y)), 4).flatten(1))


class Attention(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block with separate q/k/v Linear layers and an FFN, mean-pooled into a head."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 64), nn.Linear(64, d), nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def _randomize_norms(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -1, 1)
    return net


CASES = {
    "lenet5 (flatten -> Linear)": (LeNet5, (2, 1, 28, 28)),
    "residual cnn (conv + BN + residual add)": (ResidualCNN, (2, 1, 28, 28)),
    "depthwise + concat": (DepthwiseConcat, (2, 3, 16, 16)),
    "attention block (FFN hidden units)": (Block, (2, 7, 32)),
}


def _prune(net: nn.Module, x: torch.Tensor, sparsity: float, round_to: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search = find_channel_groups(net, ((x[:1],), {}))
    tensors = dict([*net.named_parameters(), *net.named_buffers()])
    keep = compute_group_masks(search.groups, tensors, sparsity, round_to=round_to)
    with torch.no_grad():
        for name, mask in tensor_masks(search.groups, keep, {n: t.shape for n, t in tensors.items()}).items():
            tensors[name].mul_(mask)
    return search, keep


@pytest.mark.parametrize("case", list(CASES))
def test_removal_is_exact_and_keeps_the_classifier(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    net = _randomize_norms(make()).train()
    x = torch.randn(*shape)
    search, keep = _prune(net, x, 0.5)
    assert net.training  # the train/eval flags are restored after tracing
    assert search.channels > 0 and sum(int((~k).sum()) for k in keep.values()) == round(0.5 * search.channels)
    net.eval()
    with torch.no_grad():
        reference = net(x)
        compact = remove_channels(net, search.groups, keep, ((x[:1],), {})).eval()
        out = compact(x)
    assert out.shape == reference.shape  # the network's output features are never pruned
    assert float((out - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in net.parameters())
    assert count_params_and_macs(compact, ((x[:1],), {}))[1] < count_params_and_macs(net, ((x[:1],), {}))[1]


def test_layer_sizes_after_removal_follow_the_groups():
    torch.manual_seed(0)
    net = ResidualCNN().eval()
    x = torch.randn(2, 1, 28, 28)
    search, keep = _prune(net, x, 0.5, round_to=8)
    compact = remove_channels(net, search.groups, keep, ((x[:1],), {}))
    kept = {g.name: int(keep[g.name].sum()) for g in search.groups}
    assert compact.stem[0].out_channels == compact.stem[1].num_features == kept["stem.0"]
    # the residual stream of stage 1 is one group: the stem, both block convs' ends and stage 2's inputs agree
    assert compact.stage1.body[1][0].out_channels == kept["stem.0"]
    assert compact.stage2.body[0][0].in_channels == compact.stage2.shortcut[0].in_channels == kept["stem.0"]
    assert compact.fc.out_features == 10 and compact.fc.in_features == kept["stage3.shortcut.0"]
    assert all(k % 8 == 0 for k in kept.values())  # round_to=8: widths multiples of 8


def test_groups_are_complete_and_output_features_protected():
    net = LeNet5()
    search = find_channel_groups(net, ((torch.randn(1, 1, 28, 28),), {}))
    by_name = {g.name: g for g in search.groups}
    assert set(by_name) == {"conv1", "conv2", "fc1", "fc2"} and search.output_groups == ["fc3"]
    assert by_name["conv2"].tensors == ["conv2.weight", "conv2.bias", "fc1.weight"]
    fc1_columns = next(c for c in by_name["conv2"].couplings if c.tensor == "fc1.weight")
    assert fc1_columns.dim == 1 and len(fc1_columns.index) == 400  # each conv channel owns 5x5 Linear columns
    assert torch.equal(fc1_columns.channel, torch.arange(16).repeat_interleave(25))


def test_attention_heads_are_pruned_whole_and_layernorm_streams_left_out_with_a_notice():
    net = Block()
    with pytest.warns(UserWarning, match=r"leaves out 1 group\(s\).*LayerNorm ln2"):
        search = find_channel_groups(net, ((torch.randn(1, 7, 32),), {}))
    by_name = {g.name: g for g in search.groups}
    assert set(by_name) == {"fc1", "attn.v"}  # the FFN hidden units, and the heads
    heads = by_name["attn.v"]
    assert (heads.unit, heads.heads) == (8, "attn")  # 4 heads of 8: q, k, v rows and o's columns together
    assert {"attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight"} <= set(heads.tensors)


class HFStyleSelfAttention(nn.Module):
    """Attention as Hugging Face writes it: `num_attention_heads`, `all_head_size`, and the output projection in
    another module, with an explicit softmax(q k^T) v."""

    def __init__(self, d: int = 48, heads: int = 6) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.all_head_size = heads, d // heads, d
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / self.attention_head_size**0.5, dim=-1)
        return (weights @ v).transpose(1, 2).reshape(b, n, self.all_head_size)


class HFStyleEncoder(nn.Module):
    def __init__(self, d: int = 48) -> None:
        super().__init__()
        self.self_attn, self.out = HFStyleSelfAttention(d), nn.Linear(d, d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 96), nn.Linear(96, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.out(self.self_attn(x))
        return self.head((x + self.fc2(torch.relu(self.fc1(x)))).mean(1))


@pytest.mark.parametrize("make", [Block, HFStyleEncoder])
def test_removing_whole_heads_is_exact_and_lowers_the_head_count(make):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(3, 7, net.fc1.in_features)
    search, keep = _prune(net, x, 0.5)
    heads = next(g for g in search.groups if g.unit > 1)
    per_head = keep[heads.name].view(-1, heads.unit)
    assert bool((per_head.all(1) | ~per_head.any(1)).all())  # every head kept or removed whole
    assert sum(int((~k).sum()) for k in keep.values()) == round(0.5 * search.channels)  # the FFN absorbs rounding
    with torch.no_grad():
        reference = net(x)
        compact = remove_channels(net, search.groups, keep, ((x[:1],), {})).eval()
        out = compact(x)
    assert float((out - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    owner = compact.get_submodule(heads.heads)
    count = getattr(owner, "num_heads", None) or owner.num_attention_heads
    assert count == int(per_head.all(1).sum()) < (getattr(net.get_submodule(heads.heads), "num_heads", 0) or 6)


def test_include_and_exclude_act_on_groups():
    net = LeNet5()
    example = ((torch.randn(1, 1, 28, 28),), {})
    only_convs = find_channel_groups(net, example, include=[r"^conv"])
    assert [g.name for g in only_convs.groups] == ["conv2", "conv1"]
    # excluding fc1 drops both groups that touch it: its own rows and conv2's group (fc1's input columns)
    without = find_channel_groups(net, example, exclude=[r"^fc1\."])
    assert sorted(g.name for g in without.groups) == ["conv1", "fc2"]


def test_global_counts_floors_and_rounding():
    net = LeNet5()
    search = find_channel_groups(net, ((torch.randn(1, 1, 28, 28),), {}))
    tensors = dict(net.named_parameters())
    exact = compute_group_masks(search.groups, tensors, 0.6)
    assert sum(int((~k).sum()) for k in exact.values()) == round(0.6 * 226)
    floors = compute_group_masks(search.groups, tensors, 0.99, min_channels_per_group=4)
    assert all(int(k.sum()) >= 4 for k in floors.values())
    fraction = compute_group_masks(search.groups, tensors, 0.99, min_channels_per_group=0.25)
    assert all(int(k.sum()) >= -(-k.numel() // 4) for k in fraction.values())
    rounded = compute_group_masks(search.groups, tensors, 0.5, round_to=8)
    for name, k in rounded.items():
        assert int(k.sum()) % 8 == 0 or int(k.sum()) == k.numel(), name
    assert abs(sum(int((~k).sum()) for k in rounded.values()) - 113) <= 4 * len(rounded)


def test_pruner_resumes_identically_and_masks_only_grow():
    def build():
        torch.manual_seed(0)
        net = ResidualCNN()
        search = find_channel_groups(net, ((torch.randn(1, 1, 28, 28),), {}))
        tensors = dict([*net.named_parameters(), *net.named_buffers()])
        weights = {t: tensors[t] for g in search.groups for t in g.tensors}
        config = PruningConfig(target_sparsity=0.5, structure="channel", end_step=6, update_every_n_steps=2)
        return net, GradualPruner(weights, config.resolve(None), groups=search.groups)

    def train(net, pruner, steps, first):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        opt.register_step_post_hook(lambda *_: pruner.apply())
        for step in range(first, first + steps):
            torch.manual_seed(step)
            loss = net(torch.randn(4, 1, 28, 28)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            pruner.mask_gradients()
            opt.step()
            pruner.step(step + 1)
        return opt

    net_a, pruner_a = build()
    pruner_a.step(0)
    opt_a = train(net_a, pruner_a, 3, 0)
    earlier = {n: k.clone() for n, k in pruner_a.group_masks.items()}
    net_b, pruner_b = build()
    net_b.load_state_dict(net_a.state_dict())
    pruner_b.load_state_dict(pruner_a.state_dict())
    opt_b = train(net_b, pruner_b, 0, 3)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # SGD would share the momentum tensors
    for net, pruner, opt in ((net_a, pruner_a, opt_a), (net_b, pruner_b, opt_b)):
        opt.register_step_post_hook(lambda *_, p=pruner: p.apply())
        for step in range(3, 8):
            torch.manual_seed(step)
            loss = net(torch.randn(4, 1, 28, 28)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            pruner.mask_gradients()
            opt.step()
            pruner.step(step + 1)
    diff = [k for k, a in net_a.state_dict().items() if not torch.equal(a, net_b.state_dict()[k])]
    assert not diff
    assert all(not bool((~earlier[n] & pruner_a.group_masks[n]).any()) for n in earlier)  # nothing revived
    report = pruner_a.report()
    assert report.channels is not None and report.to_metrics()["channel_sparsity"] == report.channels[0] / 352


def test_state_dict_form_rebuilds_the_compact_model(tmp_path):
    torch.manual_seed(0)
    net = _randomize_norms(ResidualCNN()).eval()
    x = torch.randn(3, 1, 28, 28)
    search, keep = _prune(net, x, 0.5)
    compact = remove_channels(net, search.groups, keep, ((x[:1],), {})).eval()
    save_compact(compact, tmp_path / "compact.pt")
    with pytest.raises(ValueError, match=r"`model` is needed"):
        load_compact(tmp_path / "compact.pt")
    rebuilt = load_compact(tmp_path / "compact.pt", model=ResidualCNN()).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), compact(x))


def test_n_m_masks_keep_n_of_every_m_along_the_input_dimension():
    torch.manual_seed(0)
    linear, conv = torch.randn(6, 16), torch.randn(4, 8, 3, 3)
    masks = n_m_masks({"linear": linear, "conv": conv}, 2, 4)
    assert torch.equal(masks["linear"].reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2))
    runs = masks["conv"].permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(runs.sum(1), torch.full((runs.shape[0],), 2))
    kept = linear.abs().reshape(6, 4, 4)[masks["linear"].reshape(6, 4, 4)].reshape(6, 4, 2)
    dropped = linear.abs().reshape(6, 4, 4)[~masks["linear"].reshape(6, 4, 4)].reshape(6, 4, 2)
    assert bool((kept.min(-1).values >= dropped.max(-1).values).all())


def test_n_m_pruner_excludes_layers_whose_input_is_not_a_multiple_of_m():
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    config = PruningConfig(structure="2:4", end_step=4, update_every_n_steps=2).resolve(None)
    assert config.target_sparsity == 0.5
    with pytest.warns(UserWarning, match=r"leaves out 1 weight\(s\) whose input dimension is not a multiple of 4: 0"):
        pruner = GradualPruner({"0.weight": net[0].weight, "2.weight": net[2].weight}, config)
    assert pruner.step(0) and list(pruner.masks) == ["2.weight"]
    assert pruner.stats().sparsity == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"structure": "2:4", "target_sparsity": 0.7},
            r"`target_sparsity` must be \(M-N\)/M = 0.5 for `structure`='2:4'",
        ),
        ({"structure": "4:4"}, r"`structure`='4:4' must have 1 <= N < M"),
        ({"structure": "2-4"}, r"or an 'N:M' pattern such as '2:4', got '2-4'"),
        ({"structure": "channel", "round_to": 0}, r"`round_to` must be a positive integer, got 0"),
        ({"structure": "channel", "min_channels_per_group": 1.5}, r"`min_channels_per_group` must be a count >= 1"),
    ],
)
def test_bad_structured_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_parse_n_m():
    assert parse_n_m("1:8") == (1, 8) and parse_n_m("unstructured") is None
