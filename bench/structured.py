"""Structured pruning benchmark: channels removed for real, on Fashion-MNIST, fp32 eager on one CPU thread.

Methods (same data, epoch budget and seeds; Adam 1e-3, batch 128):

* **dense**: no pruning.
* **ours channel 50% + compact**: ``IterativePruningCallback(structure="channel", target_sparsity=0.5)``, cubic ramp
  over the first ``ramp`` fraction of training, group-complete masks, ``round_to=16`` (the default), then the pruned
  channels removed at fit end (``compact_model``).
* **Torch-Pruning one-shot + fine-tune** (the anchor): Torch-Pruning's ``MetaPruner`` (group L2 magnitude, global,
  ``round_to=16``, the classifier ignored) removes 50% of the channels in one shot at the step where our ramp ends;
  the optimizer is rebuilt (Adam state reset: the removed tensors are new parameters) and training continues.
* **ours unstructured 90%**: ``IterativePruningCallback(target_sparsity=0.9)`` (a mask: no speedup in dense eager).

Reported: test accuracy, parameters (non-zero for unstructured), MACs, and latency at batch 1 and 64 against the
dense network (alternated runs, 1 thread, medians). Then each final network (the compact one for channel pruning)
is converted to int8 with the default backend (ONNX Runtime static, calibrated on 8 training batches): its test
accuracy and its latency against the *dense fp32* network, alternated (the "compact then int8" path of Compose).
The targets of the ResNet-ish net (50% channels >= 1.8x at batch 64, >= 1.3x at batch 1, <= 1 point below dense, at
least Torch-Pruning's accuracy) are checked in the table; misses are written as misses. Results go to
``bench/structured_results.json`` (``--quick``: ``structured_results_quick.json``) and the "structured" section of
``docs/benchmarks.md``.

Usage::

    python bench/structured.py                    # 2 seeds, 10 epochs, full data (long)
    python bench/structured.py --quick            # 1 seed, 2 epochs on 10k images: a few minutes
    python bench/structured.py --epochs 4 --seeds 1 --train-subset 20000
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, environment, markdown_table, quiet_lightning, write_benchmarks_section

from lightning_compress import IterativePruningCallback
from lightning_compress.demos import FashionMNISTDataModule
from lightning_compress.demos.models import ImageClassifier, LeNet5, ResNetish
from lightning_compress.engine.measure import compare_latency
from lightning_compress.engine.ort import convert_to_onnx_int8
from lightning_compress.engine.structured import count_params_and_macs

NETS = {"lenet5": LeNet5, "resnetish": ResNetish}


class OneShotTorchPruning(Callback):
    """Torch-Pruning's MetaPruner at one step, then a fresh optimizer over the new parameters."""

    def __init__(self, step: int, ratio: float = 0.5, round_to: int = 16) -> None:
        self.step, self.ratio, self.round_to, self.done = step, ratio, round_to, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.done or trainer.global_step < self.step:
            return
        import torch_pruning as tp

        net = pl_module.net
        flags = [(m, m.training) for m in net.modules()]
        with torch.enable_grad():
            pruner = tp.pruner.MetaPruner(
                net,
                torch.zeros(1, 1, 28, 28),
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                global_pruning=True,
                pruning_ratio=self.ratio,
                ignored_layers=[m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == 10],
                round_to=self.round_to,
            )
            pruner.step()
        for module, flag in flags:
            module.training = flag
        trainer.optimizers = [torch.optim.Adam(pl_module.parameters(), lr=pl_module.lr)]
        self.done = True


