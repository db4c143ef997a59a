"""Structured pruning: dependency groups of channels, group-complete masks, physical removal, N:M patterns.

**Groups.** Channels are coupled: removing output channel ``c`` of a convolution also removes its bias entry, the
BatchNorm affine entries ``c``, input column ``c`` of every consumer (``H*W`` columns of a Linear after a flatten),
and, through a residual add or a concat, the same channel of every other producer of that tensor.
``find_channel_groups`` asks Torch-Pruning's ``DependencyGraph`` (DepGraph, Fang et al. 2023) for these groups
from one example call, and describes each one as a ``ChannelGroup``: for every coupled tensor, the dimension
and the indices that belong to each channel. Every group is then checked on a copy of the network: one channel is
masked group-completely and then removed physically, and the two outputs must agree. A group whose removal fails or
changes the outputs (LayerNorm over a pruned stream, per-head dimensions of attention, the network's own output
features) is left out; a one-line warning names the modules. ``nn.MultiheadAttention``, LayerNorm/GroupNorm/
InstanceNorm, embeddings, recurrent layers, grouped (non-depthwise) and transposed convolutions are left out before
the check.

**Heads.** A group holding the separate q/k/v projections of one module with a ``num_heads``-like attribute is pruned
in whole heads (``ChannelGroup.unit`` = the head width): its channels share their head's score, its kept width is a
multiple of the head width, and removal lowers the module's head count.

**Scores.** A channel's score is the mean, over the group's scored tensors (weights and biases of producers, norm
affine, consumers' columns; not running statistics), of the root mean square of that tensor's entries coupled to the
channel, divided by the mean of that quantity over the group's live channels. Each tensor thus contributes on the
same scale (a BatchNorm ``gamma`` and a 3x3 kernel count alike), and every group's live channels average 1, so in
``scope="global"`` groups of different size and scale are ranked on one axis; every channel is one unit of the
count, whatever its group's size.

**Counts.** ``C`` is the number of channels of all prunable groups (the groups found, minus those left out or not
selected by ``include``/``exclude``). At target ``s`` (``round_to=1``), exactly ``round(s * C)`` channels are
pruned (``global``; per group with ``local``), except that every group keeps ``min_channels_per_group`` channels.
With ``round_to=r > 1`` the number of kept channels of every group is rounded to a multiple of ``r`` (or the
group's full width); the rounding error is carried from group to group, so the total stays within about ``r/2``
channels of ``round(s * C)`` (the achieved channel sparsity is reported next to the target).

**N:M** (``n_m_masks``): in every run of ``M`` consecutive weights along the input dimension, the ``N`` largest
are kept. On CPU this is a mask only: 2:4 kernels (``torch.sparse.to_sparse_semi_structured``) need a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.engine.io import atomic_path
from lightning_compress.engine.selection import compile_patterns

#: Call arguments of a network: positional and keyword.
Call = tuple[tuple[Any, ...], dict[str, Any]]

_PRUNED_SCORE = -1.0
_COMPACT_FORMAT = "lightning_compress.compact/1"
#: Module attributes that define a layer's shapes, saved with the compact state dict so it can be rebuilt.
_SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
#: Attributes that hold a module's number of attention heads (ours, HF, GPT-style), lowered when heads are removed.
_HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads")
#: Attributes that hold the total width of the heads (HF ``all_head_size``), lowered with them.
_HEAD_WIDTH_ATTRIBUTES = ("all_head_size", "inner_dim")
_UNSUPPORTED = (
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Embedding,
    nn.RNNBase,
)


def parse_n_m(structure: str) -> tuple[int, int] | None:
    """``(N, M)`` of an ``"N:M"`` structure string, ``None`` for any other string.

    Raises:
        ValueError: If it looks like ``N:M`` but ``N < 1`` or ``N >= M``.

    Examples:
        >>> parse_n_m("2:4"), parse_n_m("channel")
        ((2, 4), None)
    """
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise ValueError(
            f"`structure`={structure!r} must have 1 <= N < M (keep N of every M weights), got N={n}, M={m}."
        )
    return n, m


# ----------------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Coupling:
    """The entries of one tensor that belong to the channels of a group.

    Attributes:
        tensor: Full name of the parameter or buffer.
        dim: The dimension the indices select along.
        index: Positions along ``dim`` (``torch.long``).
        channel: For each position, the group channel it belongs to.
        scored: Whether the entries count in the channel scores (running statistics do not).
    """

    tensor: str
    dim: int
    index: Tensor
    channel: Tensor
    scored: bool = True


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that can only be removed together, with every tensor entry that belongs to them.

    Attributes:
        name: The root producer's module name (full name); the group's key in checkpoints.
        channels: Number of channels (the root producer's output channels).
        couplings: The coupled entries of every tensor.
        modules: Names of the modules the group touches (producers, norms, consumers).
        root: The root producer's module name inside the traced network (for removal).
        unit: Channels removed together: 1, or the head width of an attention group (whole heads only).
        heads: For an attention group, the name (inside the traced network) of the module whose head count
            attribute (``num_heads``-like) goes down when heads are removed; else ``None``.
    """

    name: str
    channels: int
    couplings: tuple[Coupling, ...]
    modules: tuple[str, ...]
    root: str
    unit: int = 1
    heads: str | None = None

    @property
    def tensors(self) -> list[str]:
        """Names of the coupled tensors, in order, without repeats."""
        return list(dict.fromkeys(c.tensor for c in self.couplings))

    def scores(self, tensors: Mapping[str, Tensor], keep: Tensor | None = None) -> Tensor:
        """Normalized RMS score per channel (see the module docstring); pruned channels (``~keep``) score -1."""
        live = torch.ones(self.channels, dtype=torch.bool) if keep is None else keep.cpu()
        total = torch.zeros(self.channels, dtype=torch.float64)
        used = 0
        for coupling in self.couplings:
            if not coupling.scored:
                continue
            t = tensors[coupling.tensor].detach().float().cpu()
            picked = (
                t.index_select(coupling.dim, coupling.index).movedim(coupling.dim, 0).reshape(len(coupling.index), -1)
            )
            sq = torch.zeros(self.channels, dtype=torch.float64).index_add_(
                0, coupling.channel, picked.pow(2).sum(1).double()
            )
            count = torch.zeros(self.channels, dtype=torch.float64).index_add_(
                0, coupling.channel, torch.full((len(coupling.index),), float(picked.shape[1]), dtype=torch.float64)
            )
            rms = (sq / count.clamp_min(1)).sqrt()
            mean = rms[live].mean() if bool(live.any()) else torch.tensor(0.0, dtype=torch.float64)
            if float(mean) > 0:
                total += rms / mean
                used += 1
        score = (total / max(used, 1)).float()
        score[~live] = _PRUNED_SCORE
        if self.unit > 1:  # a head's channels share its mean score: ranked, and so removed, as a whole
            score = score.view(-1, self.unit).mean(1).repeat_interleave(self.unit)
        return score

    def masks(self, keep: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
        """Boolean keep-masks of the coupled tensors for the channels ``keep`` (``True`` = kept)."""
        masks: dict[str, Tensor] = {}
        pruned = ~keep.cpu()
        for coupling in self.couplings:
            mask = masks.setdefault(coupling.tensor, torch.ones(tuple(shapes[coupling.tensor]), dtype=torch.bool))
            gone = coupling.index[pruned[coupling.channel]]
            if len(gone):
                mask.index_fill_(coupling.dim, gone, False)
        return masks


@dataclass
class GroupSearch:
    """What ``find_channel_groups`` found.

    Attributes:
        groups: The prunable groups, in the dependency graph's order.
        left_out: ``{group name: reason}`` for the groups that are never pruned.
        output_groups: Names of the groups holding the network's output features (never pruned, no warning).
    """

    groups: list[ChannelGroup]
    left_out: dict[str, str] = field(default_factory=dict)
    output_groups: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        """``C``: the channels of all prunable groups."""
        return sum(g.channels for g in self.groups)


@contextlib.contextmanager
def tracing(network: nn.Module) -> Iterator[None]:
    """Grad enabled for Torch-Pruning's autograd tracing, and every module's train/eval flag restored after
    (``build_dependency`` leaves the model in eval mode)."""
    flags = [(m, m.training) for m in network.modules()]
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _dependency_graph(network: nn.Module, example: Call) -> Any:
    import torch_pruning as tp

    args, kwargs = example
    with tracing(network), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(
            network, example_inputs=args, forward_fn=lambda m, _: m(*args, **kwargs), verbose=False
        )


def _call(network: nn.Module, example: Call) -> Tensor:
    out = network(*example[0], **example[1])
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ValueError(f"The network must return a Tensor (or a tuple starting with one), got {type(out).__name__}.")
    return out


def _couplings(
    module_name: str, module: nn.Module, handler: str, idxs: list[int], root: list[int]
) -> list[Coupling] | str:
    """The coupled entries of one module for one dependency, or the reason it is not supported."""
    index, channel = torch.tensor(idxs, dtype=torch.long), torch.tensor(root, dtype=torch.long)
    prefix = f"{module_name}." if module_name else ""
    out = handler.endswith("out_channels")
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return f"transposed convolution {module_name}"
        depthwise = module.groups == module.out_channels == module.in_channels and module.groups > 1
        if module.groups > 1 and not depthwise:
            return f"grouped convolution {module_name} (groups={module.groups})"
        entries = [Coupling(f"{prefix}weight", 0 if (out or depthwise) else 1, index, channel)]
        if (out or depthwise) and module.bias is not None:
            entries.append(Coupling(f"{prefix}bias", 0, index, channel))
        return entries
    if isinstance(module, nn.Linear):
        entries = [Coupling(f"{prefix}weight", 0 if out else 1, index, channel)]
        if out and module.bias is not None:
            entries.append(Coupling(f"{prefix}bias", 0, index, channel))
        return entries
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        entries = []
        if module.affine:
            entries += [Coupling(f"{prefix}weight", 0, index, channel), Coupling(f"{prefix}bias", 0, index, channel)]
        if module.running_mean is not None:  # a dead channel's batch mean is 0: keep its running mean at 0 too
            entries.append(Coupling(f"{prefix}running_mean", 0, index, channel, scored=False))
        return entries
    if isinstance(module, nn.PReLU):
        return [Coupling(f"{prefix}weight", 0, index, channel)] if module.num_parameters > 1 else []
    return f"{type(module).__name__} {module_name}"


def _head_count_attribute(module: nn.Module) -> str | None:
    """The attribute holding the number of attention heads of ``module`` (``num_heads``-like), if any."""
    return next((a for a in _HEAD_COUNT_ATTRIBUTES if isinstance(getattr(module, a, None), int)), None)


def _heads_modules(network: nn.Module) -> dict[str, str]:
    """Linear layers inside modules that split channels into heads (a ``num_heads``-like attribute): name -> owner
    (the owner's name inside ``network``; ``""`` for the network itself)."""
    owners: dict[str, str] = {}
    for name, module in network.named_modules():
        if _head_count_attribute(module) and not isinstance(module, nn.MultiheadAttention):
            for sub, child in module.named_modules():
                if isinstance(child, nn.Linear) and sub:
                    owners[f"{name}.{sub}" if name else sub] = name
    return owners


def _head_unit(network: nn.Module, owners: set[str], producers: int, channels: int) -> tuple[int, str | None] | str:
    """``(head width, owner)`` of a group whose producers are the projections (q, k, v) of one attention module,
    ``(1, None)`` when only one of its Linear layers produces the group's channels, or why its heads cannot be
    pruned."""
    if len(owners) != 1:
        return f"projections of several attention modules in one group ({sorted(owners)})"
    (owner,) = owners
    label = owner or type(network).__name__
    if producers < 2:  # e.g. the output projection in a residual stream, or an FFN: plain channels (checked)
        return 1, None
    heads = getattr(network.get_submodule(owner), _head_count_attribute(network.get_submodule(owner)) or "", 0)
    if heads < 2 or channels % heads:
        return f"attention module {label}: {channels} channels do not split into {heads} heads"
    return channels // heads, owner


def _describe(network: nn.Module, dg: Any, group: Any, prefix: str) -> ChannelGroup | str:
    names = {m: n for n, m in network.named_modules()}
    heads = _heads_modules(network)
    root_module = group[0].dep.target.module
    root = names[root_module]
    couplings: list[Coupling] = []
    modules: list[str] = []
    head_owners: set[str] = set()
    head_producers = 0
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, _UNSUPPORTED):
            return f"{type(module).__name__} {names.get(module, '?')}"
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            return "a bare nn.Parameter"
        if module not in names:  # Torch-Pruning's own placeholder ops (add, concat, reshape, relu, ...)
            continue
        name = names[module]
        if isinstance(module, _UNSUPPORTED):
            return f"{type(module).__name__} {name}"
        if name in heads and item.dep.handler.__name__.endswith("out_channels"):
            head_owners.add(heads[name])
            head_producers += 1
        entries = _couplings(
            f"{prefix}{name}", module, item.dep.handler.__name__, list(item.idxs), list(item.root_idxs)
        )
        if isinstance(entries, str):
            return entries
        tensors = dict(
            [*module.named_parameters(prefix=f"{prefix}{name}"), *module.named_buffers(prefix=f"{prefix}{name}")]
        )
        for entry in entries:
            size = tensors[entry.tensor].shape[entry.dim]
            if len(entry.index) and (
                int(entry.index.max()) >= size or int(entry.channel.max()) >= dg.get_out_channels(root_module)
            ):
                return f"inconsistent index mapping at {name} (Torch-Pruning)"
        couplings += entries
        modules.append(f"{prefix}{name}")
    channels = int(dg.get_out_channels(root_module))
    unit, owner = 1, None
    if head_owners:
        found = _head_unit(network, head_owners, head_producers, channels)
        if isinstance(found, str):
            return found
        unit, owner = found
    return ChannelGroup(
        f"{prefix}{root}", channels, tuple(couplings), tuple(dict.fromkeys(modules)), root, unit=unit, heads=owner
    )


