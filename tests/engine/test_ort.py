"""The ONNX Runtime int8 backend (lightning_compress.engine.ort); plain PyTorch, no Lightning."""

from __future__ import annotations

import copy
import pickle
import time

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from test_fake_quant import LeNet5, ResidualCNN, TinyTransformer, TwoInputNet, mlp, train_steps
from torch import Tensor, nn

from lightning_compress.engine.config import QuantConfig
from lightning_compress.engine.fake_quant import (
    activation_qparams,
    fake_quant_modules,
    freeze_observers,
    prepare_qat,
    weight_qparams,
)
from lightning_compress.engine.measure import sqnr_db, top1_agreement
from lightning_compress.engine.ort import (
    BackendChoice,
    OrtConversionError,
    OrtFloatModel,
    OrtInt8Model,
    _scope,
    choose_backend,
    choose_from_latencies,
    convert_to_onnx_int8,
    count_quantized_layers,
    export_onnx,
    load_onnx,
    load_onnx_int8,
    resolve_mode,
)


def _qat_model(model: nn.Module, *inputs: Tensor, **prepare: object) -> nn.Module:
    prepare_qat(model, **prepare)  # type: ignore[arg-type]
    train_steps(model, *inputs, steps=4)
    freeze_observers(model)
    return model.eval()


def _graph(model: OrtInt8Model) -> onnx.GraphProto:
    return onnx.load_from_string(model.onnx_bytes).graph


def _layer_node(graph: onnx.GraphProto, layer: str) -> onnx.NodeProto:
    prefix = _scope("net." + layer)
    return next(n for n in graph.node if n.name.startswith(prefix) and n.op_type in ("Conv", "Gemm", "MatMul"))


def _dq_params(graph: onnx.GraphProto, tensor: str) -> tuple[np.ndarray, np.ndarray, str]:
    """scale, zero point and quantized input of the DequantizeLinear producing ``tensor``."""
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = next(n for n in graph.node if tensor in n.output)
    assert dq.op_type == "DequantizeLinear"
    return init[dq.input[1]], init[dq.input[2]], dq.input[0]


@pytest.fixture(scope="module")
def qat_cnn() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    return _qat_model(ResidualCNN(), x), x


@pytest.fixture(scope="module")
def cnn_int8(qat_cnn: tuple[nn.Module, Tensor]) -> OrtInt8Model:
    model, x = qat_cnn
    return convert_to_onnx_int8(model, x[:4], calibration=[x[:16], x[16:]], mode="static")


