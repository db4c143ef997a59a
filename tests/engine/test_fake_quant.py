"""Fake quantization by module swap (lightning_compress.engine.fake_quant); no Lightning involved.

The small models defined here are reused by test_convert.py and test_measure.py.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.engine.config import QuantConfig
from lightning_compress.engine.fake_quant import (
    ActivationObserver,
    FakeQuantConv2d,
    FakeQuantLinear,
    FakeQuantModule,
    activation_qparams,
    activation_ranges,
    fake_quant_modules,
    fake_quantize_input,
    fake_quantize_weight,
    freeze_batchnorm_stats,
    freeze_observers,
    is_prepared,
    prepare_qat,
    quant_config_dict,
    quant_state_keys,
    set_fake_quant_enabled,
    strip_qat,
    sync_observers,
    weight_qparams,
    weight_scales,
)

# --------------------------------------------------------------------------------------------------------------------
# Models (module level: reused by the other engine tests)
# --------------------------------------------------------------------------------------------------------------------


def mlp(features: int = 16, hidden: int = 32, classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block = ResidualBlock(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, d_model: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.layer = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


class TwoInputNet(nn.Module):
    """forward takes two tensors, a keyword-only float and an optional keyword tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor, y: Tensor, *, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
        h = F.relu(self.a(x) + self.b(y)) * scale
        if mask is not None:
            h = h * mask
        return self.out(h)


def train_steps(model: nn.Module, *inputs: Tensor, steps: int = 3) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*inputs)


# --------------------------------------------------------------------------------------------------------------------
# QuantConfig validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 3}, r"`weight_bits` must be one of 4, 8, got 3\."),
        ({"weight_bits": True}, r"`weight_bits` must be one of 4, 8, got True\."),
        ({"activation_observer": "ema"}, r"`activation_observer` must be one of 'minmax', 'moving_average', "),
        ({"averaging_constant": 0.0}, r"`averaging_constant` must be in \(0, 1\], got 0\.0\."),
        ({"averaging_constant": 1.5}, r"`averaging_constant` must be in \(0, 1\], got 1\.5\."),
        ({"quantize_activations": "yes"}, r"`quantize_activations` must be True or False, got 'yes'\."),
        ({"percentile": 40}, r"`percentile` must be in \(50, 100\], got 40\."),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_config_defaults_and_ranges() -> None:
    cfg = QuantConfig()
    assert (cfg.weight_bits, cfg.activation_observer, cfg.quantize_activations) == (8, "moving_average", True)
    assert cfg.weight_range == (-128, 127)
    assert QuantConfig(weight_bits=4).weight_range == (-8, 7)


def test_config_is_frozen_and_plain() -> None:
    cfg = QuantConfig(averaging_constant=1, percentile=99)
    assert isinstance(cfg.averaging_constant, float) and isinstance(cfg.percentile, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_bits = 4  # type: ignore[misc]
    assert cfg.to_dict() == {
        "weight_bits": 8,
        "activation_observer": "moving_average",
        "averaging_constant": 1.0,
        "quantize_activations": True,
        "percentile": 99.0,
    }
    assert QuantConfig(**cfg.to_dict()) == cfg


def test_prepare_rejects_bad_config_and_selection() -> None:
    with pytest.raises(ValueError, match="`config` must be a QuantConfig"):
        prepare_qat(mlp(), config={"weight_bits": 8})  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"`include` pattern 'nope' matches no module name\. Available module names: 0, 2, 4"
    ):
        prepare_qat(mlp(), include="nope")
    with pytest.raises(ValueError, match="leaves no module to compress"):
        prepare_qat(mlp(), exclude=".*")


# --------------------------------------------------------------------------------------------------------------------
# Module swap: identity, keys, strip, idempotence, deepcopy
# --------------------------------------------------------------------------------------------------------------------