def _removal_check(network: nn.Module, example: Call, group: ChannelGroup, prefix: str, rtol: float) -> str | None:
    """Mask the group's last channel on a copy, then remove it physically: ``None`` if both give the same output,
    ``"output"`` if the output shape changes (the network's output features), else the reason."""
    copy_ = copy.deepcopy(network).eval()
    generator = torch.Generator().manual_seed(0)  # random float inputs: an all-zeros example proves little
    example = torch.utils._pytree.tree_map(
        lambda t: (
            torch.randn(t.shape, generator=generator).to(t) if isinstance(t, Tensor) and t.is_floating_point() else t
        ),
        example,
    )
    tensors = {f"{prefix}{n}": t for n, t in [*copy_.named_parameters(), *copy_.named_buffers()]}
    keep = torch.ones(group.channels, dtype=torch.bool)
    keep[-group.unit :] = False  # the last channel, or the last head
    with torch.no_grad():
        for name, mask in group.masks(keep, {n: tensors[n].shape for n in group.tensors}).items():
            tensors[name].mul_(mask.to(tensors[name].device, tensors[name].dtype))
        reference = _call(copy_, example)
    try:
        _remove(copy_, example, [(group, list(range(group.channels - group.unit, group.channels)))])
        with torch.no_grad():
            removed = _call(copy_.eval(), example)
    except Exception as err:  # a structure Torch-Pruning cannot cut
        return f"removal failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if removed.shape != reference.shape:
        return "output"
    scale = float(reference.abs().max()) or 1.0
    diff = float((removed - reference).abs().max())
    if not math.isfinite(diff) or diff > rtol * scale:
        return f"removal changes the outputs (max abs diff {diff:.3g})"
    return None