def _run(net_name: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    L.seed_everything(seed, verbose=False)
    data = FashionMNISTDataModule(
        batch_size=128, train_subset=args.train_subset, test_subset=args.test_subset, seed=seed
    )
    model = ImageClassifier(arch="lenet5", lr=1e-3)
    model.net = NETS[net_name]()
    dense_copy = copy.deepcopy(model.net).eval()
    data.setup("fit")
    steps = args.epochs * len(data.train_dataloader())
    end_step = max(2, round(args.ramp * steps))
    callbacks: list[Callback] = []
    channel = None
    if method == "channel":
        channel = IterativePruningCallback(
            target_sparsity=0.5,
            structure="channel",
            end_step=end_step,
            module="net",
            verbose=False,
            compact_path=str(Path(args.out_dir) / f"{net_name}_{seed}_compact.pt"),
        )
        callbacks.append(channel)
    elif method == "torch_pruning":
        callbacks.append(OneShotTorchPruning(end_step))
    elif method == "unstructured":
        callbacks.append(IterativePruningCallback(target_sparsity=0.9, end_step=end_step, verbose=False))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_s = time.perf_counter() - start
    final = channel.compact_model if channel is not None else model.net
    assert final is not None
    final = copy.deepcopy(final).eval()
    accuracy = trainer.test(model if channel is None else _swap(model, final), datamodule=data, verbose=False)[0]
    example = ((torch.zeros(1, 1, 28, 28),), {})
    params, macs = count_params_and_macs(final, example)
    if method == "unstructured":
        params = sum(int(torch.count_nonzero(p)) for p in final.parameters())
    row: dict[str, Any] = {
        "net": net_name,
        "method": method,
        "seed": seed,
        "test_acc": 100 * float(accuracy["test_acc"]),
        "params": params,
        "macs": macs,
        "train_s": train_s,
    }
    for batch in (1, 64):
        timing = compare_latency(dense_copy, final, torch.randn(batch, 1, 28, 28), warmup=3, repeats=args.repeats)
        row[f"ms_b{batch}"] = timing["b"]["median_ms"]
        row[f"speedup_b{batch}"] = timing["speedup"]
    if method != "unstructured":  # compact (or dense) then int8: what Compose ships
        calibration = [x for x, _ in zip((b[0] for b in data.train_dataloader()), range(8), strict=False)]
        int8 = convert_to_onnx_int8(final, calibration[0], mode="static", calibration=calibration)
        row["int8_test_acc"] = 100 * float(
            trainer.test(_swap(model, int8), datamodule=data, verbose=False)[0]["test_acc"]
        )
        for batch in (1, 64):
            timing = compare_latency(dense_copy, int8, torch.randn(batch, 1, 28, 28), warmup=3, repeats=args.repeats)
            row[f"int8_ms_b{batch}"] = timing["b"]["median_ms"]
            row[f"int8_speedup_b{batch}"] = timing["speedup"]
    if channel is not None:
        row["channel_sparsity"] = channel.results["channel_sparsity"]
        row["compact_max_abs_diff"] = channel.results["compact/max_abs_diff"]
    print(json.dumps(row), flush=True)
    return row


def _swap(model: ImageClassifier, net: nn.Module) -> ImageClassifier:
    tested = copy.deepcopy(model)
    tested.net = net
    return tested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 10k train / 2k test images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--ramp", type=float, default=0.6, help="fraction of training over which sparsity ramps")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--nets", nargs="+", default=list(NETS))
    parser.add_argument("--methods", nargs="+", default=["dense", "channel", "torch_pruning", "unstructured"])
    parser.add_argument("--out-dir", default="/tmp/lightning_compress_bench")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds = min(args.epochs, 2), 1
        args.train_subset, args.test_subset = args.train_subset or 10000, args.test_subset or 2000
    quiet_lightning()
    torch.set_num_threads(1)
    env = environment()
    print(f"CPU: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, 1 thread", flush=True)
    rows = [_run(n, m, s, args) for n in args.nets for s in range(args.seeds) for m in args.methods]
    summary = []
    for net in args.nets:
        for method in args.methods:
            mine = [r for r in rows if r["net"] == net and r["method"] == method]
            if not mine:
                continue
            keys = ["test_acc", "params", "macs", "ms_b1", "ms_b64", "speedup_b1", "speedup_b64"]
            keys += [k for k in ("int8_test_acc", "int8_speedup_b1", "int8_speedup_b64") if k in mine[0]]
            mean = {k: statistics.fmean(r[k] for r in mine) for k in keys}
            spread = {f"{k}_min": min(r[k] for r in mine) for k in ("speedup_b1", "speedup_b64")}
            spread |= {f"{k}_max": max(r[k] for r in mine) for k in ("speedup_b1", "speedup_b64")}
            summary.append({"net": net, "method": method, "runs": len(mine), **mean, **spread})
    out = BENCH_DIR / ("structured_results_quick.json" if args.quick else "structured_results.json")
    settings = {k: getattr(args, k) for k in ("epochs", "seeds", "train_subset", "test_subset", "ramp", "repeats")}
    out.write_text(json.dumps({"environment": env, "settings": settings, "runs": rows, "summary": summary}, indent=2))

    def int8_cell(s: dict[str, Any], key: str, fmt: str) -> str:
        return fmt.format(s[key]) if key in s else "-"

    table = markdown_table(
        [
            "net",
            "method",
            "test acc %",
            "params",
            "MACs",
            "b1 ms",
            "b1 speedup",
            "b64 ms",
            "b64 speedup",
            "then int8: acc %",
            "int8 b1 vs dense",
            "int8 b64 vs dense",
        ],
        [
            [
                s["net"],
                s["method"],
                f"{s['test_acc']:.2f}",
                f"{s['params']:,.0f}",
                f"{s['macs']:,.0f}",
                f"{s['ms_b1']:.2f}",
                f"{s['speedup_b1']:.2f}x ({s['speedup_b1_min']:.2f}-{s['speedup_b1_max']:.2f})",
                f"{s['ms_b64']:.1f}",
                f"{s['speedup_b64']:.2f}x ({s['speedup_b64_min']:.2f}-{s['speedup_b64_max']:.2f})",
                int8_cell(s, "int8_test_acc", "{:.2f}"),
                int8_cell(s, "int8_speedup_b1", "{:.2f}x"),
                int8_cell(s, "int8_speedup_b64", "{:.2f}x"),
            ]
            for s in summary
        ],
    )
    verdicts = _targets(summary)
    text = (
        f"{args.seeds} seed(s), {args.epochs} epochs, train subset {args.train_subset or 'all'}, test subset "
        f"{args.test_subset or 'all'}; CPU: {env['cpu']}, 1 thread. Speedups: median of alternated runs against the "
        "dense network, mean over seeds (min-max in brackets).\n\n" + table + "\n\n" + verdicts
    )
    print(text)
    if not args.quick:
        write_benchmarks_section("structured", text)


