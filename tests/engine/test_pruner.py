"""GradualPruner on plain modules: the schedule, exact sparsity, masks that only grow, state round trip with
integrity checks, NaN detection, rewinding."""

import itertools

import pytest
import torch
from torch import nn

from lightning_compress.engine.config import PruningConfig
from lightning_compress.engine.pruner import GradualPruner


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _weights(net: nn.Sequential) -> dict[str, nn.Parameter]:
    return {"0.weight": net[0].weight, "2.weight": net[2].weight}


def _train_steps(net, pruner, steps, first=0):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt.register_step_post_hook(lambda *_: pruner.apply())
    for step in range(first, first + steps):
        loss = net(torch.randn(16, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        pruner.mask_gradients()
        opt.step()
        pruner.step(step + 1)
    return opt


def test_needs_a_resolved_config():
    with pytest.raises(ValueError, match=r"needs a resolved config"):
        GradualPruner({}, PruningConfig())


def test_reaches_exact_target_and_masks_only_grow():
    net = _net()
    pruner = GradualPruner(_weights(net), PruningConfig(target_sparsity=0.75, end_step=20).resolve(None))
    history = []
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(30):
        net(torch.randn(4, 8)).sum().backward()
        pruner.mask_gradients()
        opt.step()
        pruner.apply()
        if pruner.step(step + 1):
            history.append({n: m.clone() for n, m in pruner.masks.items()})
    total = sum(w.numel() for w in _weights(net).values())
    assert pruner.stats().total_zeros == round(0.75 * total)
    assert pruner.report().target_reached
    for earlier, later in itertools.pairwise(history):
        assert all(bool((~earlier[n] & later[n]).sum() == 0) for n in earlier)  # nothing pruned is revived


def test_report_says_when_the_target_was_not_reached():
    net = _net()
    pruner = GradualPruner(_weights(net), PruningConfig(target_sparsity=0.8, end_step=100).resolve(None))
    pruner.step(30)
    report = pruner.report()
    assert not report.target_reached and 0 < report.applied_target < 0.8
    assert report.to_metrics("final/")["final/target_reached"] == 0.0


def test_state_round_trip_continues_identically():
    config = PruningConfig(target_sparsity=0.6, start_step=2, end_step=12, update_every_n_steps=2).resolve(None)
    torch.manual_seed(1)
    net_a = _net()
    pruner_a = GradualPruner(_weights(net_a), config)
    torch.manual_seed(2)
    _train_steps(net_a, pruner_a, 5)
    state = pruner_a.state_dict()
    net_b = _net()
    net_b.load_state_dict(net_a.state_dict())
    pruner_b = GradualPruner(_weights(net_b), config)
    pruner_b.load_state_dict(state)
    assert pruner_b.last_step == 5 and pruner_b.current_target == pruner_a.current_target
    assert all(torch.equal(pruner_a.masks[n], pruner_b.masks[n]) for n in pruner_a.masks)
    for net, pruner in ((net_a, pruner_a), (net_b, pruner_b)):
        torch.manual_seed(3)
        net.zero_grad()
        _train_steps(net, pruner, 10, first=5)
    assert all(torch.equal(pruner_a.masks[n], pruner_b.masks[n]) for n in pruner_a.masks)


def _saved_state():
    net = _net()
    pruner = GradualPruner(_weights(net), PruningConfig(target_sparsity=0.5, end_step=1).resolve(None))
    pruner.step(1)
    return net, pruner.state_dict()


def test_load_rejects_truncated_masks():
    net, state = _saved_state()
    state["masks"]["0.weight"] = state["masks"]["0.weight"][:-3]
    with pytest.raises(ValueError, match=r"takes 32 bytes, got 29: the checkpoint's mask is truncated"):
        GradualPruner(_weights(net), PruningConfig(end_step=1).resolve(None)).load_state_dict(state)


def test_load_rejects_masks_whose_pruned_weights_are_not_zero():
    net, state = _saved_state()
    state["masks"]["0.weight"] = ~state["masks"]["0.weight"]  # an inverted mask
    with pytest.raises(ValueError, match=r"prunes \d+ weights that are not zero"):
        GradualPruner(_weights(net), PruningConfig(end_step=1).resolve(None)).load_state_dict(state)


def test_load_rejects_other_shapes_and_unknown_names():
    net, state = _saved_state()
    other = nn.Linear(8, 16)
    with pytest.raises(ValueError, match=r"has shape \[32, 8\], the parameter has \[16, 8\]"):
        GradualPruner(
            {"0.weight": other.weight, "2.weight": net[2].weight}, PruningConfig(end_step=1).resolve(None)
        ).load_state_dict(state)
    with pytest.raises(ValueError, match=r"masks for \['2.weight'\]"):
        GradualPruner({"0.weight": net[0].weight}, PruningConfig(end_step=1).resolve(None)).load_state_dict(state)


def test_nan_weight_is_reported_with_its_name_and_step():
    net = _net()
    pruner = GradualPruner(_weights(net), PruningConfig(target_sparsity=0.5, end_step=4).resolve(None))
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"1 entries of '2.weight' are NaN or Inf at step 4"):
        pruner.step(4)


def test_rewinding_resets_survivors_to_the_snapshot():
    net = _net()
    config = PruningConfig(target_sparsity=0.5, start_step=2, end_step=3, rewind_to_step=0).resolve(None)
    pruner = GradualPruner(_weights(net), config)
    pruner.step(0)
    snapshot = {n: w.detach().clone() for n, w in _weights(net).items()}
    with torch.no_grad():
        for w in _weights(net).values():
            w.add_(1.0)
    pruner.step(3)
    for name, weight in _weights(net).items():
        kept = pruner.masks[name]
        assert torch.equal(weight[kept], snapshot[name][kept]) and bool((weight[~kept] == 0).all())


class _OtherSGD(torch.optim.SGD):
    """Not in ZERO_PRESERVING (a subclass may change ``step``)."""


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.05),
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
        lambda p: _OtherSGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ],
)
def test_pruned_weights_are_exactly_zero_after_every_step(make):
    """Masks move every 2 steps while momentum / Adam moments are live; after each step every pruned weight is 0."""
    net = _net()
    pruner = GradualPruner(
        _weights(net), PruningConfig(target_sparsity=0.8, end_step=12, update_every_n_steps=2).resolve(None)
    )
    opt = make(net.parameters())
    opt.register_step_post_hook(lambda optimizer, *_: pruner.after_optimizer_step(optimizer))
    for step in range(16):
        opt.zero_grad()
        net(torch.randn(16, 8)).pow(2).mean().backward()
        pruner.mask_gradients()
        opt.step()
        for name, weight in _weights(net).items():
            if name in pruner.masks:
                assert int(torch.count_nonzero(weight.detach()[~pruner.masks[name]])) == 0, (step, name)
        pruner.step(step + 1)
    assert pruner.stats().sparsity == pytest.approx(0.8, abs=1e-3)