def find_channel_groups(
    network: nn.Module,
    example: Call,
    *,
    prefix: str = "",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    rtol: float = 1e-5,
) -> GroupSearch:
    """Find the channel groups of ``network`` from one example call and check that each can be removed exactly.

    The network is traced with grad enabled and its train/eval flags are restored; it is not modified.

    Args:
        network: The network (a LightningModule or any ``nn.Module``).
        example: ``(args, kwargs)`` of one call of ``network`` (batch 1 is enough).
        prefix: Prepended to every module and tensor name (``"net."`` when ``network`` is a submodule).
        include: Regular expressions; when given, only groups with a producer weight whose full name matches one
            are pruned.
        exclude: Regular expressions; a group any of whose coupled tensors matches one is never pruned (pruning it
            would change that tensor).
        rtol: Largest output difference, relative to the output scale, accepted in the removal check.

    Returns:
        A ``GroupSearch``; the groups left out are also named in one warning.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 2))
        >>> search = find_channel_groups(net, ((torch.randn(1, 1, 4, 4),), {}))
        >>> [(g.name, g.channels, g.tensors) for g in search.groups]
        [('0', 8, ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '4.weight'])]
    """
    include_re, exclude_re = compile_patterns("include", include), compile_patterns("exclude", exclude)
    dg = _dependency_graph(network, example)
    search = GroupSearch(groups=[])
    for tp_group in dg.get_all_groups():
        described = _describe(network, dg, tp_group, prefix)
        if isinstance(described, str):
            root = tp_group[0].dep.target.module
            name = next((n for n, m in network.named_modules() if m is root), "?")
            search.left_out[f"{prefix}{name}"] = described
            continue
        group = described
        producers = [c.tensor for c in group.couplings if c.dim == 0 and c.tensor.endswith("weight")]
        if include_re and not any(p.search(t) for t in producers for p in include_re):
            continue
        if any(p.search(t) for t in group.tensors for p in exclude_re):
            continue
        if group.channels < 2:
            continue
        problem = _removal_check(network, example, group, prefix, rtol)
        if problem == "output":
            search.output_groups.append(group.name)
        elif problem is not None:
            search.left_out[group.name] = problem
        else:
            search.groups.append(group)
    if search.left_out:
        notes = "; ".join(f"{name}: {why}" for name, why in search.left_out.items())
        warnings.warn(
            f"Channel pruning leaves out {len(search.left_out)} group(s), not removable exactly: {notes}.", stacklevel=2
        )
    return search


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------
def _floor(channels: int, min_channels: float) -> int:
    if isinstance(min_channels, float) and min_channels < 1:
        return max(1, math.ceil(min_channels * channels))
    return max(1, min(int(min_channels), channels))