def test_parameters_are_the_same_objects_and_optimizer_still_works() -> None:
    torch.manual_seed(0)
    model = mlp()
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared = prepare_qat(model)
    assert list(prepared) == ["0", "2", "4"]
    assert all(isinstance(m, FakeQuantLinear) for m in prepared.values())
    assert isinstance(model[0], nn.Linear)  # still a Linear for code that selects Linear layers (e.g. pruning)
    after = dict(model.named_parameters())
    assert list(after) == list(params)
    assert all(after[name] is p for name, p in params.items())
    before = model[0].weight.detach().clone()
    model.train()
    F.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 4, (32,))).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0  # straight-through gradient
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_state_dict_keys_only_add_observer_buffers() -> None:
    model = mlp()
    float_keys = set(model.state_dict())
    prepare_qat(model)
    keys = set(model.state_dict())
    assert float_keys <= keys
    added = sorted(keys - float_keys)
    assert added[:6] == [
        "0.activation_observer.frozen",
        "0.activation_observer.initialized",
        "0.activation_observer.max_val",
        "0.activation_observer.min_val",
        "0.fake_quant_enabled",
        "2.activation_observer.frozen",
    ]
    assert all(k.endswith("fake_quant_enabled") or ".activation_observer." in k for k in added)
    assert sorted(quant_state_keys(model.state_dict())) == added
    assert quant_state_keys(mlp().state_dict()) == []
    weight_only = mlp()
    prepare_qat(weight_only, QuantConfig(quantize_activations=False))
    assert sorted(set(weight_only.state_dict()) - float_keys) == [
        "0.fake_quant_enabled",
        "2.fake_quant_enabled",
        "4.fake_quant_enabled",
    ]


def test_strip_gives_plain_model_that_loads_strictly() -> None:
    torch.manual_seed(0)
    model = LeNet5()
    params = dict(model.named_parameters())
    prepare_qat(model)
    train_steps(model, torch.randn(4, 1, 28, 28))
    assert strip_qat(model) is model
    assert not is_prepared(model)
    assert type(model.conv1) is nn.Conv2d and type(model.fc1) is nn.Linear
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items())
    fresh = LeNet5()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))


def test_checkpoint_of_prepared_model_loads_strictly_into_fresh_prepared_model() -> None:
    torch.manual_seed(0)
    model = mlp()
    prepare_qat(model, QuantConfig(activation_observer="histogram"))
    train_steps(model, torch.randn(64, 16))
    freeze_observers(model)
    set_fake_quant_enabled(model, False)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = mlp()
    prepare_qat(fresh, QuantConfig(activation_observer="histogram"))
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert activation_ranges(fresh) == activation_ranges(model)
    layer = fake_quant_modules(fresh)["0"]
    assert layer.observer is not None and layer.observer.is_frozen and layer.observer.is_initialized
    assert not layer.is_fake_quant_enabled  # the Python mirrors follow the loaded buffers


def test_prepare_is_idempotent_and_keeps_observer_state() -> None:
    model = mlp()
    first = prepare_qat(model)
    train_steps(model, torch.randn(8, 16))
    ranges = activation_ranges(model)
    second = prepare_qat(model, QuantConfig(weight_bits=4))
    assert all(second[n] is first[n] for n in first)
    assert not any(isinstance(m, FakeQuantModule) for m in model[0].children())
    assert activation_ranges(model) == ranges
    assert model[0].quant_config.weight_bits == 8  # existing fake-quant modules are kept as they are


def test_deepcopy_of_prepared_model() -> None:
    torch.manual_seed(0)
    model = ResidualCNN()
    prepare_qat(model)
    freeze_batchnorm_stats(model)
    x = torch.randn(4, 3, 8, 8)
    train_steps(model, x)
    clone = copy.deepcopy(model)
    model.eval()
    clone.eval()
    assert torch.equal(clone(x), model(x))
    assert clone.stem.weight is not model.stem.weight
    assert activation_ranges(clone) == activation_ranges(model)


def test_module_shared_under_two_names_is_swapped_everywhere() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    prepare_qat(model)
    assert model[0] is model[2] and isinstance(model[0], FakeQuantLinear)
    strip_qat(model)
    assert model[0] is model[2] and type(model[0]) is nn.Linear


def test_include_exclude() -> None:
    model = LeNet5()
    prepared = prepare_qat(model, include=[r"^conv", r"^fc1$"], exclude=["conv2"])
    assert list(prepared) == ["conv1", "fc1"]
    assert isinstance(model.conv1, FakeQuantConv2d) and type(model.conv2) is nn.Conv2d
    assert type(model.fc3) is nn.Linear


# --------------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------------


def _sqnr(ref: Tensor, test: Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - test).pow(2).sum().item())