def test_the_weight_pass_is_skipped_only_when_it_would_change_nothing(monkeypatch):
    net = _net()
    pruner = GradualPruner(_weights(net), PruningConfig(target_sparsity=0.5, end_step=1).resolve(None))
    pruner.step(1)
    passes = []
    monkeypatch.setattr(pruner._applier, "apply", lambda: passes.append(1))
    sgd, other = torch.optim.SGD(net.parameters(), lr=0.1), _OtherSGD(net.parameters(), lr=0.1)
    pruner.mask_gradients()
    pruner.after_optimizer_step(sgd)  # first step after the masks changed: the state is masked, weights re-zeroed
    pruner.mask_gradients()
    pruner.after_optimizer_step(sgd)  # masked gradients, clean state: nothing to do
    pruner.after_optimizer_step(sgd)  # gradients not masked before this step
    pruner.mask_gradients()
    pruner.after_optimizer_step(other)  # an optimizer outside ZERO_PRESERVING
    assert len(passes) == 3


_REVIVING = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw_decay": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("make", _REVIVING.values(), ids=list(_REVIVING))
def test_without_masking_each_step_these_optimizers_revive_pruned_weights(make):
    """Why a pass per step is needed: with the weights zeroed once, an unmasked gradient moves them at the next step;
    with masked gradients but the state from before the masks (momentum, Adam moments), they move too; masking both
    (what ``after_optimizer_step`` does once per mask change, ``mask_gradients`` every step) keeps them at zero."""

    def pruned_after_steps(mask_gradients: bool, mask_state: bool) -> int:
        net = _net()
        pruner = GradualPruner(_weights(net), PruningConfig(target_sparsity=0.5, end_step=3).resolve(None))
        opt = make(net.parameters())
        for step in range(6):  # dense steps: the optimizer's state fills at every entry
            opt.zero_grad()
            net(torch.randn(16, 8)).pow(2).mean().backward()
            if step == 3:
                assert pruner.step(3)  # masks at 50%, weights zeroed once
                if mask_state:
                    pruner._applier.mask_state(opt)
            if step >= 3 and mask_gradients:
                pruner.mask_gradients()
            opt.step()
        return sum(int(torch.count_nonzero(w.detach()[~pruner.masks[n]])) for n, w in _weights(net).items())

    assert pruned_after_steps(mask_gradients=False, mask_state=True) > 0
    assert pruned_after_steps(mask_gradients=True, mask_state=False) > 0
    assert pruned_after_steps(mask_gradients=True, mask_state=True) == 0


def test_random_criterion_refuses_nan_and_inf_weights():
    net = _net()
    config = PruningConfig(target_sparsity=0.5, end_step=4, criterion="random").resolve(None)
    pruner = GradualPruner(_weights(net), config)
    with torch.no_grad():
        net[0].weight[1, 2] = float("inf")
        net[0].weight[3, 0] = -float("inf")  # the sum of the tensor is NaN
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"2 entries of '0.weight' are NaN or Inf at step 4"):
        pruner.step(4)