def _lowest_k(scores: Tensor, k: int) -> Tensor:
    """Boolean vector marking exactly the ``k`` lowest scores; ties go to the lowest index."""
    order = torch.sort(scores, stable=True).indices
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned[order[: max(0, min(k, scores.numel()))]] = True
    return pruned


def _step(round_to: int, group: ChannelGroup) -> int:
    """Kept channels of ``group`` are a multiple of this: ``round_to``, and whole heads for attention (their least
    common multiple when it fits in the group, else whole heads)."""
    if group.unit == 1:
        return round_to
    both = math.lcm(round_to, group.unit)
    return both if both < group.channels else group.unit


def _rounded(kept: int, live: int, channels: int, floor: int, step: int, error: float) -> int:
    """The multiple of ``step`` (or ``channels``) nearest to ``kept - error``, within [floor, live]."""
    candidates = {c for c in range(step, channels + 1, step)} | {channels}
    candidates = {c for c in candidates if floor <= c <= live} or {live}
    return min(sorted(candidates), key=lambda c: abs(c - (kept - error)))


def compute_group_masks(
    groups: Sequence[ChannelGroup],
    tensors: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    criterion: str = "magnitude",
    current: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    round_to: int = 1,
    min_channels_per_group: float = 1,
) -> dict[str, Tensor]:
    """Channel keep-vectors (``torch.bool``, one per group) for target ``sparsity``.

    Args:
        groups: The groups (``find_channel_groups``).
        tensors: Every coupled tensor, by name.
        sparsity: Target fraction of the ``C`` channels pruned.
        scope: ``"global"`` (one ranking over all groups) or ``"local"`` (each group to the target).
        criterion: ``"magnitude"`` (normalized RMS, see the module docstring) or ``"random"`` (seeded).
        current: Keep-vectors in force; their pruned channels stay pruned.
        seed: Seed of the ``"random"`` criterion.
        round_to: Kept channels of every group rounded to a multiple of this (1: exact counts).
        min_channels_per_group: Channels every group keeps: a count (>= 1) or a fraction in (0, 1).

    Returns:
        ``{group name: keep vector}``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> search = find_channel_groups(net, ((torch.randn(1, 4),), {}))
        >>> keep = compute_group_masks(search.groups, dict(net.named_parameters()), 0.5)
        >>> int(keep["0"].sum())
        4
    """
    current = current or {}
    generator = torch.Generator().manual_seed(seed) if criterion == "random" else None
    scores, floors, lives = {}, {}, {}
    for group in groups:
        keep = current.get(group.name)
        if criterion == "random":
            score = torch.rand(group.channels, generator=generator)
            if keep is not None:
                score[~keep.cpu()] = _PRUNED_SCORE
        else:
            score = group.scores(tensors, keep)
        floors[group.name] = group.unit * math.ceil(_floor(group.channels, min_channels_per_group) / group.unit)
        lives[group.name] = group.channels if keep is None else int(keep.sum())
        protected = torch.sort(score, descending=True, stable=True).indices[: floors[group.name]]
        score = score.clone()
        score[protected] = float("inf")
        scores[group.name] = score
    if not scores:
        return {}
    if scope == "global":
        flat = torch.cat(list(scores.values()))
        k = min(round(sparsity * flat.numel()), int(torch.isfinite(flat).sum()))
        pruned = dict(zip(scores, torch.split(_lowest_k(flat, k), [s.numel() for s in scores.values()]), strict=True))
    else:
        pruned = {
            name: _lowest_k(s, min(round(sparsity * s.numel()), int(torch.isfinite(s).sum())))
            for name, s in scores.items()
        }
    result: dict[str, Tensor] = {}
    error = 0.0
    # Rounded groups first: the single-channel groups after them absorb the carried error (exact counts with heads).
    for group in sorted(groups, key=lambda g: _step(round_to, g) == 1):
        name = group.name
        keep = ~pruned[name]
        step = _step(round_to, group)
        if step > 1 or round(error):
            kept = int(keep.sum())
            target = _rounded(kept, lives[name], group.channels, floors[name], step, error)
            error += target - kept
            keep = torch.zeros(group.channels, dtype=torch.bool)
            keep[torch.sort(scores[name], descending=True, stable=True).indices[:target]] = True
        if name in current:
            keep &= current[name].cpu()
        result[name] = keep
    return {group.name: result[group.name] for group in groups}


