"""int8 conversion through torchao pt2e (lightning_compress.engine.convert); no Lightning involved."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import time

import pytest
import torch
import torch.nn.functional as F
from test_fake_quant import LeNet5, ResidualCNN, TinyTransformer, TwoInputNet, mlp, train_steps
from torch import Tensor, nn

from lightning_compress.engine.config import (
    DEFAULT_OBSERVER,
    OBSERVERS,
    QUANT_MODES,
    ConversionConfig,
    QuantConfig,
)
from lightning_compress.engine.convert import (
    Int8ConversionError,
    Int8Model,
    QuantizedModule,
    compile_int8,
    convert_to_int8,
    int8_weights,
    load_int8,
    load_quantized,
    model_size_bytes,
    save_int8,
)
from lightning_compress.engine.fake_quant import (
    activation_ranges,
    fake_quant_modules,
    freeze_observers,
    is_prepared,
    prepare_qat,
)
from lightning_compress.engine.measure import sqnr_db, top1_agreement


def _separable_data(n: int = 512, features: int = 16, classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    return x, (x @ teacher).argmax(1)


def _qat_train(model: nn.Module, x: Tensor, y: Tensor, steps: int = 60) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for i in range(steps):
        batch = slice((i * 64) % len(x), (i * 64) % len(x) + 64)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def _outputs(model: nn.Module | Int8Model, *args: Tensor, **kwargs: object) -> Tensor:
    module = model.module() if isinstance(model, Int8Model) else model
    return module(*args, **kwargs)


@pytest.fixture(scope="module")
def trained_qat_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    x, y = _separable_data()
    model = mlp()
    prepare_qat(model)
    _qat_train(model, x, y)
    return model, x, y


# --------------------------------------------------------------------------------------------------------------------
# Static conversion: agreement with the fake-quant model, input untouched
# --------------------------------------------------------------------------------------------------------------------


def test_static_mlp_from_fake_quant_agrees_and_input_is_untouched(trained_qat_mlp) -> None:
    model, x, y = trained_qat_mlp
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    modules = {n: type(m) for n, m in model.named_modules()}
    ranges = activation_ranges(model)
    model.train()  # conversion must not depend on (or change) the mode

    start = time.perf_counter()
    result = convert_to_int8(model, (x[:64],))
    elapsed = time.perf_counter() - start

    assert elapsed < 30
    assert result.mode == "static" and result.dynamic_batch
    assert set(result.carried_ranges) == {"0", "2", "4"}
    assert result.carried_ranges["0"] == pytest.approx(ranges["0"])
    assert set(result.timings) >= {"export", "prepare", "calibrate", "convert", "reexport", "total"}
    assert result.notes == []  # every range came from the observers: no calibration warning
    # the input model is exactly as it was
    assert model.training and is_prepared(model)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    fq_logits, int8_logits = _outputs(model, x), _outputs(result, x)  # 512 rows: the batch is dynamic
    assert top1_agreement(fq_logits, int8_logits) >= 0.99
    assert sqnr_db(fq_logits, int8_logits) > 35
    assert top1_agreement(int8_logits, F.one_hot(y, 4).float()) > 0.8  # it learned something


def test_static_lenet_from_fake_quant_has_dynamic_batch() -> None:
    torch.manual_seed(0)
    model = LeNet5()
    prepare_qat(model)
    train_steps(model, torch.randn(16, 1, 28, 28), steps=2)
    model.eval()
    result = convert_to_int8(model, (torch.randn(8, 1, 28, 28),))
    assert result.dynamic_batch
    x = torch.randn(3, 1, 28, 28)
    assert sqnr_db(_outputs(model, x), _outputs(result, x)) > 35
    weights = int8_weights(result)
    assert sorted(w.shape for w in weights.values()) == sorted(
        m.weight.shape for m in fake_quant_modules(model).values()
    )


def test_static_float_model_with_calibration_data() -> None:
    torch.manual_seed(0)
    model = mlp(16, 64, 4).eval()
    calibration = [torch.randn(32, 16) for _ in range(4)]
    result = convert_to_int8(model, (calibration[0],), calibration_data=calibration)
    assert result.calibration_batches == 4 and result.carried_ranges == {}
    x = torch.randn(128, 16)
    assert sqnr_db(_outputs(model, x), _outputs(result, x)) > 25
    no_data = convert_to_int8(model, (calibration[0],))
    assert any("Calibrated on `example_inputs` only" in note for note in no_data.notes)


def test_residual_cnn_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = ResidualCNN()
    prepare_qat(model)
    x = torch.randn(16, 3, 8, 8)
    train_steps(model, x, steps=3)
    freeze_observers(model)
    model.eval()
    result = convert_to_int8(model, (x,), calibration_data=[x])
    # BN is folded into the conv weights before quantization, and pt2e also quantizes the residual add:
    # close to the fake-quant model, not identical.
    assert sqnr_db(_outputs(model, x), _outputs(result, x)) > 25
    assert len(int8_weights(result)) == 4


def test_transformer_keeps_attention_float_as_during_qat() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    prepare_qat(model)
    x = torch.randn(8, 6, 8)
    train_steps(model, x, steps=2)
    model.eval()
    result = convert_to_int8(model, (x,))
    assert "layer.self_attn" in result.skipped
    assert any("layer.self_attn" in note for note in result.notes)
    assert sqnr_db(_outputs(model, x), _outputs(result, x)) > 35
    assert len(int8_weights(result)) == 4  # embed, linear1, linear2, head


def test_multi_input_and_keyword_arguments() -> None:
    torch.manual_seed(0)
    model = TwoInputNet()
    prepare_qat(model)
    x, y, mask = torch.randn(16, 8), torch.randn(16, 4), torch.ones(16, 16)
    model.train()
    model(x, y, scale=2.0, mask=mask)
    model.eval()
    result = convert_to_int8(
        model, (x, y), {"scale": 2.0, "mask": mask}, calibration_data=[{"x": x, "y": y, "mask": mask, "scale": 2.0}]
    )
    assert result.dynamic_batch and result.calibration_batches == 1
    x2, y2, mask2 = torch.randn(5, 8), torch.randn(5, 4), torch.ones(5, 16)
    out = _outputs(result, x2, y2, scale=2.0, mask=mask2)
    assert out.shape == (5, 3)
    assert sqnr_db(_outputs(model, x2, y2, scale=2.0, mask=mask2), out) > 25


# --------------------------------------------------------------------------------------------------------------------
# Dynamic and weight-only modes
# --------------------------------------------------------------------------------------------------------------------


def test_dynamic_mode_on_linear_model() -> None:
    torch.manual_seed(0)
    model = mlp(64, 128, 10).eval()
    x = torch.randn(32, 64)
    result = convert_to_int8(model, (x,), mode="dynamic")
    assert result.mode == "dynamic" and result.calibration_batches == 0
    code = result.program.graph_module.code
    assert "choose_qparams" in code  # activation ranges computed at run time
    assert sqnr_db(_outputs(model, x), _outputs(result, x)) > 30
    assert len(int8_weights(result)) == 3


def test_weight_only_mode() -> None:
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.randn(8, 1, 28, 28)
    result = convert_to_int8(model, (x,), mode="weight_only")
    code = result.program.graph_module.code
    assert "quantize_per_tensor" not in code and "dequantize_per_channel" in code
    assert len(int8_weights(result)) == 5
    assert sqnr_db(_outputs(model, x), _outputs(result, x)) > 35


# --------------------------------------------------------------------------------------------------------------------
# Artifact: save/load, size, sparsity, skip
# --------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, trained_qat_mlp) -> None:
    model, x, _ = trained_qat_mlp
    result = convert_to_int8(model, (x[:32],))
    path = tmp_path / "sub" / "model_int8.pt2"
    size = save_int8(result, path)
    assert size == path.stat().st_size == model_size_bytes(path)
    loaded = load_int8(path)
    assert torch.equal(_outputs(loaded.module(), x), _outputs(result, x))


def test_quantized_module_is_called_like_the_float_network(tmp_path) -> None:
    """``forward(x, y, *, scale=1.0, mask=None)``: the int8 module takes any call the float network takes."""
    torch.manual_seed(0)
    model = TwoInputNet().eval()
    x, y, mask = torch.randn(8, 8), torch.randn(8, 4), torch.rand(8, 16)
    result = convert_to_int8(model, (x,), {"y": y, "mask": mask})  # y by keyword in the export example
    int8 = result.module()
    assert isinstance(int8, QuantizedModule) and isinstance(int8, nn.Module)
    with torch.no_grad():
        reference = int8(x, y, mask=mask)
        assert torch.equal(int8(x, y=y, mask=mask), reference)
        assert torch.equal(int8(mask=mask, y=y, x=x), reference)
        assert torch.equal(int8(x, y, scale=1.0, mask=mask), reference)  # the default, passed explicitly
        assert sqnr_db(model(x, y, mask=mask), reference) > 20
        save_int8(result, tmp_path / "int8.pt2")
        loaded = load_quantized(tmp_path / "int8.pt2")
        assert torch.equal(loaded(x, y, mask=mask), reference)
        assert torch.equal(loaded(x, y=y, mask=mask), reference)
    assert int8.eval() is int8 and not int8.training  # train()/eval() only set the flag
    with pytest.raises(RuntimeError, match=r"'mask' to be a tensor"):  # its default, None, was not exported
        int8(x, y)
    with pytest.raises(TypeError, match=r"missing the argument 'y'"):
        int8(x, mask=mask)
    with pytest.raises(TypeError, match=r"without the argument 'scale'.*got 2.0"):
        int8(x, y, scale=2.0, mask=mask)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'z'"):
        int8(x, y, mask=mask, z=1)


def test_artifact_is_about_4x_smaller_than_fp32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    fp32 = model_size_bytes(model)
    result = convert_to_int8(model, (torch.randn(64, 512),))
    int8 = model_size_bytes(result)
    assert int8 == result.size_bytes()
    assert int8 <= 0.3 * fp32, (int8, fp32)
    # no float copy of the weights is left in the program
    assert not any(v.dtype == torch.float32 and v.dim() == 2 for v in result.program.state_dict.values())


def test_sparsity_survives_conversion() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        weight = model[0].weight
        weight[weight.abs() <= weight.abs().flatten().kthvalue(math.ceil(0.9 * weight.numel())).values] = 0.0
    assert float((model[0].weight == 0).float().mean()) >= 0.9
    prepare_qat(model)
    train_steps(model, torch.randn(32, 256), steps=1)
    result = convert_to_int8(model, (torch.randn(8, 256),))
    big = [w for w in int8_weights(result).values() if w.shape == (256, 256)]
    assert len(big) == 1
    assert float((big[0] == 0).float().mean()) >= 0.9


def test_skip_keeps_modules_in_float() -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    result = convert_to_int8(model, (torch.randn(8, 16),), skip=["4"])
    assert result.skipped == ("4",)
    assert sorted(tuple(w.shape) for w in int8_weights(result).values()) == [(32, 16), (32, 32)]
    assert any(v.dtype == torch.float32 and tuple(v.shape) == (4, 32) for v in result.program.state_dict.values())


def test_qat_excluded_modules_stay_float() -> None:
    torch.manual_seed(0)
    model = mlp()
    prepare_qat(model, exclude=["^4$"])
    train_steps(model, torch.randn(16, 16), steps=1)
    result = convert_to_int8(model, (torch.randn(8, 16),))
    assert "4" in result.skipped
    assert len(int8_weights(result)) == 2


def test_four_bit_weights_are_baked_in() -> None:
    torch.manual_seed(0)
    model = mlp(32, 64, 4)
    prepare_qat(model, QuantConfig(weight_bits=4))
    x = torch.randn(64, 32)
    train_steps(model, x, steps=1)
    model.eval()
    result = convert_to_int8(model, (x,))
    assert sqnr_db(_outputs(model, x), _outputs(result, x)) > 30  # int8 re-rounding of the 4-bit grid only


# --------------------------------------------------------------------------------------------------------------------
# Errors and fallbacks
# --------------------------------------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # Python control flow on a tensor value: not exportable
            return self.fc(x)
        return -self.fc(x)


def test_non_exportable_model_gives_a_clear_error() -> None:
    with pytest.raises(
        Int8ConversionError, match=r"(?s)torch.export could not capture `DataDependent`.*if x.sum\(\) > 0.*torch.cond"
    ):
        convert_to_int8(DataDependent(), (torch.randn(8, 4),))


def test_wrong_example_inputs_give_a_clear_error() -> None:
    with pytest.raises(Int8ConversionError, match=r"do not match `TwoInputNet.forward`"):
        convert_to_int8(TwoInputNet(), (torch.randn(8, 8),), {"z": torch.randn(8, 4)})


def test_batch_of_one_falls_back_to_static_shapes() -> None:
    result = convert_to_int8(mlp().eval(), (torch.randn(1, 16),))
    assert not result.dynamic_batch
    assert any("specialized" in note for note in result.notes)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "int4"}, ValueError, r"`mode` must be one of 'static', 'dynamic', 'weight_only', got 'int4'\."),
        ({"skip": ["fc9"]}, ValueError, r"`skip` names no module: \['fc9'\]\. Linear/Conv module names: 0, 2, 4\."),
        ({"example_inputs": [torch.randn(2, 16)]}, ValueError, r"`example_inputs` must be a tuple"),
        ({"calibration_data": [3]}, Int8ConversionError, r"Each item of `calibration_data` must be the model's input"),
    ],
)
def test_argument_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"model": mlp(), "example_inputs": (torch.randn(2, 16),), **kwargs}
    with pytest.raises(error, match=match):
        convert_to_int8(**args)


def test_bad_calibration_batch_gives_a_clear_error() -> None:
    with pytest.raises(Int8ConversionError, match=r"Calibration batch 1 could not be run through the model"):
        convert_to_int8(mlp(), (torch.randn(2, 16),), calibration_data=[torch.randn(4, 16), torch.randn(4, 5)])


def test_load_and_size_reject_wrong_types() -> None:
    with pytest.raises(ValueError, match="Expected an ExportedProgram or an Int8Model"):
        save_int8(mlp(), "/tmp/never_written.pt2")  # type: ignore[arg-type]


@pytest.mark.slow  # a fresh interpreter imports torch and torchao (~7 s)
def test_full_disk_during_the_artifact_write_raises_naming_save_path_and_leaves_nothing(tmp_path) -> None:
    """``torch.export.save`` to a file aborts the process (SIGABRT) on a full disk: the artifact is serialized in
    memory and written atomically instead. A full disk is simulated with RLIMIT_FSIZE (SIGXFSZ ignored: EFBIG)."""
    import subprocess
    import sys
    import textwrap

    target = tmp_path / "out" / "int8.pt2"
    target.parent.mkdir()
    target.write_bytes(b"the previous artifact")
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import torch
        from torch import nn
        from lightning_compress.engine.convert import convert_to_int8, save_int8
        from lightning_compress.engine.io import ArtifactWriteError
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        int8 = convert_to_int8(model, (torch.randn(8, 16),))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_int8(int8, {str(target)!r})
        except ArtifactWriteError as err:
            print("ERROR", err)
            sys.exit(3)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Cannot write `save_path`=" in result.stdout and "int8.pt2" in result.stdout
    assert "File too large" in result.stdout
    assert target.read_bytes() == b"the previous artifact"  # untouched, and no temporary file left
    assert [p.name for p in target.parent.iterdir()] == ["int8.pt2"]


def test_save_writes_atomically_and_reloads(tmp_path) -> None:
    path = tmp_path / "new" / "int8.pt2"
    size = save_int8(convert_to_int8(mlp().eval(), (torch.randn(4, 16),)), path)
    assert size == path.stat().st_size and [p.name for p in path.parent.iterdir()] == ["int8.pt2"]
    assert load_quantized(path)(torch.randn(3, 16)).shape == (3, 4)


# --------------------------------------------------------------------------------------------------------------------
# Compiled int8 (slow: Inductor)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model_fn", [lambda: mlp(64, 256, 10), LeNet5], ids=["mlp", "lenet5"])
def test_compile_int8_matches_eager_program(model_fn) -> None:
    torch.manual_seed(0)
    model = model_fn().eval()
    x = torch.randn(16, 64) if isinstance(model, nn.Sequential) else torch.randn(16, 1, 28, 28)
    result = convert_to_int8(model, (x,))
    compiled = compile_int8(result)
    out = compiled(x)
    assert sqnr_db(_outputs(result, x), out) > 40
    assert sqnr_db(_outputs(copy.deepcopy(model), x), out) > 25


# --------------------------------------------------------------------------------------------------------------------
# ConversionConfig: validated once, plain values, one default observer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "int4"}, r"`mode` must be one of 'static', 'dynamic', 'weight_only', got 'int4'\."),
        ({"observer": "kl"}, r"`observer` must be one of 'minmax', 'moving_average', 'histogram', 'histogram_l2', got"),
        ({"percentile": 50}, r"`percentile` must be in \(50, 100\], got 50\."),
        ({"percentile": True}, r"`percentile` must be in \(50, 100\], got True\."),
        ({"calibration_batches": 0}, r"`calibration_batches` must be a positive integer, got 0\."),
        ({"quantize_embeddings": 1}, r"`quantize_embeddings` must be True or False, got 1\."),
        ({"dynamic_batch": "no"}, r"`dynamic_batch` must be True or False, got 'no'\."),
    ],
)
def test_conversion_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConversionConfig(**kwargs)
    with pytest.raises(ValueError, match=match):  # the same check when convert_to_int8 builds it from settings
        convert_to_int8(mlp(), (torch.randn(4, 16),), **kwargs)


def test_conversion_config_is_frozen_plain_and_has_one_default_observer() -> None:
    config = ConversionConfig(mode="dynamic", percentile=99)
    assert QUANT_MODES == ("static", "dynamic", "weight_only") and "histogram_l2" in OBSERVERS
    assert config.observer == DEFAULT_OBSERVER == "histogram"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "static"  # type: ignore[misc]
    plain = config.to_dict()
    assert plain == {
        "mode": "dynamic",
        "observer": "histogram",
        "percentile": 99.0,
        "calibration_batches": 32,
        "quantize_embeddings": True,
        "dynamic_batch": True,
    }
    assert ConversionConfig(**plain) == config


def test_settings_override_the_config_and_calibration_is_capped() -> None:
    model = mlp().eval()
    batches = [torch.randn(8, 16) for _ in range(5)]
    config = ConversionConfig(calibration_batches=2)
    result = convert_to_int8(model, (batches[0],), calibration_data=batches, config=config, observer="minmax")
    assert result.calibration_batches == 2
    assert convert_to_int8(model, (batches[0],), config=config, mode="dynamic").mode == "dynamic"


def test_pt2_is_written_compressed_and_reloads_identically(tmp_path) -> None:
    import zipfile

    from lightning_compress.demos.models import ResidualCNN as DemoResidualCNN
    from lightning_compress.engine.convert.artifact import serialize_int8

    torch.manual_seed(0)
    model = DemoResidualCNN(widths=(16, 32, 64), num_classes=10).eval()  # the benchmark net, at small width
    x = torch.randn(4, 1, 28, 28)
    result = convert_to_int8(model, (x,))
    plain, compressed = serialize_int8(result, compress=False), serialize_int8(result)
    assert len(compressed) < 0.6 * len(plain)
    path = tmp_path / "int8.pt2"
    size = save_int8(result, path)
    assert size == len(compressed) == path.stat().st_size == result.size_bytes()
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        assert members and all(m.compress_type == zipfile.ZIP_DEFLATED for m in members)
    with zipfile.ZipFile(io.BytesIO(plain)) as raw, zipfile.ZipFile(path) as packed:
        assert raw.namelist() == packed.namelist()
        assert all(raw.read(n) == packed.read(n) for n in raw.namelist())
    assert size <= 0.3 * model_size_bytes(model), (size, model_size_bytes(model))
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.module()(x))
        assert torch.equal(loaded(x[:3]), result.module()(x[:3]))