def test_static_int8_computes_what_the_fake_quant_model_simulated(qat_cnn, cnn_int8) -> None:
    model, _ = qat_cnn
    x = torch.randn(256, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
    out = cnn_int8(x)
    assert isinstance(out, Tensor) and out.dtype == torch.float32
    assert top1_agreement(reference, out) >= 0.95
    assert sqnr_db(reference, out) > 25.0
    assert cnn_int8.mode == "static"
    assert set(cnn_int8.seeded_layers) == set(fake_quant_modules(model))


def test_the_input_model_is_not_modified(qat_cnn, cnn_int8) -> None:
    model, _ = qat_cnn
    assert set(fake_quant_modules(model)) == {"stem", "block.conv1", "block.conv2", "head"}


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(cnn_int8, batch: int) -> None:
    assert cnn_int8(torch.randn(batch, 3, 8, 8)).shape == (batch, 10)


def test_float_export_matches_eager_at_any_batch() -> None:
    torch.manual_seed(0)
    net = LeNet5().eval()
    fp32 = export_onnx(net, torch.randn(2, 1, 28, 28))
    assert isinstance(fp32, OrtFloatModel) and count_quantized_layers(fp32.onnx_bytes) == {}
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        torch.testing.assert_close(fp32(x), net(x), rtol=1e-4, atol=1e-5)


def test_ptq_of_a_float_model_is_close_to_it() -> None:
    torch.manual_seed(0)
    net = LeNet5().eval()
    calibration = [torch.randn(32, 1, 28, 28) for _ in range(2)]
    int8 = convert_to_onnx_int8(net, calibration[0][:2], calibration=calibration)
    x = torch.randn(128, 1, 28, 28)
    with torch.no_grad():
        reference = net(x)
    assert int8.seeded_layers == ()
    assert sqnr_db(reference, int8(x)) > 25.0
    assert top1_agreement(reference, int8(x)) >= 0.95


def test_save_load_round_trip(tmp_path, cnn_int8) -> None:
    path = tmp_path / "sub" / "model_int8.onnx"
    size = cnn_int8.save(path)
    assert size == path.stat().st_size == cnn_int8.size_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_int8.onnx"]  # atomic: no temporary left
    x = torch.randn(5, 3, 8, 8)
    loaded = load_onnx_int8(path)
    assert isinstance(loaded, OrtInt8Model) and loaded.mode == "static"
    torch.testing.assert_close(loaded(x), cnn_int8(x), rtol=0, atol=0)
    assert isinstance(load_onnx(path), OrtInt8Model)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a fresh session
    (out,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_array_equal(out, cnn_int8(x).numpy())
    clone = copy.deepcopy(cnn_int8)
    torch.testing.assert_close(clone(x), cnn_int8(x), rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(cnn_int8))(x), cnn_int8(x), rtol=0, atol=0)


def test_seeding_uses_the_observer_qparams_and_weight_grid() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    model = _qat_model(mlp(), x)
    for i, (lo, hi) in enumerate([(-3.0, 5.0), (0.0, 7.0), (0.0, 2.5)]):
        model[2 * i].observer.set_range(lo, hi)  # far from what calibration on `x` would find
    qparams = activation_qparams(model)
    int8 = convert_to_onnx_int8(model, x[:2], calibration=[x], mode="static")
    graph = _graph(int8)
    for layer in ("0", "2", "4"):
        node = _layer_node(graph, layer)
        scale, zero_point, _ = _dq_params(graph, node.input[0])
        assert float(scale) == pytest.approx(qparams[layer][0], rel=1e-6)
        assert int(zero_point) == qparams[layer][1]
        w_scale, w_zero, w_int8 = _dq_params(graph, node.input[1])
        weight = model[int(layer)].weight.detach()
        expected_scale, _ = weight_qparams(weight)
        np.testing.assert_allclose(w_scale, expected_scale.numpy(), rtol=1e-6)
        assert not w_zero.any()
        ints = torch.clamp(torch.round(weight / expected_scale[:, None]), -128, 127)
        init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        np.testing.assert_array_equal(init[w_int8], ints.numpy().astype(np.int8))
    unseeded = convert_to_onnx_int8(model, x[:2], calibration=[x], mode="static", seed_from_fake_quant=False)
    graph = _graph(unseeded)
    scale, _, _ = _dq_params(graph, _layer_node(graph, "0").input[0])
    assert float(scale) != pytest.approx(qparams["0"][0], rel=1e-3)
    assert unseeded.seeded_layers == ()


def test_layers_qat_left_float_stay_float_and_counts_come_from_the_graph() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28)
    full = convert_to_onnx_int8(_qat_model(LeNet5(), x), x[:2], calibration=[x], mode="static")
    assert full.quantized_layers == {"Conv": 2, "Gemm": 3} and full.num_quantized_layers == 5
    partial = convert_to_onnx_int8(_qat_model(LeNet5(), x, exclude="conv1"), x[:2], calibration=[x], mode="static")
    assert partial.quantized_layers == {"Conv": 1, "Gemm": 3}
    assert partial.float_layers == ("conv1",)
    graph = _graph(partial)
    assert graph.node[0].op_type != "DequantizeLinear" or "weight" not in graph.node[0].input[0]
    conv1 = _layer_node(graph, "conv1")
    assert not any(conv1.input[1] in n.output for n in graph.node if n.op_type == "DequantizeLinear")