def test_fake_quant_output_close_to_float_int8_and_4bit() -> None:
    torch.manual_seed(0)
    model = mlp(64, 128, 10)
    x = torch.randn(256, 64)
    reference = model(x).detach()
    q8 = copy.deepcopy(model)
    prepare_qat(q8)
    train_steps(q8, x, steps=1)
    q8.eval()
    sqnr8 = _sqnr(reference, q8(x).detach())
    q4 = copy.deepcopy(model)
    prepare_qat(q4, QuantConfig(weight_bits=4))
    train_steps(q4, x, steps=1)
    q4.eval()
    sqnr4 = _sqnr(reference, q4(x).detach())
    assert sqnr8 > 30.0
    assert 5.0 < sqnr4 < sqnr8


def test_weight_grid_matches_torchao_x86_quantizer() -> None:
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver

    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    observer = PerChannelMinMaxObserver(
        dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127, ch_axis=0, eps=2**-12
    )
    observer(weight)
    ref_scale, ref_zp = observer.calculate_qparams()
    scale, zero_point = weight_qparams(weight)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert torch.equal(zero_point, ref_zp.to(torch.int32))
    q = fake_quantize_weight(weight) / scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert q.round().min() == -128 and q.round().max() <= 127
    q4 = fake_quantize_weight(weight, 4) / weight_qparams(weight, 4)[0].reshape(-1, 1, 1, 1)
    assert torch.allclose(q4, q4.round(), atol=1e-4)
    assert q4.round().min() >= -8 and q4.round().max() <= 7

    act = ActivationObserver("minmax")
    x = torch.randn(1000) * 3 + 1
    act(x)
    ref_act = MinMaxObserver(dtype=torch.uint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255, eps=2**-12)
    ref_act(x)
    ref_scale, ref_zp = ref_act.calculate_qparams()
    scale, zero_point = act.qparams()
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert int(zero_point) == int(ref_zp)


def test_weight_gradient_is_straight_through_for_every_element() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 5, requires_grad=True)
    upstream = torch.randn(8, 5)
    (fake_quantize_weight(weight) * upstream).sum().backward()
    assert weight.grad is not None and torch.equal(weight.grad, upstream)  # incl. each channel's max element


def _hard_inputs(scale: float, n: int = 4000) -> Tensor:
    """Random values plus exact ties (k + 0.5) * scale, grid points, signed zeros and far out-of-range values."""
    g = torch.Generator().manual_seed(0)
    k = torch.randint(-400, 400, (n // 4,), generator=g).float()
    edges = torch.tensor([0.0, -0.0, 1e6, -1e6])
    return torch.cat([torch.randn(n, generator=g) * 200 * scale, (k + 0.5) * scale, k * scale, edges])


@pytest.mark.parametrize(("scale", "zero_point"), [(0.02, 0), (0.0123, 37), (2.0**-12, 255), (0.7, 128)])
def test_input_fake_quant_equals_the_aten_op_bitwise_with_its_gradient(scale: float, zero_point: int) -> None:
    """The CPU fast path (vectorized ops) computes what torch.fake_quantize_per_tensor_affine computes."""
    x = _hard_inputs(scale)
    s, z = torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = fake_quantize_input(ours_x, s, z), torch.fake_quantize_per_tensor_affine(ref_x, s, z, 0, 255)
    assert torch.equal(ours, ref)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert ours_x.grad is not None and ref_x.grad is not None
    assert torch.equal(ours_x.grad, ref_x.grad)  # zero exactly where the value was clamped
    assert torch.equal(fake_quantize_input(x, s, z.float()), ref)  # a float zero point (the observers' hot path)
    assert not fake_quantize_input(x, s, z).requires_grad  # no mask kept when no gradient is needed


def test_input_fake_quant_keeps_the_aten_op_for_other_dtypes() -> None:
    x = _hard_inputs(0.05, 400).to(torch.bfloat16)
    s, z = torch.tensor([0.05]), torch.tensor([3], dtype=torch.int32)
    out = fake_quantize_input(x, s, z)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 32), (12,)])
