"""Mask updates at scale: time and transient memory of one global magnitude update, before and after the radix select.

python bench/pruning_scale.py [--sizes 10 50] [--repeats 3]

For a stack of square ``nn.Linear`` layers with ``--sizes`` million weights, each measurement runs in a fresh
process (1 thread) so its peak resident memory (``ru_maxrss``) belongs to it alone:

* ``kthvalue`` — the previous method: flat float scores of every weight, concatenated, ``torch.kthvalue`` on a CPU
  copy (what ``compute_masks`` did before ``engine.distributed``);
* ``radix`` — ``compute_masks`` now: ``int32`` keys per tensor, two histogram passes, no concatenation.

Reported: median seconds per update, nanoseconds per weight, and the peak memory above the model's own, in bytes
per weight; and the steady training-step overhead of applied masks against dense. Writes
``bench/pruning_scale_results.json`` and the "pruning at scale" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from typing import Any

import torch
from _common import BENCH_DIR, environment, markdown_table, write_benchmarks_section
from torch import nn

RESULTS = BENCH_DIR / "pruning_scale_results.json"


def _model(million: int) -> dict[str, torch.Tensor]:
    width = 2048
    layers = max(1, round(million * 1e6 / width**2))
    torch.manual_seed(0)
    return {f"{i}.weight": nn.Linear(width, width, bias=False).weight.detach() for i in range(layers)}


def _kthvalue_update(weights: dict[str, torch.Tensor], sparsity: float) -> None:
    from lightning_compress.engine.masks import _lowest_k

    flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
    _lowest_k(flat, round(sparsity * flat.numel()))


def _radix_update(weights: dict[str, torch.Tensor], sparsity: float) -> None:
    from lightning_compress.engine.masks import compute_masks

    compute_masks(weights, sparsity)


def _measure(args: tuple[str, int, int]) -> dict[str, Any]:
    method, million, repeats = args
    torch.set_num_threads(1)
    weights = _model(million)
    numel = sum(w.numel() for w in weights.values())
    update = _kthvalue_update if method == "kthvalue" else _radix_update
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        update(weights, 0.9)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = statistics.median(times)
    return {
        "method": method,
        "weights": numel,
        "seconds": seconds,
        "ns_per_weight": 1e9 * seconds / numel,
        "transient_bytes_per_weight": (peak - before) / numel,
    }


def _step_overhead(args: tuple[int, int]) -> dict[str, Any]:
    """Median SGD step (batch 64) of a square Linear stack with masks re-applied by the post-hook and gradients
    masked, against the same stack dense; the two alternate step by step."""
    million, steps = args
    from lightning_compress.engine.config import PruningConfig
    from lightning_compress.engine.pruner import GradualPruner

    torch.set_num_threads(1)
    width = 2048
    layers = max(1, round(million * 1e6 / width**2))

    def stack() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

    dense, pruned = stack(), stack()
    weights = {n: p for n, p in pruned.named_parameters()}
    pruner = GradualPruner(weights, PruningConfig(target_sparsity=0.9, end_step=1).resolve(None))
    pruner.step(1)
    optimizers = {
        "dense": torch.optim.SGD(dense.parameters(), lr=1e-3),
        "pruned": torch.optim.SGD(pruned.parameters(), lr=1e-3),
    }
    optimizers["pruned"].register_step_post_hook(lambda *_: pruner.apply())
    x = torch.randn(64, width)
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for i in range(steps + 3):
        for name, model in (("dense", dense), ("pruned", pruned)):
            start = time.perf_counter()
            optimizers[name].zero_grad()
            model(x).square().mean().backward()
            if name == "pruned":
                pruner.mask_gradients()
            optimizers[name].step()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    dense_ms, pruned_ms = (1000 * statistics.median(times[k]) for k in ("dense", "pruned"))
    return {"weights": layers * width**2, "dense_ms": dense_ms, "pruned_ms": pruned_ms, "ratio": pruned_ms / dense_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50], help="model sizes in millions of weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per model for the step overhead")
    args = parser.parse_args()
    env = environment()
    print(f"CPU: {env['cpu']}, torch {env['torch']}, 1 thread")
    jobs = [(method, size, args.repeats) for size in args.sizes for method in ("kthvalue", "radix")]
    context = multiprocessing.get_context("spawn")
    results = []
    for job in jobs:  # one fresh process each, one at a time: peak memory is per method
        with context.Pool(1) as pool:
            result = pool.map(_measure, [job])[0]
        print(json.dumps(result))
        results.append(result)
    steps = []
    for size in args.sizes:
        with context.Pool(1) as pool:
            step = pool.map(_step_overhead, [(size, args.steps)])[0]
        print(json.dumps(step))
        steps.append(step)
    RESULTS.write_text(json.dumps({"environment": env, "results": results, "steps": steps}, indent=2) + "\n")
    rows = [
        (
            f"{r['weights'] / 1e6:.1f}M",
            r["method"],
            f"{r['seconds']:.2f}",
            f"{r['ns_per_weight']:.0f}",
            f"{r['transient_bytes_per_weight']:.1f}",
        )
        for r in results
    ]
    table = markdown_table(["weights", "method", "s / update", "ns / weight", "transient B / weight"], rows)
    section = (
        "## Pruning at scale: one global magnitude mask update\n\n"
        f"`python bench/pruning_scale.py --sizes {' '.join(map(str, args.sizes))}` ({env['cpu']}, 1 thread, median of"
        f" {args.repeats}, each row in a fresh process; transient memory = peak RSS above the model's).\n"
        "`kthvalue` is the method before `engine.distributed` (flat float scores, concatenated, sorted selection on a"
        " CPU copy); `radix` is `compute_masks` now (int32 keys per tensor, two histogram passes, the same exact"
        " masks; under FSDP2 the same code runs on local shards with two histogram all_reduces).\n\n"
        f"{table}\n\n"
        "Steady training step (SGD, batch 64, masks applied by the optimizer step post-hook and gradients masked, as"
        " the callback does), alternated with the same stack dense, medians:\n\n"
        + markdown_table(
            ["weights", "dense ms", "pruned ms", "ratio"],
            [
                (f"{r['weights'] / 1e6:.1f}M", f"{r['dense_ms']:.1f}", f"{r['pruned_ms']:.1f}", f"{r['ratio']:.3f}x")
                for r in steps
            ],
        )
        + "\n"
    )
    write_benchmarks_section("pruning-scale", section)
    print(section)


if __name__ == "__main__":
    main()