@pytest.mark.parametrize("keep", [True, False])
def test_keep_output_float(keep: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    int8 = convert_to_onnx_int8(_qat_model(mlp(), x), x[:2], calibration=[x], mode="static", keep_output_float=keep)
    graph = _graph(int8)
    producer = next(n for n in graph.node if graph.output[0].name in n.output)
    assert producer.op_type == ("Gemm" if keep else "DequantizeLinear")
    assert int8.quantized_layers == {"Gemm": 3}


def test_attention_internals_stay_float_in_static_mode_and_dynamic_is_chosen_for_them() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 6, 8)
    model = TinyTransformer().eval()
    assert resolve_mode(model) == "dynamic"
    static = convert_to_onnx_int8(model, x[:2], calibration=[x], mode="static")
    graph = _graph(static)
    init = {i.name for i in graph.initializer}
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in graph.node:
        if node.op_type == "Softmax" or (node.op_type == "MatMul" and not set(node.input) & (init | dq_outputs)):
            assert not set(node.input) & dq_outputs, node.name
    activation_matmuls = [
        n for n in graph.node if n.op_type == "MatMul" and all(i not in init and i not in dq_outputs for i in n.input)
    ]
    assert len(activation_matmuls) == 2  # q @ k^T and attn @ v
    dynamic = convert_to_onnx_int8(model, x[:2], mode="auto")
    assert dynamic.mode == "dynamic"
    # embed, in_proj, out_proj, linear1, linear2, head; the two attention MatMuls stay float
    assert dynamic.quantized_layers == {"MatMulInteger": 6}
    with torch.no_grad():
        reference = model(x)
    assert sqnr_db(reference, dynamic(x)) > 20.0


def test_keyword_tensors_become_named_inputs() -> None:
    torch.manual_seed(0)
    net = TwoInputNet().eval()
    x, y, mask = torch.randn(4, 8), torch.randn(4, 4), torch.ones(4, 16)
    int8 = convert_to_onnx_int8(net, (x, y), {"mask": mask, "scale": 2.0}, mode="dynamic")
    assert int8.input_names == ("x", "y", "mask")
    with torch.no_grad():
        reference = net(x, y, mask=mask, scale=2.0)
    assert sqnr_db(reference, int8(x, y, mask=mask)) > 20.0
    torch.testing.assert_close(int8(x, y=y, mask=mask), int8(x, y, mask))
    with pytest.raises(TypeError, match="no input `scale`"):
        int8(x, y, mask=mask, scale=torch.tensor(2.0))
    with pytest.raises(TypeError, match=r"Missing ONNX input\(s\) \['mask'\]"):
        int8(x, y)