def tensor_masks(
    groups: Sequence[ChannelGroup], keep: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]]
) -> dict[str, Tensor]:
    """Keep-masks shaped like the coupled tensors, from the groups' keep-vectors (a tensor in several groups, e.g.
    a conv's output rows in one and its input columns in another, gets the intersection)."""
    masks: dict[str, Tensor] = {}
    for group in groups:
        if group.name not in keep:
            continue
        for name, mask in group.masks(keep[group.name], shapes).items():
            masks[name] = masks[name] & mask if name in masks else mask
    return masks


def n_m_masks(weights: Mapping[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    """Keep the ``n`` largest magnitudes of every ``m`` consecutive weights along the input dimension.

    Linear ``[out, in]``: runs along ``in``; Conv ``[out, in, *kernel]``: along ``in`` at every kernel position. The
    input dimension must be a multiple of ``m``. Ties go to the lower position.

    Examples:
        >>> n_m_masks({"w": torch.tensor([[1.0, -3.0, 2.0, 0.5]])}, 2, 4)["w"]
        tensor([[False,  True,  True, False]])
    """
    masks = {}
    for name, weight in weights.items():
        w = weight.detach().abs().float()
        moved = w.movedim(1, -1)  # [out, *kernel, in]
        runs = moved.reshape(-1, m)
        order = torch.sort(runs, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(1, order[:, :n], True)
        masks[name] = keep.reshape(moved.shape).movedim(-1, 1).contiguous()
    return masks


def n_m_eligible(weights: Mapping[str, Tensor], m: int) -> tuple[list[str], list[str]]:
    """``(eligible, excluded)`` names: a weight is eligible when its input dimension is a multiple of ``m``."""
    eligible = [n for n, w in weights.items() if w.dim() >= 2 and w.shape[1] % m == 0]
    return eligible, [n for n in weights if n not in eligible]


# ----------------------------------------------------------------------------------------------------------------
# Removal, saving, loading
# ----------------------------------------------------------------------------------------------------------------
def _remove(network: nn.Module, example: Call, cuts: Sequence[tuple[ChannelGroup, list[int]]]) -> None:
    """Remove channels in place: for every ``(group, channel indices)``, the whole group (and, for attention, lower
    the module's head count)."""
    dg = _dependency_graph(network, example)
    modules = dict(network.named_modules())
    for group, idxs in cuts:
        if not idxs:
            continue
        module = modules[group.root]
        dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs).prune()
        if group.heads is not None:
            owner = modules[group.heads]
            count = _head_count_attribute(owner)
            assert count is not None
            setattr(owner, count, getattr(owner, count) - len(idxs) // group.unit)
            for width in _HEAD_WIDTH_ATTRIBUTES:
                if isinstance(getattr(owner, width, None), int):
                    setattr(owner, width, getattr(owner, width) - len(idxs))


def remove_channels(
    network: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, Tensor], example: Call
) -> nn.Module:
    """A deep copy of ``network`` with the pruned channels of every group physically removed.

    With group-complete masks in force, its outputs equal the masked network's (eval mode). ``network`` is not
    changed; the copy has the original's train/eval flags.
    """
    compact = copy.deepcopy(network)
    cuts = [(g, (~keep[g.name].cpu()).nonzero().flatten().tolist()) for g in groups if g.name in keep]
    with tracing(compact):
        _remove(compact, example, cuts)
    return compact


@dataclass(frozen=True)
class ChannelRemoval:
    """The channel removal of one pruning run, to apply to copies of the same network (``compact=`` of the int8
    conversions: QAT/PTQ then convert the compact network, pruned channels removed, then int8).

    Attributes:
        groups: The pruned groups (names relative to the network it is applied to).
        keep: ``{group name: bool vector of kept channels}``.
        example: One call of the network (any device: moved to the network's).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 2))
        >>> example = ((torch.randn(1, 1, 4, 4),), {})
        >>> group = find_channel_groups(net, example).groups[0]
        >>> keep = {group.name: torch.arange(8) < 4}
        >>> ChannelRemoval([group], keep, example)(net)[0].out_channels
        4
    """

    groups: Sequence[ChannelGroup]
    keep: Mapping[str, Tensor]
    example: Call

    def __call__(self, network: nn.Module) -> nn.Module:
        """A copy of ``network`` (masked with these masks) with the pruned channels removed."""
        device = next(iter(network.parameters()), torch.empty(0)).device
        example = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, self.example)
        return remove_channels(network, self.groups, self.keep, example)


def _float(model: nn.Module) -> nn.Module:
    """``model`` (a copy) with fake quantization stripped: the saved forms are float networks."""
    from lightning_compress.engine.fake_quant import is_prepared, strip_qat

    return strip_qat(model) if is_prepared(model) else model


def save_compact(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Save a compact model's state dict with the layer shapes that rebuild it (atomically; loadable with
    ``weights_only=True``). Returns the file size in bytes. Reload with ``load_compact`` and a freshly built
    instance of the original architecture. Fake quantization (QAT in the same fit) is stripped: a float network."""
    model = _float(copy.deepcopy(model))
    shapes = {
        name: {a: int(getattr(m, a)) for a in _SHAPE_ATTRIBUTES if isinstance(getattr(m, a, None), int)}
        for name, m in model.named_modules()
    }
    payload = {
        "format": _COMPACT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "shapes": {k: v for k, v in shapes.items() if v},
    }
    path = Path(path)
    with atomic_path(path, "compact_path") as tmp:
        torch.save(payload, tmp)
    return path.stat().st_size


def export_compact(model: nn.Module, example: Call, path: str | os.PathLike[str]) -> int:
    """Export a compact model with ``torch.export`` (batch dimension dynamic when possible) and save it as a
    ``.pt2`` archive compressed with deflate, atomically (fake quantization stripped). Returns the file size in
    bytes."""
    model = _float(copy.deepcopy(model)).eval()
    args, kwargs = example
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] >= 2:
            return {0: torch.export.Dim.AUTO}
        return None

    dynamic = {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.arguments.items()}
    try:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
    except Exception as err:
        warnings.warn(
            f"The compact model was exported with static shapes (a dynamic batch failed: {type(err).__name__}).",
            stacklevel=2,
        )
        program = torch.export.export(model, args, kwargs)
    path = Path(path)
    with tempfile.TemporaryDirectory() as folder, atomic_path(path, "compact_path") as tmp:
        raw = Path(folder) / "raw.pt2"
        torch.export.save(program, raw)
        with zipfile.ZipFile(raw) as src, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    return path.stat().st_size


def load_compact(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a compact (channel-pruned) model saved at fit end by ``IterativePruningCallback``.

    **Example**

    ```python
    compact = load_compact("lightning_logs/version_0/compact_model.pt2")  # the exported program
    compact = load_compact("lightning_logs/version_0/compact_model.pt", model=LeNet5())  # eager, rebuilt
    ```

    Args:
        path: A ``.pt2`` file (``export_compact``: returns the exported program as a module called with the
            network's positional arguments) or a state-dict file (``save_compact``).
        model: For a state-dict file: a freshly built instance of the original (unpruned) architecture. Its layers
            are shrunk to the saved shapes and the weights loaded (strictly); it is returned.

    Raises:
        ValueError: For a state-dict file without ``model``, or a file of another format.
    """
    path = Path(path)
    if path.suffix == ".pt2":
        return torch.export.load(path).module()
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _COMPACT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a compact model saved by lightning_compress (format {_COMPACT_FORMAT})."
        )
    if model is None:
        raise ValueError(
            "`model` is needed to rebuild a compact model from its state dict: pass a freshly built instance of the"
            f" original network (e.g. load_compact({str(path)!r}, model=MyNet())), or load the `.pt2` file instead."
        )
    state: dict[str, Tensor] = payload["state_dict"]
    modules = dict(model.named_modules())
    for name, attributes in payload["shapes"].items():
        for attribute, value in attributes.items():
            setattr(modules[name], attribute, value)
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        current = getattr(module, leaf, None)
        if isinstance(current, Tensor) and current.shape != value.shape:
            new = torch.empty_like(value, dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(module, leaf, nn.Parameter(new, requires_grad=current.requires_grad))
            else:
                module._buffers[leaf] = new
    model.load_state_dict(state, strict=True)
    return model


def count_params_and_macs(model: nn.Module, example: Call) -> tuple[int, int]:
    """``(parameters, multiply-accumulates)`` of one call (Torch-Pruning's op counter)."""
    import torch_pruning as tp

    args, kwargs = example
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), contextlib.redirect_stdout(open(os.devnull, "w")):
        macs, _ = tp.utils.count_ops_and_params(_Bound(model, kwargs), args)
    return params, int(macs)


class _Bound(nn.Module):
    """``model`` called with fixed keyword arguments (the op counter passes positional ones only)."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *args: Any) -> Any:
        return self.model(*args, **self.kwargs)