def test_weight_fake_quant_equals_the_aten_per_channel_op(bits: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.3
    weight[weight.abs() < 0.05] = 0.0
    scale, zero_point = weight_qparams(weight, bits)
    qmin, qmax = (-128, 127) if bits == 8 else (-8, 7)
    ref = torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, qmin, qmax)
    assert torch.equal(fake_quantize_weight(weight, bits), ref)
    wide = weight.double()  # another dtype goes through the ATen op itself
    ref_wide = torch.fake_quantize_per_channel_affine(wide, scale, zero_point, 0, qmin, qmax)
    assert torch.equal(fake_quantize_weight(wide, bits), ref_wide)


def test_pruned_zeros_stay_exactly_zero() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.9] = 0.0
    model = nn.Sequential(layer)
    prepare_qat(model)
    fq = model[0].quantized_weight()
    zeros = layer.weight == 0
    assert bool((fq[zeros] == 0).all())  # (small non-zero weights may round to zero too)


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "histogram"])
def test_observers_move_in_train_only_and_not_when_frozen(kind: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    prepare_qat(model, QuantConfig(activation_observer=kind))
    model.eval()
    model(torch.randn(8, 16))
    assert activation_ranges(model) == {}  # eval: nothing observed
    train_steps(model, torch.randn(8, 16), steps=1)
    first = activation_ranges(model)
    assert set(first) == {"0", "2", "4"}
    model.eval()
    model(torch.randn(8, 16) * 10)
    assert activation_ranges(model) == first
    freeze_observers(model)
    train_steps(model, torch.randn(8, 16) * 10, steps=1)
    assert activation_ranges(model) == first
    freeze_observers(model, frozen=False)
    train_steps(model, torch.randn(8, 16) * 10, steps=1)
    assert activation_ranges(model)["0"][1] > first["0"][1]


def test_moving_average_and_histogram_behaviour() -> None:
    obs = ActivationObserver("moving_average", averaging_constant=0.5)
    obs(torch.tensor([0.0, 2.0]))
    obs(torch.tensor([0.0, 4.0]))
    assert float(obs.max_val) == 3.0 and float(obs.min_val) == 0.0
    hist = ActivationObserver("histogram", percentile=99.0)
    torch.manual_seed(0)
    hist(torch.cat([torch.rand(10_000), torch.tensor([100.0])]))  # one outlier
    assert float(hist.max_val) < 2.0 and float(hist.min_val) < 0.05
    assert float(hist.hist_max) == 100.0


def test_uninitialized_observer_leaves_input_in_float() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    reference = copy.deepcopy(model)
    prepare_qat(model, QuantConfig())
    model.eval()  # e.g. Lightning's sanity-check validation before the first training step
    x = torch.randn(4, 16)
    expected = F.linear(x, fake_quantize_weight(reference[0].weight), reference[0].bias)
    assert torch.equal(model(x), expected)


def test_disabled_fake_quant_is_exactly_float_and_observers_wait() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    reference = copy.deepcopy(model)
    prepare_qat(model)
    set_fake_quant_enabled(model, False)
    x = torch.randn(4, 6, 8)
    model.train()
    reference.train()
    assert torch.equal(model(x), reference(x))
    assert activation_ranges(model) == {}
    set_fake_quant_enabled(model, True)
    model(x)
    assert not torch.equal(model(x), reference(x))


def test_activation_ranges_and_weight_scales() -> None:
    model = LeNet5()
    prepare_qat(model)
    train_steps(model, torch.randn(4, 1, 28, 28), steps=1)
    ranges = activation_ranges(model)
    assert list(ranges) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert all(lo <= hi for lo, hi in ranges.values()) and ranges["fc1"][0] == 0.0  # after ReLU
    scales = weight_scales(model)
    assert scales["conv1"].shape == (6,) and scales["fc1"].shape == (120,)
    assert all(bool((s > 0).all()) for s in scales.values())
    configs = quant_config_dict(model)
    assert configs["fc3"] == {
        "weight_bits": 8,
        "activation_observer": "moving_average",
        "averaging_constant": 0.01,
        "quantize_activations": True,
        "percentile": 99.99,
    }


# --------------------------------------------------------------------------------------------------------------------
# Model families
# --------------------------------------------------------------------------------------------------------------------


def test_multi_input_and_keyword_arguments() -> None:
    torch.manual_seed(0)
    model = TwoInputNet()
    prepared = prepare_qat(model)
    assert list(prepared) == ["a", "b", "out"]
    x, y, mask = torch.randn(8, 8), torch.randn(8, 4), torch.ones(8, 16)
    model.train()
    out = model(x, y, scale=2.0, mask=mask)
    assert out.shape == (8, 3)
    assert set(activation_ranges(model)) == {"a", "b", "out"}
    model.eval()
    assert torch.equal(model(x, y=y, scale=2.0, mask=mask), model(x, y, scale=2.0, mask=mask))


def test_residual_cnn_with_batchnorm_and_frozen_bn_stats() -> None:
    torch.manual_seed(0)
    model = ResidualCNN()
    prepared = prepare_qat(model)
    assert list(prepared) == ["stem", "block.conv1", "block.conv2", "head"]
    x = torch.randn(8, 3, 8, 8)
    train_steps(model, x, steps=2)
    names = freeze_batchnorm_stats(model)
    assert names == ["bn", "block.bn1", "block.bn2"]
    stats = model.bn.running_mean.clone()
    tracked = int(model.bn.num_batches_tracked)
    model.train()  # must not unfreeze them
    out = model(x * 3 + 1)
    out.sum().backward()
    assert torch.equal(model.bn.running_mean, stats) and int(model.bn.num_batches_tracked) == tracked
    assert model.bn.weight.grad is not None  # BN affine parameters still train
    assert len(freeze_batchnorm_stats(model)) == 3 and len(model.bn._forward_pre_hooks) == 1  # idempotent
    freeze_batchnorm_stats(model, frozen=False)
    model.train()
    model(x * 3 + 1)
    assert not torch.equal(model.bn.running_mean, stats)


def test_transformer_encoder_layer() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    prepared = prepare_qat(model)
    # MultiheadAttention internals (out_proj is a NonDynamicallyQuantizableLinear) stay float.
    assert list(prepared) == ["embed", "layer.linear1", "layer.linear2", "head"]
    assert type(model.layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(4, 6, 8)
    train_steps(model, x, steps=2)
    freeze_observers(model)
    model.train()
    with torch.no_grad():
        train_out = model(x)  # dropout=0: the same computation as eval
    model.eval()
    with torch.no_grad():
        eval_out = model(x)  # the fused fast path would read the float weights and skip the fake quantization
    torch.testing.assert_close(eval_out, train_out)
    strip_qat(model)
    assert len(model.layer._forward_pre_hooks) == 0  # fast path allowed again


def test_transformer_encoder_nested_tensor_path_disabled() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=1)
    assert encoder.use_nested_tensor
    prepare_qat(encoder)
    assert not encoder.use_nested_tensor
    encoder.eval()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    with torch.no_grad():
        assert encoder(torch.randn(2, 5, 16), src_key_padding_mask=mask).shape == (2, 5, 16)
    strip_qat(encoder)
    assert encoder.use_nested_tensor


def test_sync_observers_is_a_noop_without_distributed() -> None:
    model = mlp()
    prepare_qat(model)
    train_steps(model, torch.randn(8, 16), steps=1)
    ranges = activation_ranges(model)
    sync_observers(model)
    assert activation_ranges(model) == ranges


def _sync_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = mlp()
    model_hist = mlp()
    prepare_qat(model, QuantConfig(activation_observer="minmax"))
    prepare_qat(model_hist, QuantConfig(activation_observer="histogram"))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * (rank + 1)  # rank 1 sees a wider range
    train_steps(model, x, steps=1)
    train_steps(model_hist, x, steps=1)
    sync_observers(model)
    sync_observers(model_hist)
    results[rank] = (activation_ranges(model), activation_ranges(model_hist), model_hist[0].observer.histogram.sum())
    dist.destroy_process_group()


@pytest.mark.ddp
def test_sync_observers_across_two_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    ranges0, hist0, mass0 = results[0]
    ranges1, hist1, _ = results[1]
    assert ranges0 == ranges1 and hist0 == hist1
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    assert ranges0["0"] == pytest.approx((float(x.min() * 2), float(x.max() * 2)))  # MIN/MAX over ranks
    assert float(mass0) == pytest.approx(1.0)


def test_activation_qparams_are_the_ones_the_fake_quant_op_uses() -> None:
    """The range is widened to include 0 before it is split into 255 steps: (high - low) / 255 is not the scale."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    prepare_qat(model)
    model[0].observer.set_range(-1.0, 3.0)
    model[2].observer.set_range(0.5, 3.0)  # e.g. a ReLU output that never reached 0 in the observed batches
    qparams = activation_qparams(model)
    assert set(qparams) == {"0", "2"}
    assert qparams["2"][0] == pytest.approx(3.0 / 255) and qparams["2"][0] != pytest.approx(2.5 / 255)
    x = torch.rand(16, 8) * 4.0 - 0.5
    model.eval()
    for name, layer in (("0", model[0]), ("2", model[2])):
        scale, zero_point = qparams[name]
        inputs = x[:, : layer.in_features]
        expected = torch.fake_quantize_per_tensor_affine(inputs, scale, zero_point, 0, 255)
        assert torch.equal(layer.quantize_input(inputs), expected)
    fresh = nn.Sequential(nn.Linear(4, 2))
    prepare_qat(fresh)
    assert activation_qparams(fresh) == {}  # no data seen yet: no scale


class _SamePadConv(nn.Conv2d):
    """TensorFlow-style "same" padding (EfficientNet-Lite's ``Conv2dStaticSamePadding``): pads in its own forward,
    then calls ``F.conv2d`` directly with its weight."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, [0, 1, 0, 1], value=-1.0), self.weight, self.bias, self.stride)


class _KeywordConv(nn.Conv2d):
    """Calls the convolution with keyword arguments only."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(input=F.pad(x, [1, 1, 1, 1]), weight=self.weight, bias=self.bias)


def test_subclass_calling_its_op_with_keyword_arguments_is_simulated() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_KeywordConv(3, 4, 3))
    prepare_qat(net)
    x = torch.rand(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "made no F.linear/F.conv call" warning
        net.train()(x)
    scale, zero_point = net[0].observer.qparams()
    padded = F.pad(x, [1, 1, 1, 1])
    quantized_input = fake_quantize_input(padded, scale, zero_point)
    expected = F.conv2d(quantized_input, fake_quantize_weight(net[0].weight, 8), net[0].bias)
    assert torch.equal(net.eval()(x), expected)


class _DerivedWeightConv(nn.Conv2d):
    """Convolves with a tensor computed from ``weight`` (weight standardization): no call on ``weight`` itself."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight - self.weight.mean(), self.bias)


def test_subclass_with_its_own_forward_is_simulated_around_its_own_call() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_SamePadConv(3, 4, 3, stride=2))
    weight = net[0].weight
    prepared = prepare_qat(net)
    layer = net[0]
    assert list(prepared) == ["0"] and isinstance(layer, FakeQuantConv2d) and isinstance(layer, _SamePadConv)
    assert layer.weight is weight
    x = torch.rand(2, 3, 9, 9)
    net.train()
    net(x)
    # The observer saw the convolution's input: the padded tensor (its -1 border), not the module's input.
    assert activation_ranges(net)["0"] == (-1.0, pytest.approx(float(x.max())))
    scale, zero_point = layer.observer.qparams()
    padded = F.pad(x, [0, 1, 0, 1], value=-1.0)
    expected = F.conv2d(fake_quantize_input(padded, scale, zero_point), fake_quantize_weight(weight, 8), layer.bias, 2)
    net.eval()
    assert torch.equal(net(x), expected)
    # the per-layer sensitivity PTQ's fallback ranks by compares with the subclass's own float forward (padded)
    from lightning_compress.engine.measure import per_layer_sqnr, sqnr_db

    float_out = F.conv2d(padded, weight, layer.bias, 2)
    assert per_layer_sqnr(None, net, (x,)) == {"0": pytest.approx(sqnr_db(float_out, expected))}
    set_fake_quant_enabled(net, False)
    assert torch.equal(net(x), F.conv2d(padded, weight, layer.bias, 2))
    set_fake_quant_enabled(net, True)
    out = net(x)
    out.sum().backward()  # straight-through: the shared Parameter gets the gradient
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    strip_qat(net)
    assert type(net[0]) is _SamePadConv and net[0].weight is weight


def test_subclass_forward_without_a_call_on_its_weight_warns_once_and_runs_in_float() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_DerivedWeightConv(3, 4, 3))
    reference = copy.deepcopy(net)
    prepare_qat(net)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"_DerivedWeightConv\.forward made no F\.linear/F\.conv call"):
        out = net(x)
    assert torch.equal(out, reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x)  # once per module
    strip_qat(net)
    assert "_lc_warned_float" not in net[0].__dict__