def _targets(summary: list[dict[str, Any]]) -> str:
    """The ResNet-ish targets of the structured-pruning issue, each marked met or missed."""
    by = {(s["net"], s["method"]): s for s in summary}
    dense, ours, anchor = (by.get(("resnetish", m)) for m in ("dense", "channel", "torch_pruning"))
    if dense is None or ours is None:
        return "Targets: not checked (the ResNet-ish dense and channel runs are needed)."
    checks = [
        (f"b64 speedup >= 1.8x: {ours['speedup_b64']:.2f}x", ours["speedup_b64"] >= 1.8),
        (f"b1 speedup >= 1.3x: {ours['speedup_b1']:.2f}x", ours["speedup_b1"] >= 1.3),
        (
            f"<= 1 point below dense: {ours['test_acc'] - dense['test_acc']:+.2f}",
            ours["test_acc"] >= dense["test_acc"] - 1,
        ),
    ]
    if anchor is not None:
        checks.append(
            (
                f"accuracy >= Torch-Pruning one-shot: {ours['test_acc']:.2f} vs {anchor['test_acc']:.2f}",
                ours["test_acc"] >= anchor["test_acc"],
            )
        )
    return (
        "Targets (ResNet-ish, channel 50%): "
        + "; ".join(f"{label} **{'met' if ok else 'MISSED'}**" for label, ok in checks)
        + "."
    )


if __name__ == "__main__":
    main()
