"""IterativePruningCallback with structure="channel" and "N:M" in a Trainer: group-complete masks, the compact
model at fit end (outputs, results, saved forms), mid-ramp resume bitwise, the example input, bad settings."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import ResumableLoader, TinyClassifier, loader, trainer
from lightning_compress import IterativePruningCallback, load_compact
from lightning_compress.demos.models import ResidualCNN


class ResidualClassifier(L.LightningModule):
    """A small ResNet (conv + BN + residual adds + Linear head) on 1x12x12 inputs, with an example input."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ResidualCNN(widths=(16, 32, 32), num_classes=4)
        self.example_input_array = torch.zeros(1, 1, 12, 12)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _images(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long())


def test_fit_gives_a_compact_model_equal_to_the_masked_one(tmp_path):
    L.seed_everything(0)
    model = ResidualClassifier()
    callback = IterativePruningCallback(target_sparsity=0.5, structure="channel", end_step=4, update_every_n_steps=2)
    fit = trainer(tmp_path, [callback], max_epochs=2)
    fit.fit(model, DataLoader(_images(), batch_size=16), DataLoader(_images(32, 1), batch_size=16))
    results = callback.results
    assert results["channel_sparsity"] == pytest.approx(0.5, abs=0.1)  # round_to=16 widths, carried error
    for key in ("params_before", "params_after", "macs_before", "macs_after", "max_abs_diff", "speedup/batch_1"):
        assert f"compact/{key}" in results, key
    assert "compact/latency_ms_after/batch_16" in results
    assert results["compact/params_after"] < results["compact/params_before"]
    assert results["compact/macs_after"] < results["compact/macs_before"]
    compact = callback.compact_model
    assert isinstance(compact, nn.Module) and model.net.stem[0].out_channels == 16  # the LightningModule is unchanged
    x = torch.randn(8, 1, 12, 12)
    model.eval()
    compact.eval()
    with torch.no_grad():
        reference, out = model(x), compact(x)
    assert float((out - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    assert all(m.out_channels % 16 == 0 for m in compact.modules() if isinstance(m, nn.Conv2d))
    # both saved forms reload: the .pt2 with the path only, the state dict into a fresh instance
    with torch.no_grad():
        exported = load_compact(tmp_path / "compact_model.pt2")
        assert float((exported(x) - out).abs().max()) <= 1e-5 * float(out.abs().max())
        rebuilt = load_compact(tmp_path / "compact_model.pt", model=ResidualClassifier()).eval()
        assert torch.equal(rebuilt(x), out)


def test_catches_the_first_batch_when_there_is_no_example_input(tmp_path):
    model = TinyClassifier()  # no example_input_array
    callback = IterativePruningCallback(target_sparsity=0.5, structure="channel", end_step=4, round_to=1)
    trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    assert callback.results["pruned_channels"] == 32 and callback.compact_model is not None
    assert callback.compact_model.net.fc1.out_features == 32 and callback.compact_model.net.fc2.out_features == 4


def test_no_call_of_the_network_is_an_error_naming_the_fix(tmp_path):
    class Direct(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)  # never calls forward

    callback = IterativePruningCallback(structure="channel", end_step=4)
    with pytest.raises(RuntimeError, match=r"set `example_input_array`.*or let one batch run.*module='net'"):
        trainer(tmp_path, [callback], max_epochs=1).fit(Direct(), loader())
    fixed = IterativePruningCallback(target_sparsity=0.5, structure="channel", end_step=4, module="net", round_to=1)
    model = Direct()
    trainer(tmp_path, [fixed], max_epochs=1).fit(model, loader())
    assert fixed.results["pruned_channels"] == 32 and fixed.compact_model.fc1.out_features == 32


@pytest.mark.parametrize("resume_at", [3, 5])
def test_resume_mid_ramp_is_bitwise_identical(tmp_path, resume_at):
    data = _images(96)

    def run(root, ckpt=None, max_steps=12):
        L.seed_everything(0)
        model = ResidualClassifier()
        callback = IterativePruningCallback(
            target_sparsity=0.5, structure="channel", start_step=1, end_step=9, update_every_n_steps=2, round_to=1
        )
        checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        fit = trainer(root, [callback, checkpoint], max_steps=max_steps, enable_checkpointing=True, max_epochs=None)
        fit.fit(model, ResumableLoader(data, batch_size=16), ckpt_path=ckpt)
        return model, callback

    full, full_cb = run(tmp_path / "full")
    resumed, resumed_cb = run(tmp_path / "resumed", ckpt=str(tmp_path / "full" / f"step={resume_at}.ckpt"))
    assert all(
        torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    assert all(
        torch.equal(full_cb.pruner.group_masks[n], resumed_cb.pruner.group_masks[n]) for n in full_cb.pruner.group_masks
    )
    assert full_cb.results["pruned_channels"] == round(0.5 * full_cb.results["prunable_channels"])


def test_n_m_structure_in_a_trainer(tmp_path):
    model = TinyClassifier()
    callback = IterativePruningCallback(structure="2:4", end_step=4)
    assert callback.target_sparsity == 0.5
    trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    for weight in (model.net.fc1.weight, model.net.fc2.weight):
        assert torch.equal(
            (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1),
            torch.full((weight.shape[0], weight.shape[1] // 4), 2),
        )
    assert callback.results["sparsity"] == 0.5 and callback.compact_model is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"structure": "2:4", "target_sparsity": 0.8}, r"`target_sparsity` must be \(M-N\)/M = 0.5"),
        ({"structure": "3:2"}, r"`structure`='3:2' must have 1 <= N < M"),
        ({"structure": "two:four"}, r"an 'N:M' pattern such as '2:4', got 'two:four'"),
        ({"structure": "channel", "round_to": -1}, r"`round_to` must be a positive integer"),
        ({"structure": "channel", "compact_on_fit_end": "yes"}, r"`compact_on_fit_end`"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IterativePruningCallback(**kwargs)


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
@pytest.mark.parametrize("quantization", ["qat", "ptq"])
def test_int8_model_is_the_compact_network(tmp_path, quantization, backend):
    """Compose: with channel pruning in the same fit, QAT and PTQ convert the compact network (channels removed,
    then int8), which computes what the masked (fake-quant) network computes."""
    from lightning_compress import PostTrainingQuantCallback, QATCallback

    L.seed_everything(0)
    model = ResidualClassifier()
    pruning = IterativePruningCallback(target_sparsity=0.5, structure="channel", end_step=4, update_every_n_steps=2)
    quant = (
        QATCallback(start=2, backend=backend, latency="off", verbose=False)
        if quantization == "qat"
        else PostTrainingQuantCallback(backend=backend, latency="off", verbose=False)
    )
    fit = trainer(tmp_path, [quant, pruning], max_epochs=3)  # order does not matter: quant asks pruning
    fit.fit(model, DataLoader(_images(), batch_size=16), DataLoader(_images(32, 1), batch_size=16))
    assert quant.results["compact"] == 1.0
    compact_widths = sorted(m.out_channels for m in pruning.compact_model.modules() if isinstance(m, nn.Conv2d))
    dense_widths = sorted(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert compact_widths != dense_widths
    if backend == "onnxruntime":
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(quant.results["saved_to"]))
        by_name = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        dequantized = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        conv_weights = [
            by_name[dequantized.get(n.input[1], n.input[1])] for n in proto.graph.node if n.op_type == "Conv"
        ]
        assert all(w.dtype == "int8" for w in conv_weights)
        conv_widths = sorted(w.shape[0] for w in conv_weights)
        assert conv_widths == compact_widths  # the artifact holds the compact layers
    else:
        weights = [
            n.meta["val"].shape[0]
            for n in quant.quantized_program.graph.nodes
            if n.op == "placeholder" and n.meta.get("val") is not None and n.meta["val"].dim() == 4
        ]
        assert max(weights) == max(compact_widths) < max(dense_widths)
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        agreement = (quant.quantized_model(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agreement >= 0.9
