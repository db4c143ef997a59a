"""Device check: the three callbacks on an accelerator, in Lightning's bf16 mixed precision.

    python bench/gpu_check.py                 # CUDA (exits with a message when there is none)
    python bench/gpu_check.py --device cpu    # the same checks on CPU (what CI machines can run)

On the ResidualCNN (``demos.models``) with random images, a few steps each, through the public callbacks only:

* **pruning**: ``IterativePruningCallback`` (unstructured 80%, then channel 50% + compact): masks, thresholds and the
  re-zeroing run on the device (no CPU copy of the scores), the exact count holds, pruned weights stay zero;
* **QAT**: ``QATCallback`` with fake quantization and observers on the device under ``bf16-mixed``, converted at
  fit end (the int8 runtimes are CPU ones: the conversion works from a CPU copy);
* **PTQ**: ``PostTrainingQuantCallback`` calibrating through the device model.

Each check prints ``ok`` with its numbers, or the error; the results go to ``bench/gpu_check_results.json`` (with
the device name) so they can be copied into docs/benchmarks.md. Nothing here is part of CI: no test needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, environment, quiet_lightning

from lightning_compress import IterativePruningCallback, PostTrainingQuantCallback, QATCallback
from lightning_compress.demos.models import ImageClassifier


def _loader(seed: int, n: int = 256) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=32)


def _model() -> ImageClassifier:
    model = ImageClassifier(arch="resnet", lr=1e-3)  # the ResidualCNN
    model.example_input_array = torch.zeros(2, 1, 28, 28)
    return model


def _fit(args: argparse.Namespace, callbacks: list[Any], folder: str) -> ImageClassifier:
    model = _model()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_epochs=2,
        default_root_dir=folder,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, _loader(0), _loader(1, 64))
    return model


def check_pruning(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    pruning = IterativePruningCallback(target_sparsity=0.8, end_step=8, update_every_n_steps=2, verbose=False)
    model = _fit(args, [pruning], folder)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    channel = IterativePruningCallback(
        target_sparsity=0.5, structure="channel", end_step=8, update_every_n_steps=2, verbose=False
    )
    _fit(args, [channel], folder)
    return {
        "unstructured_sparsity": pruning.results["sparsity"],
        "zeroed_weights": zeros,
        "weights_on": str(weights[0].device),
        "channel_sparsity": channel.results["channel_sparsity"],
        "compact_speedup_b1": channel.results.get("compact/speedup/batch_1"),
    }


def check_qat(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    qat = QATCallback(start=2, monitor="val_acc", latency="eager", latency_batch_sizes=[1, 32], verbose=False)
    _fit(args, [qat], folder)
    return {k: qat.results[k] for k in ("backend", "top1_agreement", "size_ratio") if k in qat.results}


def check_ptq(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    ptq = PostTrainingQuantCallback(monitor="val_acc", latency="eager", latency_batch_sizes=[1, 32], verbose=False)
    _fit(args, [ptq], folder)
    return {k: ptq.results[k] for k in ("backend", "top1_agreement", "size_ratio", "val_acc_drop") if k in ptq.results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device here: run this on a GPU machine, or pass --device cpu.")
        return
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    quiet_lightning()
    env = environment()
    env["device"] = torch.cuda.get_device_name(0) if args.device == "cuda" else env["cpu"]
    print(f"Device: {env['device']}, precision {args.precision}, torch {env['torch']}", flush=True)
    checks: dict[str, Callable[[argparse.Namespace, str], dict[str, Any]]] = {
        "pruning": check_pruning,
        "qat": check_qat,
        "ptq": check_ptq,
    }
    results: dict[str, Any] = {}
    for name, check in checks.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"lc_{name}_") as folder:
            try:
                results[name] = {"ok": True, **check(args, folder)}
            except Exception as err:  # report every check, not only the first failure
                results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                traceback.print_exc()
        results[name]["seconds"] = time.perf_counter() - start
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} {results[name]}", flush=True)
    out = BENCH_DIR / f"gpu_check_results_{args.device}.json"
    out.write_text(json.dumps({"environment": env, "precision": args.precision, "results": results}, indent=2))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
