"""Pruning benchmark: ``IterativePruningCallback`` vs Lightning's ``ModelPruning`` vs dense, on Fashion-MNIST.

What is compared (same data, epoch budget, seeds and cubic sparsity ramp for every method):

* **dense**: no pruning.
* **ours**: ``IterativePruningCallback``, global magnitude pruning over the Linear/Conv weights of ``model.net``,
  cubic ramp (Zhu & Gupta) from the end of the warm-up epochs to the start of the fine-tuning epochs, the mask
  updated every ``--update-every`` optimizer steps.
* **modelpruning**: ``lightning.pytorch.callbacks.ModelPruning`` with ``l1_unstructured``, global, on the same
  weights, lottery ticket off, pruning made permanent at the end. It prunes once per epoch (at the epoch end) and its
  ``amount`` is a fraction of the weights *still unpruned*, so the per-epoch amount is converted from the same cubic
  targets ``s(e)``: ``amount_e = (s(e) - s(e-1)) / (1 - s(e-1))``, which makes the cumulative sparsity follow the
  ramp instead of compounding. Its final measured sparsity is printed to check it equals the target.

Two phases:

1. Accuracy: every model x sparsity x method x seed (dense once per model and seed) is trained for ``--epochs``
   epochs with 1 thread (``--jobs`` runs in parallel processes), then tested on the 10k test images.
2. Step time: in this process only, with 1 thread, dense / ours (masks installed, mid-ramp: 50% → target) /
   ModelPruning (its ``weight_orig * weight_mask`` forward pre-hooks installed at the target) train short fits in
   alternating order for several rounds; a timing callback records every step and the medians are compared.

Results go to ``bench/pruning_results.json`` and the "pruning" section of ``docs/benchmarks.md``.

Usage::

    python bench/pruning.py                       # full run (see --help for the defaults)
    python bench/pruning.py --jobs 2              # the same, two training runs at a time
    python bench/pruning.py --quick               # smoke test in about a minute; writes pruning_results_quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `_common` when run from elsewhere
from _common import (
    BENCH_DIR,
    BENCHMARKS_MD,
    StepTimer,
    environment,
    markdown_table,
    quiet_lightning,
    run_parallel,
    summarize_times,
    write_benchmarks_section,
)

from lightning_compress import IterativePruningCallback
from lightning_compress.demos import FashionMNISTDataModule, ImageClassifier
from lightning_compress.engine.schedules import sparsity_at_step

METHODS = ("dense", "ours", "modelpruning")
LABELS = {"dense": "dense", "ours": "IterativePruningCallback", "modelpruning": "Lightning ModelPruning"}
MODEL_LABELS = {"mlp": "MLP 784-300-100-10", "lenet5": "LeNet-5", "resnet": "ResidualCNN"}
STEP_OVERHEAD_TARGET = 1.03
FULL_TRAIN_SIZE = 55_000  # Fashion-MNIST's 60k training images minus the default 5k validation split


@dataclass
class Config:
    """Everything that defines a benchmark run (saved in the JSON)."""

    models: list[str]
    sparsities: list[float]
    seeds: list[int]
    methods: list[str]
    epochs: int
    warmup_epochs: int  # dense epochs before the ramp starts
    finetune_epochs: int  # epochs at the target sparsity after the ramp ends
    update_every: int | None  # our mask update period in steps; None: ramp length // 100
    batch_size: int = 128
    lr: float = 1e-3
    train_subset: int | None = None
    test_subset: int | None = None
    timing_steps: int = 100  # steps per timed fit
    timing_rounds: int = 7  # alternating rounds of timed fits
    timing_sparsity: float = 0.9
    jobs: int = 1
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ramp:
    """The cubic sparsity ramp in optimizer steps, shared by both pruning methods."""

    steps_per_epoch: int
    start_step: int
    end_step: int
    update_every: int

    def target(self, step: int, sparsity: float) -> float:
        """Absolute target sparsity after ``step`` optimizer steps (the same function our callback uses)."""
        return sparsity_at_step(step, final_sparsity=sparsity, start_step=self.start_step, end_step=self.end_step)


def make_ramp(cfg: Config, steps_per_epoch: int) -> Ramp:
    """Ramp from the end of the warm-up epochs to the start of the fine-tuning epochs."""
    start = cfg.warmup_epochs * steps_per_epoch
    end = (cfg.epochs - cfg.finetune_epochs) * steps_per_epoch
    update_every = cfg.update_every or max(1, (end - start) // 100)
    return Ramp(steps_per_epoch, start, end, update_every)


def prunable_modules(model: ImageClassifier) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every Linear/Conv layer of ``model.net``: what both methods prune."""
    return [(m, "weight") for m in model.net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def count_zeros(model: ImageClassifier) -> tuple[int, int]:
    """``(exact zeros, total)`` over the prunable weights (read after ``ModelPruning`` made its pruning permanent)."""
    weights = [getattr(m, name) for m, name in prunable_modules(model)]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def measured_sparsity(model: ImageClassifier) -> float:
    """Fraction of exact zeros over the prunable weights."""
    zeros, total = count_zeros(model)
    return zeros / total


def modelpruning_amount(ramp: Ramp, sparsity: float) -> Callable[[int], float]:
    """``ModelPruning``'s ``amount(epoch)``: the fraction of the *remaining* weights to prune at that epoch's end.

    At the end of epoch ``e`` (0-based) the Trainer has taken ``(e + 1) * steps_per_epoch`` steps; the cumulative
    target there is the cubic ``s(e)``, so ``(s(e) - s(e-1)) / (1 - s(e-1))`` of the remaining weights go.
    """

    def amount(epoch: int) -> float:
        now = ramp.target((epoch + 1) * ramp.steps_per_epoch, sparsity)
        before = ramp.target(epoch * ramp.steps_per_epoch, sparsity)
        return (now - before) / (1.0 - before)

    return amount


def method_callbacks(method: str, model: ImageClassifier, sparsity: float, ramp: Ramp) -> list[Callback]:
    """The callbacks that implement ``method`` for one training run."""
    if method == "dense":
        return []
    if method == "ours":
        return [
            IterativePruningCallback(
                target_sparsity=sparsity,
                schedule="cubic",
                initial_sparsity=0.0,
                start_step=ramp.start_step,
                end_step=ramp.end_step,
                update_every_n_steps=ramp.update_every,
                scope="global",
                structure="unstructured",
                criterion="magnitude",
                verbose=False,
            )
        ]
    if method == "modelpruning":
        return [
            ModelPruning(
                pruning_fn="l1_unstructured",
                parameters_to_prune=prunable_modules(model),
                use_global_unstructured=True,
                amount=modelpruning_amount(ramp, sparsity),
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=True,
                verbose=0,
            )
        ]
    raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {method!r}.")


def make_trainer(callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """A quiet single-CPU Trainer without validation, logging or checkpoints."""
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=callbacks,
        **kwargs,
    )


def make_datamodule(cfg: Config, seed: int, train_subset: int | None = None) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        batch_size=cfg.batch_size,
        train_subset=train_subset or cfg.train_subset,
        test_subset=cfg.test_subset,
        seed=seed,
    )
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------------------------------------------------
# Phase 1: accuracy
# ----------------------------------------------------------------------------------------------------------------------
def run_accuracy(job: tuple[Config, str, str, float, int]) -> dict[str, Any]:
    """Train and test one model with one method; runs in a worker process when ``--jobs > 1``."""
    cfg, arch, method, sparsity, seed = job
    torch.set_num_threads(1)
    quiet_lightning()
    seed_everything(seed, workers=True, verbose=False)
    dm = make_datamodule(cfg, seed)
    ramp = make_ramp(cfg, len(dm.train_dataloader()))
    model = ImageClassifier(arch=arch, lr=cfg.lr)
    trainer = make_trainer(method_callbacks(method, model, sparsity, ramp), max_epochs=cfg.epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - start
    (test,) = trainer.test(model, datamodule=dm, verbose=False)
    zeros, total = count_zeros(model)
    result = {
        "model": arch,
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "test_acc": float(test["test_acc"]),
        "test_loss": float(test["test_loss"]),
        "measured_sparsity": zeros / total,
        "zero_weights": zeros,
        "prunable_weights": total,
        "fit_seconds": fit_seconds,
        "steps": trainer.global_step,
        "ramp": asdict(ramp),
    }
    print(
        f"  {arch:7s} {method:13s} target {sparsity:.2f} seed {seed}: test_acc {result['test_acc']:.4f}, "
        f"measured sparsity {result['measured_sparsity']:.4f}, fit {fit_seconds:.1f} s",
        flush=True,
    )
    return result


def accuracy_jobs(cfg: Config) -> list[tuple[Config, str, str, float, int]]:
    jobs = []
    for arch in cfg.models:
        for seed in cfg.seeds:
            if "dense" in cfg.methods:
                jobs.append((cfg, arch, "dense", 0.0, seed))
            for sparsity in cfg.sparsities:
                jobs += [(cfg, arch, m, sparsity, seed) for m in cfg.methods if m != "dense"]
    return jobs


def summarize_accuracy(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread of test accuracy and sparsity over seeds, per model x method x sparsity."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["method"], run["sparsity"]), []).append(run)
    summary = []
    for (arch, method, sparsity), group in groups.items():
        accs = [r["test_acc"] for r in group]
        summary.append(
            {
                "model": arch,
                "method": method,
                "sparsity": sparsity,
                "seeds": [r["seed"] for r in group],
                "test_acc_mean": statistics.fmean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "measured_sparsity_mean": statistics.fmean(r["measured_sparsity"] for r in group),
            }
        )
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Phase 2: step time
# ----------------------------------------------------------------------------------------------------------------------
class _KeepOptimizer(ImageClassifier):
    """``ImageClassifier`` whose optimizer, with its Adam moments, carries over from one ``fit`` to the next.

    Short timed fits would otherwise start from fresh, all-zero Adam moments: the pruned weights' second moments
    would then stay exactly 0, which is unlike real training (pruning starts after dense epochs) and slower here:
    ``sqrt(0)`` costs several times ``sqrt(x > 0)`` on AVX-512 CPUs.
    """

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kept: torch.optim.Optimizer | None = getattr(self, "_kept_optimizer", None)
        if kept is None:
            kept = super().configure_optimizers()
            self._kept_optimizer = kept
        return kept


def measure_step_times(cfg: Config, arch: str) -> dict[str, Any]:
    """Median training-step time of dense / ours / ModelPruning for ``arch``, measured alternately in this process.

    Each variant keeps its own model and optimizer across short fits (one epoch of ``timing_steps`` steps each).
    Warm-up: one dense fit per variant (fills Adam's moments and the caches), then one fit that lets
    ``ModelPruning`` prune to ``timing_sparsity`` at its epoch end with ``make_pruning_permanent=False``, so its
    reparametrization hooks stay installed for the timed fits (which prune nothing more). Ours runs mid-ramp in every
    fit: cubic from 50% to ``timing_sparsity`` over the fit, masks updated every ``update_every`` steps as in a
    full-data training run. The timed rounds rotate the order of the variants.
    """
    torch.set_num_threads(1)
    variants = [m for m in METHODS if m in cfg.methods]
    dm = make_datamodule(cfg, seed=0, train_subset=cfg.timing_steps * cfg.batch_size)
    steps = len(dm.train_dataloader())
    # The update period of a full-data run (also with --quick, whose tiny epochs would otherwise update every step).
    update_every = make_ramp(cfg, math.ceil(FULL_TRAIN_SIZE / cfg.batch_size)).update_every
    timers = {v: StepTimer(skip=3) for v in variants}
    models: dict[str, ImageClassifier] = {}
    for v in variants:
        seed_everything(0, verbose=False)
        models[v] = _KeepOptimizer(arch=arch, lr=cfg.lr)
    sparsity = cfg.timing_sparsity

    def callbacks(variant: str, install: bool) -> list[Callback]:
        if variant == "ours":
            assert IterativePruningCallback is not None
            ours = IterativePruningCallback(
                target_sparsity=sparsity,
                initial_sparsity=0.5,
                start_step=0,
                end_step=steps,
                update_every_n_steps=update_every,
                verbose=False,
            )
            return [ours, timers[variant]]
        if variant == "modelpruning":
            mp = ModelPruning(
                "l1_unstructured",
                parameters_to_prune=prunable_modules(models[variant]),
                amount=sparsity if install else 0,
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=False,
            )
            return [mp, timers[variant]]
        return [timers[variant]]

    for v in variants:
        make_trainer([timers[v]], max_epochs=1).fit(models[v], datamodule=dm)  # dense warm-up
        make_trainer(callbacks(v, install=True), max_epochs=1).fit(models[v], datamodule=dm)
        timers[v].times.clear()
    if "modelpruning" in variants:
        assert hasattr(models["modelpruning"].net.fc1, "weight_mask"), "ModelPruning's hooks should be installed"
    for r in range(cfg.timing_rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            make_trainer(callbacks(v, install=False), max_epochs=1).fit(models[v], datamodule=dm)
    result: dict[str, Any] = {
        "steps_per_fit": steps,
        "rounds": cfg.timing_rounds,
        "sparsity": sparsity,
        "ours_update_every": update_every,
    }
    for v in variants:
        result[v] = summarize_times(timers[v].times)
    if "dense" in variants:
        for v in variants:
            result[v]["ratio_vs_dense"] = result[v]["median_ms"] / result["dense"]["median_ms"]
            result[v]["mean_ratio_vs_dense"] = result[v]["mean_ms"] / result["dense"]["mean_ms"]
    if "modelpruning" in variants:
        sparsity_mp = measured_sparsity(models["modelpruning"])
        result["modelpruning"]["measured_sparsity"] = sparsity_mp
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------
def accuracy_table(summary: list[dict[str, Any]]) -> str:
    baseline_acc = {(s["model"], s["sparsity"]): s["test_acc_mean"] for s in summary if s["method"] == "modelpruning"}
    rows = []
    order = {m: i for i, m in enumerate(METHODS)}
    model_order = {m: i for i, m in enumerate(MODEL_LABELS)}
    for s in sorted(summary, key=lambda s: (model_order.get(s["model"], 9), s["sparsity"], order[s["method"]])):
        baseline = baseline_acc.get((s["model"], s["sparsity"]))
        delta = "" if baseline is None or s["method"] != "ours" else f"{100 * (s['test_acc_mean'] - baseline):+.2f}"
        rows.append(
            [
                MODEL_LABELS.get(s["model"], s["model"]),
                f"{s['sparsity']:.0%}",
                LABELS[s["method"]],
                f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}",
                f"{s['measured_sparsity_mean']:.4f}",
                delta,
            ]
        )
    headers = ["model", "target", "method", "test acc % (mean ± sd)", "measured sparsity", "vs ModelPruning (pp)"]
    return markdown_table(headers, rows, align="lrlrrr")


def timing_table(timing: dict[str, dict[str, Any]]) -> str:
    rows = []
    for arch, t in timing.items():
        row = [MODEL_LABELS.get(arch, arch)]
        for v in METHODS:
            if v in t:
                ratio = f" ({t[v]['ratio_vs_dense']:.3f}x)" if "ratio_vs_dense" in t[v] else ""
                row.append(f"{t[v]['median_ms']:.2f}{ratio}")
            else:
                row.append("n/a")
        rows.append(row)
    headers = ["model", "dense ms/step", "ours ms/step (vs dense)", "ModelPruning ms/step (vs dense)"]
    return markdown_table(headers, rows)


def target_lines(summary: list[dict[str, Any]], timing: dict[str, dict[str, Any]]) -> list[str]:
    """One line per target of the issue: met or not, with the numbers."""
    acc = {(s["model"], s["method"], s["sparsity"]): s["test_acc_mean"] for s in summary}
    lines = []
    for (arch, method, sparsity), value in sorted(acc.items()):
        baseline = acc.get((arch, "modelpruning", sparsity))
        if method == "ours" and baseline is not None:
            verdict = "met" if value >= baseline else "NOT met"
            lines.append(
                f"- accuracy ≥ ModelPruning, {arch} at {sparsity:.0%}: {100 * value:.2f}% vs {100 * baseline:.2f}%"
                f" — {verdict}"
            )
    for arch, t in timing.items():
        if "ours" in t and "ratio_vs_dense" in t["ours"]:
            ratio = t["ours"]["ratio_vs_dense"]
            verdict = "met" if ratio <= STEP_OVERHEAD_TARGET else "NOT met"
            lines.append(f"- step time ≤ {STEP_OVERHEAD_TARGET}x dense, {arch}: {ratio:.3f}x — {verdict}")
    return lines


def command_line(cfg: Config) -> str:
    """The command that reproduces ``cfg``."""
    parts = ["python bench/pruning.py"] + (["--quick"] if cfg.quick else [])
    parts += [
        f"--epochs {cfg.epochs}",
        f"--warmup-epochs {cfg.warmup_epochs}",
        f"--finetune-epochs {cfg.finetune_epochs}",
    ]
    parts += [f"--update-every {cfg.update_every}"] if cfg.update_every else []
    parts += ["--seeds " + " ".join(map(str, cfg.seeds)), "--models " + " ".join(cfg.models)]
    parts += ["--sparsities " + " ".join(f"{s:g}" for s in cfg.sparsities), f"--jobs {cfg.jobs}"]
    parts += [f"--timing-steps {cfg.timing_steps}", f"--timing-rounds {cfg.timing_rounds}"]
    return " ".join(parts)


def benchmarks_section(cfg: Config, env: dict[str, Any], summary: list[dict[str, Any]], timing: dict) -> str:
    train = f"{cfg.train_subset:,}" if cfg.train_subset else "55k"
    test = f"{cfg.test_subset:,}" if cfg.test_subset else "10k"
    json_name = Path(cfg.extra["json"]).name
    return "\n".join(
        [
            "## Pruning: IterativePruningCallback vs Lightning ModelPruning",
            "",
            *(["**Quick smoke run: tiny data, not a result.**", ""] if cfg.quick else []),
            f"Regenerate with `{command_line(cfg)}` (raw results: `bench/{json_name}`).",
            "",
            f"Fashion-MNIST ({train} train, {test} test images), Adam lr {cfg.lr:g}, batch {cfg.batch_size}, "
            f"{cfg.epochs} epochs: "
            f"{cfg.warmup_epochs} dense, a cubic ramp to the target over the next "
            f"{cfg.epochs - cfg.warmup_epochs - cfg.finetune_epochs}, then {cfg.finetune_epochs} at the target. "
            "Global magnitude (L1) pruning of every Linear/Conv weight, biases untouched. Ours updates the mask "
            "every few optimizer steps; `ModelPruning` prunes at each epoch end with its `amount` converted to a "
            "fraction of the remaining weights so that it follows the same cubic targets (lottery ticket off, "
            f"pruning made permanent at the end). Methods: {', '.join(cfg.methods)}. "
            f"Seeds {', '.join(map(str, cfg.seeds))}; "
            f"1 thread per run; {env['cpu']}, torch {env['torch']}, lightning {env['lightning']}, {env['date']}.",
            "",
            accuracy_table(summary),
            "",
            f"Training-step time, median over {cfg.timing_rounds} alternating rounds of {cfg.timing_steps}-step fits "
            f"in one process with 1 thread (ours mid-ramp with its masks installed; ModelPruning with its "
            f"`weight_orig * weight_mask` hooks installed at {cfg.timing_sparsity:.0%}):",
            "",
            timing_table(timing),
            "",
            "Targets:",
            "",
            *target_lines(summary, timing),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 12; quick: 4)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="dense epochs before the ramp (default 1)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="epochs at the target (default 3; quick 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=["mlp", "lenet5", "resnet"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--update-every", type=int, default=None, help="our mask update period (default ramp/100)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes (phase 1 only)")
    parser.add_argument("--timing-steps", type=int, default=None, help="steps per timed fit (default 100; quick 20)")
    parser.add_argument("--timing-rounds", type=int, default=None, help="alternating rounds (default 7; quick 2)")
    parser.add_argument("--skip-timing", action="store_true", help="only the accuracy phase (no markdown update)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the step-time phase (no markdown update)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1024 train / 1000 test images, 4 epochs")
    parser.add_argument("--json", type=Path, default=None, help="results file (default bench/pruning_results.json)")
    parser.add_argument(
        "--add-runs",
        type=Path,
        default=None,
        help="an earlier results JSON (other seeds): its training runs join this run's, and its step times are"
        " reused when --skip-timing is given (so seeds can be run in separate sessions)",
    )
    parser.add_argument("--benchmarks-md", type=Path, default=None, help="markdown file to update (quick: none)")
    args = parser.parse_args(argv)
    quick = args.quick
    cfg = Config(
        models=args.models,
        sparsities=args.sparsities,
        seeds=args.seeds if args.seeds is not None else ([0] if quick else [0, 1]),
        methods=[m for m in METHODS if m in args.methods],
        epochs=args.epochs if args.epochs is not None else (4 if quick else 12),
        warmup_epochs=args.warmup_epochs,
        finetune_epochs=args.finetune_epochs if args.finetune_epochs is not None else (1 if quick else 3),
        update_every=args.update_every,
        train_subset=1024 if quick else None,
        test_subset=1000 if quick else None,
        timing_steps=args.timing_steps or (20 if quick else 100),
        timing_rounds=args.timing_rounds or (2 if quick else 7),
        timing_sparsity=0.9 if 0.9 in args.sparsities else args.sparsities[0],
        jobs=args.jobs,
        quick=quick,
    )
    if cfg.epochs - cfg.warmup_epochs - cfg.finetune_epochs < 1:
        parser.error("`--epochs` must exceed `--warmup-epochs` + `--finetune-epochs` so the ramp has an epoch.")
    default_json = BENCH_DIR / ("pruning_results_quick.json" if quick else "pruning_results.json")
    cfg.extra = {
        "json": str(args.json or default_json),
        "benchmarks_md": str(args.benchmarks_md or ("" if quick else BENCHMARKS_MD)),
        "skip_timing": args.skip_timing,
        "skip_accuracy": args.skip_accuracy,
        "add_runs": str(args.add_runs or ""),
    }
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(1)
    env = environment()
    start = time.perf_counter()

    jobs = [] if cfg.extra["skip_accuracy"] else accuracy_jobs(cfg)
    print(f"Phase 1: {len(jobs)} training runs, {cfg.epochs} epochs each, {cfg.jobs} at a time", flush=True)
    runs = run_parallel(run_accuracy, jobs, cfg.jobs)
    accuracy_seconds = time.perf_counter() - start
    earlier: dict[str, Any] = json.loads(Path(cfg.extra["add_runs"]).read_text()) if cfg.extra["add_runs"] else {}
    runs += [run for run in earlier.get("runs", []) if run not in runs]
    if earlier:
        cfg.seeds = sorted({run["seed"] for run in runs})
    summary = summarize_accuracy(runs)
    for run in runs:  # check that the converted per-epoch amounts reach the target instead of compounding
        if run["method"] == "modelpruning":
            off = run["zero_weights"] - round(run["sparsity"] * run["prunable_weights"])
            print(
                f"ModelPruning {run['model']} seed {run['seed']}: final sparsity {run['measured_sparsity']:.5f}, "
                f"target {run['sparsity']} ({off:+d} weights from the target count)"
            )

    timing: dict[str, dict[str, Any]] = {}
    if cfg.extra["skip_timing"]:
        timing = earlier.get("step_time", {})
    else:
        print(f"Phase 2: step times, {cfg.timing_rounds} rounds x {cfg.timing_steps} steps, 1 process", flush=True)
        for arch in cfg.models:
            timing[arch] = measure_step_times(cfg, arch)
    total_seconds = time.perf_counter() - start

    print()
    print(accuracy_table(summary))
    print()
    if timing:
        print(timing_table(timing))
        print()
    print("\n".join(target_lines(summary, timing)))
    print(f"\nPhase 1 {accuracy_seconds:.0f} s, total {total_seconds:.0f} s")

    results = {
        "config": asdict(cfg),
        "environment": env,
        "runs": runs,
        "summary": summary,
        "step_time": timing,
        "seconds": {"accuracy": accuracy_seconds, "total": total_seconds},
    }
    json_path = Path(cfg.extra["json"])
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {json_path}")
    if cfg.extra["skip_accuracy"] or not timing:
        print("A phase was skipped: docs/benchmarks.md left as it is.")
    elif cfg.extra["benchmarks_md"]:
        md_path = Path(cfg.extra["benchmarks_md"])
        write_benchmarks_section("pruning", benchmarks_section(cfg, env, summary, timing), md_path)
        print(f"Updated the pruning section of {md_path}")


if __name__ == "__main__":
    main()