def test_errors() -> None:
    net = mlp().eval()
    with pytest.raises(ValueError, match="`mode` must be one of 'static', 'dynamic', 'auto', got 'fast'"):
        convert_to_onnx_int8(net, torch.randn(2, 16), mode="fast")

    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x.view(2, 16))

    with pytest.raises(OrtConversionError, match="does not take another batch size"):
        convert_to_onnx_int8(FixedBatch(), torch.randn(2, 16))

    class DictOut(nn.Module):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"y": x}

    with pytest.raises(OrtConversionError, match="returns dict"):
        export_onnx(DictOut(), torch.randn(2, 3))

    class Unsupported(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.linalg.eigvals(x).real  # no ONNX symbolic

    with pytest.raises(OrtConversionError, match=r"torch\.onnx\.export .* cannot export Unsupported"):
        export_onnx(Unsupported(), torch.randn(2, 3, 3))

    four_bit = _qat_model(mlp(), torch.randn(8, 16), config=QuantConfig(weight_bits=4))
    with pytest.raises(OrtConversionError, match="4-bit weights"):
        convert_to_onnx_int8(four_bit, torch.randn(2, 16), mode="static")
    with pytest.raises(OrtConversionError, match="lacks the input"):
        convert_to_onnx_int8(
            TwoInputNet(), (torch.randn(2, 8), torch.randn(2, 4)), calibration=[torch.randn(2, 8)], mode="static"
        )


def test_choose_from_latencies() -> None:
    int8_wins = choose_from_latencies(
        {
            "eager_fp32": {1: 1.0, 64: 40.0},
            "onnxruntime_fp32": {1: 0.5, 64: 20.0},
            "onnxruntime": {1: 0.2, 64: 10.0},
            "inductor": {1: 2.0, 64: 20.0},
        }
    )
    assert isinstance(int8_wins, BackendChoice)
    assert (int8_wins.backend, int8_wins.fastest, int8_wins.int8_pays_off) == ("onnxruntime", "onnxruntime", True)
    assert int8_wins.reason.startswith("onnxruntime int8 is 4.00x at batch 64, 5.00x at batch 1 vs fp32 eager")
    assert int8_wins.speedup["inductor"] == {1: 0.5, 64: 2.0}
    assert int8_wins.score["onnxruntime"] == pytest.approx((4 * 5) ** 0.5)
    # Inductor faster at batch 64 but much slower at batch 1: the geometric mean decides
    mixed = choose_from_latencies({"eager_fp32": {1: 1.0, 64: 40.0}, "onnxruntime": {1: 0.5, 64: 20.0},
                                   "inductor": {1: 4.0, 64: 10.0}})  # fmt: skip
    assert mixed.backend == "onnxruntime"
    no_pay = choose_from_latencies(
        {"eager_fp32": {1: 1.0}, "onnxruntime_fp32": {1: 0.2}, "onnxruntime": {1: 0.4}, "inductor": {1: 3.0}}
    )
    assert (no_pay.backend, no_pay.fastest, no_pay.int8_pays_off) == ("onnxruntime", "onnxruntime_fp32", False)
    assert no_pay.reason.startswith("int8 does not pay off for this model; ORT fp32 is faster (5.00x at batch 1")
    eager_best = choose_from_latencies({"eager_fp32": {1: 1.0}, "inductor": {1: 2.0}})
    assert eager_best.reason.startswith("int8 does not pay off for this model; fp32 eager is faster")
    assert eager_best.to_dict()["latency_ms"] == {"eager_fp32": {"1": 1.0}, "inductor": {"1": 2.0}}
    with pytest.raises(ValueError, match="must contain 'eager_fp32'"):
        choose_from_latencies({"inductor": {1: 1.0}})
    with pytest.raises(ValueError, match=r"lacks the batch size\(s\) \[64\]"):
        choose_from_latencies({"eager_fp32": {1: 1.0, 64: 2.0}, "inductor": {1: 1.0}})


def _sleeper(seconds: float, calls: list[int]):
    def run(x: Tensor) -> Tensor:
        calls.append(x.shape[0])
        time.sleep(seconds)
        return x

    return run


def test_choose_backend_times_the_callables_alternated() -> None:
    calls: dict[str, list[int]] = {name: [] for name in ("eager_fp32", "onnxruntime_fp32", "onnxruntime", "inductor")}
    delays = {"eager_fp32": 0.004, "onnxruntime_fp32": 0.0, "onnxruntime": 0.001, "inductor": 0.008}
    candidates = {name: _sleeper(delays[name], calls[name]) for name in delays}
    choice = choose_backend(candidates, torch.randn(3, 2), [1, 4], warmup=1, repeats=3)
    assert (choice.backend, choice.fastest, choice.int8_pays_off) == ("onnxruntime", "onnxruntime_fp32", False)
    assert "ORT fp32 is faster" in choice.reason
    assert choice.batch_sizes == (1, 4)
    assert sorted(set(calls["inductor"])) == [1, 4] and len(calls["inductor"]) == 8
    assert len(calls["eager_fp32"]) == 3 * 8  # timed next to each of the three others
    assert choice.latency_ms["inductor"][4] > choice.latency_ms["eager_fp32"][4] > choice.latency_ms["onnxruntime"][4]
    with pytest.raises(ValueError, match="must contain 'eager_fp32'"):
        choose_backend({"inductor": candidates["inductor"]}, torch.randn(1, 2), [1])


def test_float_layers_of_a_float_model_stay_float_and_read_float_inputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    net = mlp().eval()
    int8 = convert_to_onnx_int8(net, x[:2], calibration=[x], mode="static", float_layers=["2"])
    assert int8.float_layers == ("2",) and int8.quantized_layers == {"Gemm": 2}
    graph = _graph(int8)
    layer = next(n for n in graph.node if n.op_type == "Gemm" and "/net.2/" in n.name)
    producers = {o: n for n in graph.node for o in n.output}
    assert producers[layer.input[0]].op_type != "DequantizeLinear"  # its input is the float ReLU output
    assert layer.input[1] not in producers  # the float weight initializer itself
    with torch.no_grad():
        assert sqnr_db(net(x), int8(x)) > 25.0
    with pytest.raises(ValueError, match=r"`float_layers` names modules that Sequential does not have: \['fc9'\]"):
        convert_to_onnx_int8(net, x[:2], mode="static", float_layers=["fc9"])


def test_constant_arguments_of_the_example_may_be_passed_with_their_value() -> None:
    torch.manual_seed(0)
    net = TwoInputNet().eval()
    x, y, mask = torch.randn(4, 8), torch.randn(4, 4), torch.ones(4, 16)
    int8 = convert_to_onnx_int8(net, (x, y), {"mask": mask, "scale": 2.0}, mode="dynamic")
    assert int8.fixed_arguments == {"scale": 2.0}
    torch.testing.assert_close(int8(x, y, mask=mask, scale=2.0), int8(x, y, mask=mask))
    with pytest.raises(TypeError, match=r"`scale` was baked into the ONNX graph as 2.0.*cannot take 3.0"):
        int8(x, y, mask=mask, scale=3.0)


def test_load_quantized_dispatches_on_the_suffix(tmp_path) -> None:
    from lightning_compress import load_quantized

    torch.manual_seed(0)
    x = torch.randn(16, 16)
    int8 = convert_to_onnx_int8(mlp().eval(), x[:2], calibration=[x], mode="static")
    int8.save(tmp_path / "m.onnx")
    loaded = load_quantized(tmp_path / "m.onnx")
    assert isinstance(loaded, OrtInt8Model) and loaded.quantized_layers == int8.quantized_layers
    torch.testing.assert_close(loaded(x), int8(x))
    export_onnx(mlp().eval(), x[:2], tmp_path / "f.onnx")
    assert isinstance(load_quantized(tmp_path / "f.onnx"), OrtFloatModel)


def test_convert_auto_keeps_the_backend_that_converts_and_says_why_the_other_is_missing() -> None:
    from lightning_compress.engine.config import ConversionConfig
    from lightning_compress.engine.convert import Int8ConversionError
    from lightning_compress.engine.convert.backend import check_backend, convert_auto, convert_with_backend

    torch.manual_seed(0)
    net, x = mlp().eval(), torch.randn(8, 16)

    def convert(backend: str):
        if backend == "inductor":
            raise Int8ConversionError("torch.export cannot capture it\nmore detail")
        return convert_with_backend(backend, net, (x,), {}, config=ConversionConfig(mode="static"))

    backend, model, reason = convert_auto(convert, net, (x,), {}, [4])
    assert backend == "onnxruntime" and isinstance(model, OrtInt8Model)
    assert reason == "onnxruntime int8 (the only one built: inductor failed: torch.export cannot capture it)"

    def nothing(backend: str):
        raise OrtConversionError(f"{backend} failed")

    with pytest.raises(OrtConversionError, match="onnxruntime failed"):
        convert_auto(nothing, net, (x,), {}, [4])
    assert check_backend("onnxruntime", "dynamic") == "onnxruntime"
    with pytest.raises(ValueError, match=r"`backend`='onnxruntime' cannot run `mode`='weight_only'"):
        check_backend("onnxruntime", "weight_only")
