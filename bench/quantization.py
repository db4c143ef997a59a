"""Quantization benchmark: fp32 vs ``QATCallback`` vs ``PostTrainingQuantCallback`` on Fashion-MNIST conv nets.

What is compared, for LeNet-5 and the small residual CNN (``ImageClassifier("lenet5")`` / ``("resnet")``), with the
same data, epoch budget, optimizer and seeds:

* **fp32**: plain float training for ``--epochs`` epochs.
* **QAT**: the same budget with ``QATCallback`` on ``model.net``: float for ``--qat-start`` epochs, then fake
  quantization (per-channel int8 weights, per-tensor uint8 inputs), BatchNorm statistics frozen at
  ``--qat-freeze-bn`` and observers at ``--qat-freeze-observers`` (default: the last two epochs, as torchvision's
  recipe freezes them at epochs 3 and 4 of its fine-tuning). At fit end the callback converts a copy to a real
  int8 program and measures it with the model's own validation step: its ``results`` give the fake-quant and
  int8 accuracy and their top-1 agreement.
* **PTQ**: static post-training quantization of each fp32 model by ``PostTrainingQuantCallback`` (standalone, on
  ``trainer.validate``), once per activation observer (min/max, moving average, histogram), calibrated on 32 training
  batches; each once without and once with the accuracy-aware fallback (``max_accuracy_drop``).

Three phases:

1. Accuracy (``--jobs`` processes, 1 thread each): one fp32 and one QAT training run per model x seed; the PTQ
   variants run on the trained fp32 model in the same process. Accuracies are on the 5k validation images the
   callbacks measure on (held out from training, never used for model selection).
2. QAT training-step overhead (this process, 1 thread): fp32 and QAT (fake quantization on, observers moving) train
   short fits in alternating order for several rounds; the medians of the per-step wall times are compared.
3. Latency (this process, 1 thread): fp32 eager and ``torch.compile``d vs the int8 programs of seed ``seeds[0]``
   run eagerly and compiled with Inductor (``compile_int8``: the real int8 kernels), at batch 1 and 64, each pair
   alternated by ``engine.measure.compare_latency`` after warm-up; medians and their ratios.

Results go to ``bench/quantization_results.json`` and the "quantization" section of ``docs/benchmarks.md``; the MiniLM
numbers of ``bench/minilm_results.json`` (written by ``examples/``'s PTQ MiniLM example) are folded in when present.

Usage::

    python bench/quantization.py --jobs 2         # full run (see --help for the defaults)
    python bench/quantization.py --quick          # smoke test in a few minutes; writes quantization_results_quick.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback

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

from lightning_compress import PostTrainingQuantCallback, QATCallback
from lightning_compress.demos import FashionMNISTDataModule, ImageClassifier
from lightning_compress.engine.convert import compile_int8, load_quantized, model_size_bytes
from lightning_compress.engine.measure import compare_latency

MODEL_LABELS = {"lenet5": "LeNet-5", "resnet": "ResidualCNN"}
OBSERVERS = ("minmax", "moving_average", "histogram")
MONITOR = "val_acc"
# Targets of issues 3 and 4.
QAT_DROP_TARGET_PT = 0.3
PTQ_DROP_TARGET_PT = 0.5
AGREEMENT_TARGET = 0.995
STEP_OVERHEAD_TARGET = 1.5
SPEEDUP_TARGET = 2.5  # int8 compiled vs fp32 eager, batch 64
SIZE_RATIO_TARGET = 0.3
MINILM_JSON = BENCH_DIR / "minilm_results.json"


@dataclass
class Config:
    """Everything that defines a benchmark run (saved in the JSON)."""

    models: list[str]
    seeds: list[int]
    epochs: int
    qat_start: int  # epoch at which fake quantization starts
    qat_freeze_bn: int | None
    qat_freeze_observers: int | None
    observers: list[str]
    max_accuracy_drop: float  # the fallback rows' budget, in percentage points of val_acc
    calibration_batches: int = 32
    batch_size: int = 128
    lr: float = 1e-3
    train_subset: int | None = None
    val_size: int = 5000
    timing_steps: int = 40  # steps per timed fit
    timing_rounds: int = 5  # alternating rounds of timed fits
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    latency_variants: list[str] = field(default_factory=lambda: ["qat", "ptq"])
    latency_warmup: int = 5
    latency_repeats: int = 30
    jobs: int = 1
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def make_trainer(callbacks: list[Callback], epochs: int = 1, **kwargs: Any) -> Trainer:
    """A quiet single-CPU Trainer without logging or checkpoints (validation only after the last epoch)."""
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
        max_epochs=epochs,
        deterministic=True,
        callbacks=callbacks,
        **kwargs,
    )


def make_datamodule(cfg: Config, seed: int, train_subset: int | None = None) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        batch_size=cfg.batch_size,
        val_size=cfg.val_size,
        train_subset=train_subset or cfg.train_subset,
        seed=seed,
    )
    dm.setup("fit")
    return dm


def qat_callback(cfg: Config, save_path: str | None, convert: bool = True, steady: bool = False) -> QATCallback:
    """The QAT callback of the accuracy runs; ``steady``: fake quantization from the first step, nothing frozen."""
    return QATCallback(
        start=0 if steady else cfg.qat_start,
        freeze_bn_at=None if steady else cfg.qat_freeze_bn,
        freeze_observers_at=None if steady else cfg.qat_freeze_observers,
        schedule_unit="epoch",
        module="net",
        monitor=MONITOR,
        convert_on_fit_end=convert,
        save_path=save_path,
        latency="off",  # timed in phase 3, alone on the machine instead of next to another training run
        verbose=False,
    )


def tensor_bytes(pt2_path: str) -> int:
    """Bytes of the tensors stored in a ``.pt2`` archive (without the serialized graph and the zip overhead)."""
    with zipfile.ZipFile(pt2_path) as archive:
        return sum(
            info.file_size
            for info in archive.infolist()
            if "/data/weights/" in info.filename or "/data/constants/" in info.filename
            if not info.filename.endswith(".json")
        )


def _numbers(results: dict[str, Any]) -> dict[str, Any]:
    """The callback results worth keeping in the JSON (per-layer scales and SQNR included; they are small)."""
    return {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in results.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Phase 1: accuracy
# ----------------------------------------------------------------------------------------------------------------------
def run_job(job: tuple[Config, str, str, int]) -> dict[str, Any]:
    """One training run (``kind`` ``"fp32"``, followed by its PTQ variants, or ``"qat"``); runs in a worker process."""
    cfg, arch, kind, seed = job
    cache = Path(cfg.extra["workdir"]) / f"run_{arch}_{kind}_seed{seed}.json"
    if cfg.extra["resume_workdir"] and cache.exists():
        return json.loads(cache.read_text())
    result = _run_job(cfg, arch, kind, seed)
    cache.write_text(json.dumps(result, indent=2))
    return result


def _run_job(cfg: Config, arch: str, kind: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    quiet_lightning()
    seed_everything(seed, workers=True, verbose=False)
    dm = make_datamodule(cfg, seed)
    model = ImageClassifier(arch=arch, lr=cfg.lr)
    workdir = Path(cfg.extra["workdir"])
    stem = f"{arch}_seed{seed}"
    callbacks: list[Callback] = []
    qat = None
    if kind == "qat":
        qat = qat_callback(cfg, str(workdir / f"{stem}_qat.pt2"))
        callbacks.append(qat)
    trainer = make_trainer(callbacks, epochs=cfg.epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "model": arch,
        "kind": kind,
        "seed": seed,
        MONITOR: float(trainer.callback_metrics[MONITOR]),  # the last validation (fake-quant model for QAT)
        "fit_seconds": seconds,
        "steps": trainer.global_step,
    }
    if qat is not None:
        result["qat"] = _numbers(qat.results)
        result["qat"]["int8_tensor_bytes"] = tensor_bytes(str(qat.results["saved_to"]))
        result["fp32_parameter_bytes"] = sum(t.numel() * t.element_size() for t in model.net.state_dict().values())
        print(
            f"  {arch:6s} QAT  seed {seed}: fake-quant {100 * qat.results[f'fake_quant_{MONITOR}']:.2f}%, "
            f"int8 {100 * qat.results[f'int8_{MONITOR}']:.2f}%, agreement {100 * qat.results['top1_agreement']:.2f}%,"
            f" fit {seconds:.0f} s",
            flush=True,
        )
        return result
    fp32_path = workdir / f"{stem}_fp32.pt"
    torch.save(model.net.state_dict(), fp32_path)
    result["fp32_path"] = str(fp32_path)
    result["fp32_bytes"] = model_size_bytes(model.net)
    print(f"  {arch:6s} fp32 seed {seed}: {100 * result[MONITOR]:.2f}%, fit {seconds:.0f} s", flush=True)
    result["ptq"] = [run_ptq(cfg, model, dm, stem, obs, fb) for obs in cfg.observers for fb in (False, True)]
    return result


def run_ptq(
    cfg: Config, model: ImageClassifier, dm: FashionMNISTDataModule, stem: str, observer: str, fallback: bool
) -> dict[str, Any]:
    """Static PTQ of the trained fp32 ``model`` with one observer, standalone on ``trainer.validate``."""
    path = Path(cfg.extra["workdir"]) / f"{stem}_ptq_{observer}{'_fallback' if fallback else ''}.pt2"
    ptq = PostTrainingQuantCallback(
        mode="static",
        calibration_batches=cfg.calibration_batches,
        observer=observer,
        calibration_data="train",
        module="net",
        monitor=MONITOR,
        # the budget is in points of the metric as logged: val_acc is a fraction, the config is in percentage points
        max_accuracy_drop=cfg.max_accuracy_drop / 100.0 if fallback else None,
        save_path=str(path),
        latency="off",
        verbose=False,
    )
    before = copy.deepcopy(model.net.state_dict())
    start = time.perf_counter()
    make_trainer([ptq]).validate(model, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - start
    unchanged = all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
    results = _numbers(ptq.results)
    results["int8_tensor_bytes"] = tensor_bytes(str(path))
    print(
        f"  {stem} PTQ {observer:14s} fallback={bool(fallback)!s:5s}: int8 {100 * results[f'int8_{MONITOR}']:.2f}%, "
        f"float layers [{results.get('float_layers', '')}], {seconds:.0f} s",
        flush=True,
    )
    return {
        "observer": observer,
        "fallback": bool(fallback),
        "results": results,
        "attempts": json.loads(json.dumps([dataclasses.asdict(a) for a in ptq.attempts])),
        "seconds": seconds,
        "float_model_unchanged": unchanged,
        "path": str(path),
    }


def accuracy_jobs(cfg: Config) -> list[tuple[Config, str, str, int]]:
    """The slowest jobs first (the residual CNN, then the QAT runs), so the pool ends with short ones."""
    order = {"resnet": 0, "lenet5": 1}
    jobs = [(cfg, arch, kind, seed) for arch in cfg.models for seed in cfg.seeds for kind in ("qat", "fp32")]
    return sorted(jobs, key=lambda j: (order.get(j[1], 2), j[3]))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: means over seeds of every accuracy, drop, agreement and size (in %, percentage points, bytes)."""
    summary: dict[str, dict[str, Any]] = {}
    for arch in cfg.models:
        fp32 = {r["seed"]: r for r in runs if r["model"] == arch and r["kind"] == "fp32"}
        qat = {r["seed"]: r for r in runs if r["model"] == arch and r["kind"] == "qat"}
        seeds = sorted(set(fp32) & set(qat))
        fp32_acc = [100 * fp32[s][MONITOR] for s in seeds]
        fq_acc = [100 * qat[s]["qat"][f"fake_quant_{MONITOR}"] for s in seeds]
        int8_acc = [100 * qat[s]["qat"][f"int8_{MONITOR}"] for s in seeds]
        s: dict[str, Any] = {
            "seeds": seeds,
            "fp32_acc": _mean_sd(fp32_acc),
            "qat_fake_quant_acc": _mean_sd(fq_acc),
            "qat_int8_acc": _mean_sd(int8_acc),
            # positive = int8 worse than fp32, averaged over seeds of (fp32 - int8) of the same seed
            "qat_int8_drop_vs_fp32_pt": statistics.fmean(a - b for a, b in zip(fp32_acc, int8_acc, strict=True)),
            "qat_agreement": _mean_sd([100 * qat[s]["qat"]["top1_agreement"] for s in seeds]),
            "qat_agreement_min": min(100 * qat[s]["qat"]["top1_agreement"] for s in seeds),
            "fp32_bytes": statistics.fmean(qat[s]["qat"]["float_bytes"] for s in seeds),
            "fp32_parameter_bytes": statistics.fmean(qat[s]["fp32_parameter_bytes"] for s in seeds),
            "qat_int8_bytes": statistics.fmean(qat[s]["qat"]["int8_bytes"] for s in seeds),
            "qat_size_ratio": statistics.fmean(qat[s]["qat"]["size_ratio"] for s in seeds),
            # what the ratio would be without the serialized graph (a fixed cost that dominates for tiny models)
            "qat_tensor_ratio": statistics.fmean(
                qat[s]["qat"]["int8_tensor_bytes"] / qat[s]["fp32_parameter_bytes"] for s in seeds
            ),
            "qat_conversion_seconds": statistics.fmean(qat[s]["qat"]["conversion_seconds"] for s in seeds),
            "ptq": {},
        }
        for observer in cfg.observers:
            for fallback in (False, True):
                rows = [
                    (seed, p) for seed in seeds for p in fp32[seed]["ptq"]
                    if p["observer"] == observer and p["fallback"] == fallback
                ]  # fmt: skip
                if not rows:
                    continue
                acc = [100 * p["results"][f"int8_{MONITOR}"] for _, p in rows]
                ref = [100 * fp32[seed][MONITOR] for seed, _ in rows]
                s["ptq"][f"{observer}{'+fallback' if fallback else ''}"] = {
                    "observer": observer,
                    "fallback": fallback,
                    "int8_acc": _mean_sd(acc),
                    "drop_vs_fp32_pt": statistics.fmean(a - b for a, b in zip(ref, acc, strict=True)),
                    "drop_max_pt": max(a - b for a, b in zip(ref, acc, strict=True)),
                    "agreement": _mean_sd([100 * float(p["results"].get("top1_agreement", "nan")) for _, p in rows]),
                    "int8_bytes": statistics.fmean(float(p["results"]["int8_bytes"]) for _, p in rows),
                    "size_ratio": statistics.fmean(float(p["results"]["size_ratio"]) for _, p in rows),
                    "float_layers": [str(p["results"].get("float_layers", "")) for _, p in rows],
                    "attempts": [p["results"].get("attempts") for _, p in rows],
                    "float_model_unchanged": all(p["float_model_unchanged"] for _, p in rows),
                    "seconds": statistics.fmean(p["seconds"] for _, p in rows),
                }
        summary[arch] = s
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Phase 2: QAT training-step overhead
# ----------------------------------------------------------------------------------------------------------------------
def measure_step_overhead(cfg: Config, arch: str) -> dict[str, Any]:
    """Median training-step time of fp32 and QAT for ``arch``, alternating short fits in this process.

    Each variant keeps its model across fits (the QAT one is prepared once, in the first fit's ``setup``; later
    fits find it prepared). QAT fits run with fake quantization on and the observers moving (the steady state of
    QAT before freezing) and without the fit-end conversion. One untimed fit per variant warms up; the timed rounds
    alternate the order of the two variants.
    """
    torch.set_num_threads(1)
    dm = make_datamodule(cfg, seed=0, train_subset=cfg.timing_steps * cfg.batch_size)
    timers = {v: StepTimer(skip=3) for v in ("fp32", "qat")}
    models = {}
    for v in timers:
        seed_everything(0, verbose=False)
        models[v] = ImageClassifier(arch=arch, lr=cfg.lr)

    def fit(variant: str) -> None:
        callbacks: list[Callback] = [timers[variant]]
        if variant == "qat":
            # (setting `start` on a built callback changes nothing: its schedule is made in __init__)
            callbacks.insert(0, qat_callback(cfg, None, convert=False, steady=True))
        make_trainer(callbacks, limit_val_batches=0).fit(models[variant], datamodule=dm)

    for v in timers:
        fit(v)
        timers[v].times.clear()
    variants = list(timers)
    for r in range(cfg.timing_rounds):
        for v in variants[r % 2 :] + variants[: r % 2]:
            fit(v)
    result: dict[str, Any] = {"steps_per_fit": len(dm.train_dataloader()), "rounds": cfg.timing_rounds}
    for v in variants:
        result[v] = summarize_times(timers[v].times)
    result["ratio"] = result["qat"]["median_ms"] / result["fp32"]["median_ms"]
    result["mean_ratio"] = result["qat"]["mean_ms"] / result["fp32"]["mean_ms"]
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Phase 3: latency
# ----------------------------------------------------------------------------------------------------------------------
def latency_variants(cfg: Config, runs: list[dict[str, Any]], arch: str) -> dict[str, str]:
    """The int8 artifacts of seed ``seeds[0]`` to time: QAT, one PTQ (the last observer) and any fallback mix.

    All static PTQ artifacts without float layers have the same graph (the observers only change the scales), so
    timing one of them is enough; a fallback artifact that kept layers in float is a different graph and is timed.
    """
    seed = cfg.seeds[0]
    variants: dict[str, str] = {}
    for r in runs:
        if r["model"] != arch or r["seed"] != seed:
            continue
        if r["kind"] == "qat":
            if "qat" in cfg.latency_variants:
                variants["QAT int8"] = r["qat"]["saved_to"]
        elif "ptq" in cfg.latency_variants:
            for p in r["ptq"]:
                if p["observer"] == cfg.observers[-1] and not p["fallback"]:
                    variants[f"PTQ int8 ({p['observer']})"] = p["path"]
                elif p["fallback"] and p["results"].get("float_layers"):
                    variants[f"PTQ int8 ({p['observer']}, fallback: {p['results']['float_layers']} float)"] = p["path"]
    return variants


def measure_latency(cfg: Config, runs: list[dict[str, Any]], arch: str) -> dict[str, Any]:
    """fp32 (eager, compiled) vs each int8 program (eager, compiled) at each batch size, alternated pairwise."""
    torch.set_num_threads(1)
    seed = cfg.seeds[0]
    fp32_run = next(r for r in runs if r["model"] == arch and r["kind"] == "fp32" and r["seed"] == seed)
    net = ImageClassifier(arch=arch).net
    net.load_state_dict(torch.load(fp32_run["fp32_path"], weights_only=True))
    net.eval()
    dm = make_datamodule(cfg, seed=seed, train_subset=1024)
    images = next(iter(dm.val_dataloader()))[0]
    images = torch.cat([images] * (-(-max(cfg.latency_batch_sizes) // len(images))))
    fp32_compiled = torch.compile(copy.deepcopy(net), dynamic=False)
    result: dict[str, Any] = {}
    kw = {"warmup": cfg.latency_warmup, "repeats": cfg.latency_repeats, "threads": 1}
    for label, path in latency_variants(cfg, runs, arch).items():
        int8_eager = load_quantized(path)
        int8_compiled = compile_int8(int8_eager.program, dynamic=False)
        per_batch: dict[str, Any] = {}
        for bs in cfg.latency_batch_sizes:
            x = images[:bs].contiguous()
            start = time.perf_counter()
            with torch.no_grad():  # compile outside the timed calls (the warm-up would do it, but slower to read)
                fp32_compiled(x)
                int8_compiled(x)
            compile_s = time.perf_counter() - start
            eager = compare_latency(net, int8_eager, x, **kw)
            compiled = compare_latency(fp32_compiled, int8_compiled, x, **kw)
            headline = compare_latency(net, int8_compiled, x, **kw)
            per_batch[f"batch_{bs}"] = {
                "fp32_eager_ms": eager["a"]["median_ms"],
                "int8_eager_ms": eager["b"]["median_ms"],
                "fp32_compiled_ms": compiled["a"]["median_ms"],
                "int8_compiled_ms": compiled["b"]["median_ms"],
                "speedup_eager": eager["speedup"],
                "speedup_compiled": compiled["speedup"],
                "speedup_int8_compiled_vs_fp32_eager": headline["speedup"],
                "headline_fp32_eager_ms": headline["a"]["median_ms"],
                "headline_int8_compiled_ms": headline["b"]["median_ms"],
                # min-based ratio: what the code costs without the preemptions of a shared machine
                "speedup_int8_compiled_vs_fp32_eager_min": headline["a"]["min_ms"] / headline["b"]["min_ms"],
                "compile_seconds": compile_s,
                "raw": {"eager": eager, "compiled": compiled, "int8_compiled_vs_fp32_eager": headline},
            }
            print(
                f"  {arch:6s} {label} batch {bs}: fp32 eager {eager['a']['median_ms']:.3f} ms, "
                f"int8 eager {eager['b']['median_ms']:.3f} ms, fp32 compiled {compiled['a']['median_ms']:.3f} ms, "
                f"int8 compiled {compiled['b']['median_ms']:.3f} ms; int8 compiled vs fp32 eager "
                f"{headline['speedup']:.2f}x",
                flush=True,
            )
        result[label] = {"path": path, "int8_bytes": model_size_bytes(path), **per_batch}
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------
def _pm(value: tuple[float, float]) -> str:
    return f"{value[0]:.2f} ± {value[1]:.2f}"


def _signed(points: float) -> str:
    """``+0.12`` / ``-0.30``, without a ``-0.00``."""
    return f"{round(points, 2) + 0.0:+.2f}"


def _verdict(ok: bool) -> str:
    return "hit" if ok else "MISS"


def accuracy_table(summary: dict[str, dict[str, Any]]) -> str:
    rows = []
    for arch, s in summary.items():
        label = MODEL_LABELS.get(arch, arch)
        rows.append([label, "fp32", _pm(s["fp32_acc"]), "", "", f"{s['fp32_bytes'] / 1024:.1f}", "1.00", ""])
        rows.append([label, "QAT fake-quant", _pm(s["qat_fake_quant_acc"]), "", "", "", "", ""])
        rows.append(
            [
                label,
                "QAT int8",
                _pm(s["qat_int8_acc"]),
                _signed(-s["qat_int8_drop_vs_fp32_pt"]),
                f"{s['qat_agreement'][0]:.2f} (vs fake-quant)",
                f"{s['qat_int8_bytes'] / 1024:.1f}",
                f"{s['qat_size_ratio']:.3f}",
                "",
            ]
        )
        for p in s["ptq"].values():
            kept = sorted({layers for layers in p["float_layers"] if layers})
            rows.append(
                [
                    label,
                    f"PTQ int8, {p['observer']}" + (", fallback" if p["fallback"] else ""),
                    _pm(p["int8_acc"]),
                    _signed(-p["drop_vs_fp32_pt"]),
                    f"{p['agreement'][0]:.2f} (vs fp32)",
                    f"{p['int8_bytes'] / 1024:.1f}",
                    f"{p['size_ratio']:.3f}",
                    ("; ".join(kept) if kept else "none") if p["fallback"] else "",
                ]
            )
    headers = [
        "model",
        "variant",
        "val acc % (mean ± sd)",
        "int8 - fp32 (pt)",
        "top-1 agreement %",
        "size KiB",
        "size vs fp32",
        "kept float by fallback",
    ]
    return markdown_table(headers, rows, align="llrrrrrl")


def fallback_note(summary: dict[str, dict[str, Any]], cfg: Config) -> str:
    """Whether the accuracy-aware fallback had anything to do in the fallback rows."""
    runs = [a for s in summary.values() for p in s["ptq"].values() if p["fallback"] for a in p["attempts"]]
    triggered = sum(1 for a in runs if a is not None and float(a) > 1)
    if not runs:
        return "No fallback rows in this run."
    if triggered == 0:
        return (
            f"The fallback was not triggered: in all {len(runs)} fallback runs the first, all-int8 conversion was "
            f"already within `max_accuracy_drop={cfg.max_accuracy_drop:g}`, so those rows equal the rows above them."
        )
    return f"The fallback kept layers in float in {triggered} of {len(runs)} fallback runs (see the last column)."


def step_table(steps: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            MODEL_LABELS.get(arch, arch),
            f"{t['fp32']['median_ms']:.2f}",
            f"{t['qat']['median_ms']:.2f}",
            f"{t['ratio']:.2f}x",
            f"{t['mean_ratio']:.2f}x",
        ]
        for arch, t in steps.items()
    ]
    return markdown_table(["model", "fp32 ms/step", "QAT ms/step", "QAT / fp32 (median)", "(mean)"], rows)


def latency_table(latency: dict[str, dict[str, Any]]) -> str:
    """Each pair's numbers next to its own ratio (the three pairs are separate alternated measurements)."""
    rows = []
    for arch, variants in latency.items():
        for label, v in variants.items():
            for key, b in v.items():
                if not key.startswith("batch_"):
                    continue
                rows.append(
                    [
                        MODEL_LABELS.get(arch, arch),
                        label,
                        key.removeprefix("batch_"),
                        f"{b['fp32_eager_ms']:.2f} → {b['int8_eager_ms']:.2f}",
                        f"{b['speedup_eager']:.2f}x",
                        f"{b['fp32_compiled_ms']:.2f} → {b['int8_compiled_ms']:.2f}",
                        f"{b['speedup_compiled']:.2f}x",
                        f"{b['headline_fp32_eager_ms']:.2f} → {b['headline_int8_compiled_ms']:.2f}",
                        f"**{b['speedup_int8_compiled_vs_fp32_eager']:.2f}x**",
                    ]
                )
    headers = [
        "model",
        "int8 program",
        "batch",
        "eager: fp32 → int8 ms",
        "speedup",
        "compiled: fp32 → int8 ms",
        "speedup",
        "fp32 eager → int8 compiled ms",
        "speedup",
    ]
    return markdown_table(headers, rows, align="llrrrrrrr")


def target_lines(
    summary: dict[str, dict[str, Any]], steps: dict[str, dict[str, Any]], latency: dict[str, dict[str, Any]]
) -> list[str]:
    """One line per target of issues 3 and 4: hit or MISS, with the numbers."""
    lines = []
    for arch, s in summary.items():
        drop = s["qat_int8_drop_vs_fp32_pt"]
        lines.append(
            f"- QAT int8 within {QAT_DROP_TARGET_PT} pt of fp32, {arch}: {s['qat_int8_acc'][0]:.2f}% vs "
            f"{s['fp32_acc'][0]:.2f}% ({_signed(-drop)} pt) — {_verdict(drop <= QAT_DROP_TARGET_PT)}"
        )
        agreement = s["qat_agreement"][0]
        lines.append(
            f"- top-1 agreement int8 vs fake-quant ≥ {100 * AGREEMENT_TARGET:.1f}%, {arch}: {agreement:.2f}% "
            f"(lowest seed {s['qat_agreement_min']:.2f}%) — {_verdict(agreement >= 100 * AGREEMENT_TARGET)}"
        )
        for name, p in s["ptq"].items():
            drop = p["drop_vs_fp32_pt"]
            lines.append(
                f"- PTQ ({name}) within {PTQ_DROP_TARGET_PT} pt of fp32, {arch}: {_signed(-drop)} pt (worst seed "
                f"{_signed(-p['drop_max_pt'])}) — {_verdict(drop <= PTQ_DROP_TARGET_PT)}"
            )
        ratios = {"QAT": s["qat_size_ratio"], **{f"PTQ {n}": p["size_ratio"] for n, p in s["ptq"].items()}}
        worst = max(ratios, key=lambda k: ratios[k])
        lines.append(
            f"- int8 artifact ≤ {SIZE_RATIO_TARGET}x fp32 size, {arch}: QAT {ratios['QAT']:.3f}x, largest "
            f"{worst} {ratios[worst]:.3f}x — {_verdict(ratios[worst] <= SIZE_RATIO_TARGET)} (tensors alone: "
            f"{s['qat_tensor_ratio']:.3f}x; the rest is the serialized graph, a fixed "
            f"~{(s['qat_int8_bytes'] - s['qat_tensor_ratio'] * s['fp32_parameter_bytes']) / 1024:.0f} KiB)"
        )
    for arch, t in steps.items():
        lines.append(
            f"- QAT step time ≤ {STEP_OVERHEAD_TARGET}x fp32, {arch}: {t['ratio']:.2f}x — "
            f"{_verdict(t['ratio'] <= STEP_OVERHEAD_TARGET)}"
        )
    for arch, variants in latency.items():
        for label, v in variants.items():
            b = v.get("batch_64")
            if b is None:
                continue
            speedup = b["speedup_int8_compiled_vs_fp32_eager"]
            lines.append(
                f"- ≥ {SPEEDUP_TARGET}x at batch 64, int8 compiled vs fp32 eager, {arch} {label}: {speedup:.2f}x — "
                f"{_verdict(speedup >= SPEEDUP_TARGET)}"
            )
    return lines


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _flatten(v, f"{prefix}{k}." if prefix or k else "")]
    return [(prefix.rstrip("."), tree)]


def minilm_section() -> list[str]:
    """The MiniLM PTQ numbers of ``bench/minilm_results.json``, as a key/value table, when the file exists."""
    if not MINILM_JSON.exists():
        return ["MiniLM: `bench/minilm_results.json` not present (run the MiniLM PTQ example to produce it)."]
    data = json.loads(MINILM_JSON.read_text())
    rows = [
        [key, f"{value:.4g}" if isinstance(value, float) else str(value)]
        for key, value in _flatten(data)
        if isinstance(value, (int, float, str, bool)) and not key.startswith("environment")
    ]
    targets = []
    if isinstance(data.get("mean_cosine"), (int, float)):
        cosine = data["mean_cosine"]
        targets.append(f"- mean cosine fp32 vs int8 ≥ 0.99: {cosine:.4f} — {_verdict(cosine >= 0.99)}")
    if isinstance(data.get("size_ratio"), (int, float)):
        ratio = data["size_ratio"]
        targets.append(f"- int8 size ≤ 0.35x fp32: {ratio:.3f}x — {_verdict(ratio <= 0.35)}")
    return [
        "### all-MiniLM-L6-v2, dynamic PTQ (from `bench/minilm_results.json`, written by `examples/ptq_minilm.py`)",
        "",
        "Targets (issue 4):",
        "",
        *(targets or ["- (the file has no `mean_cosine` / `size_ratio`)"]),
        "",
        markdown_table(["measure", "value"], rows, align="lr"),
    ]


def reduced_note(cfg: Config) -> list[str]:
    """A warning line when ``cfg`` is smaller than the default configuration (kept out of quick runs)."""
    if cfg.quick:
        return []
    default = parse_args(["--jobs", str(cfg.jobs)])
    fields = ("seeds", "epochs", "train_subset", "timing_steps", "timing_rounds", "latency_repeats", "models")
    changed = [
        f"{f} {getattr(cfg, f)} (default {getattr(default, f)})"
        for f in fields
        if getattr(cfg, f) != getattr(default, f)
    ]
    if not changed:
        return []
    return [
        f"**Reduced configuration** — {', '.join(changed)}: the shared 2-core machine was too loaded for the default "
        f"configuration (`python bench/quantization.py --jobs {cfg.jobs}`) in the time available. Accuracies are "
        "therefore lower than with the full training set, and with one seed the ± spread is not estimated.",
        "",
    ]


def command_line(cfg: Config) -> str:
    parts = ["python bench/quantization.py"] + (["--quick"] if cfg.quick else [])
    parts += [f"--epochs {cfg.epochs}", "--seeds " + " ".join(map(str, cfg.seeds)), "--models " + " ".join(cfg.models)]
    parts += [f"--train-subset {cfg.train_subset}"] if cfg.train_subset and not cfg.quick else []
    parts += ["--latency-variants " + " ".join(cfg.latency_variants)] if cfg.latency_variants != ["qat", "ptq"] else []
    parts += [f"--timing-steps {cfg.timing_steps}", f"--timing-rounds {cfg.timing_rounds}"]
    parts += [f"--latency-repeats {cfg.latency_repeats}", f"--jobs {cfg.jobs}"]
    return " ".join(parts)


def benchmarks_section(
    cfg: Config,
    env: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    steps: dict[str, dict[str, Any]],
    latency: dict[str, dict[str, Any]],
    seconds: dict[str, float],
) -> str:
    train = f"{cfg.train_subset:,}" if cfg.train_subset else f"{60_000 - cfg.val_size:,}"
    json_name = Path(cfg.extra["json"]).name
    freeze = f"BatchNorm statistics frozen at epoch {cfg.qat_freeze_bn}, observers at epoch {cfg.qat_freeze_observers}"
    return "\n".join(
        [
            "## Quantization: QATCallback and PostTrainingQuantCallback vs fp32",
            "",
            *(["**Quick smoke run: tiny data, not a result.**", ""] if cfg.quick else []),
            *reduced_note(cfg),
            f"Regenerate with `{command_line(cfg)}` (raw results: `bench/{json_name}`; {seconds['total'] / 60:.0f} "
            "min on this machine).",
            "",
            f"Fashion-MNIST ({train} train images; accuracies on the {cfg.val_size:,} held-out validation images, "
            f"which is where the callbacks measure), Adam lr {cfg.lr:g}, batch {cfg.batch_size}, {cfg.epochs} epochs "
            f"for every model, seeds {', '.join(map(str, cfg.seeds))}, 1 thread per run. QAT (`QATCallback` on "
            f"`model.net`): float until epoch {cfg.qat_start}, then fake quantization, {freeze}; the int8 model is "
            "the callback's own fit-end conversion. PTQ (`PostTrainingQuantCallback`, standalone on "
            f"`trainer.validate`): static, {cfg.calibration_batches} training batches of calibration, one row per "
            f"activation observer; the fallback rows add `max_accuracy_drop={cfg.max_accuracy_drop:g}` "
            "(percentage points). Top-1 agreement: QAT int8 vs its fake-quant model, PTQ int8 vs fp32. Size: fp32 "
            "`state_dict` (`torch.save`) vs the int8 `.pt2` (`torch.export.save`). "
            f"{env['cpu']}, torch {env['torch']}, lightning {env['lightning']}, {env['date']}.",
            "",
            accuracy_table(summary),
            "",
            fallback_note(summary, cfg),
            "",
            f"QAT training-step time: median over {cfg.timing_rounds} alternating rounds of {cfg.timing_steps}-step "
            "fits in one process, 1 thread (fake quantization on, observers moving, no conversion):",
            "",
            step_table(steps),
            "",
            f"CPU latency of the seed-{cfg.seeds[0]} models, 1 thread, median of {cfg.latency_repeats} calls after "
            f"{cfg.latency_warmup} warm-up calls, each pair alternated call by call (`compare_latency`); compiled = "
            "`torch.compile(dynamic=False)` for fp32 and `compile_int8` (Inductor with freezing, the int8 kernels) "
            "for int8. "
            + (
                "The PTQ observers only change scales, so one PTQ artifact per model is timed:"
                if "ptq" in cfg.latency_variants
                else "PTQ programs were not timed in this run: a static PTQ program has the same operators as the "
                "QAT one (only the scales differ):"
            ),
            "",
            latency_table(latency),
            "",
            "The machine is shared (2 cores, other people's tests running during the run): timings are noisy, so "
            "only medians and ratios of alternated measurements are reported, and small differences (< ~10%) are "
            "not meaningful." + (f" {cfg.extra['note']}" if cfg.extra.get("note") else ""),
            "",
            "Targets:",
            "",
            *target_lines(summary, steps, latency),
            "",
            *minilm_section(),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4; quick: 2)")
    parser.add_argument("--qat-start", type=int, default=None, help="fake quantization from this epoch (default 1)")
    parser.add_argument("--qat-freeze-bn", type=int, default=None, help="BN statistics freeze (default epochs - 2)")
    parser.add_argument("--qat-freeze-observers", type=int, default=None, help="observers freeze (default epochs - 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_LABELS), choices=list(MODEL_LABELS))
    parser.add_argument("--observers", nargs="*", default=list(OBSERVERS), choices=OBSERVERS, help="none: no PTQ")
    parser.add_argument("--max-accuracy-drop", type=float, default=PTQ_DROP_TARGET_PT, help="fallback budget (pt)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes (phase 1 only)")
    parser.add_argument("--timing-steps", type=int, default=None, help="steps per timed fit (default 40; quick 15)")
    parser.add_argument("--timing-rounds", type=int, default=None, help="alternating rounds (default 4; quick 2)")
    parser.add_argument("--latency-repeats", type=int, default=None, help="timed calls per pair (default 30; quick 5)")
    parser.add_argument("--train-subset", type=int, default=None, help="training images (default: all 55k)")
    parser.add_argument(
        "--latency-variants", nargs="+", default=["qat", "ptq"], choices=["qat", "ptq"], help="int8 programs to time"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 2048 train / 500 val images, 2 epochs")
    parser.add_argument("--workdir", type=Path, default=None, help="where the artifacts go (default: a temp dir)")
    parser.add_argument(
        "--resume-workdir", action="store_true", help="reuse the training runs already in --workdir (after a crash)"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="only rewrite the docs/benchmarks.md section from --json (MiniLM)"
    )
    parser.add_argument("--note", default="", help="a sentence about this run's conditions, put into the markdown")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: bench/)")
    parser.add_argument("--benchmarks-md", type=Path, default=None, help="markdown file to update (quick: none)")
    args = parser.parse_args(argv)
    quick = args.quick
    epochs = args.epochs if args.epochs is not None else (2 if quick else 4)
    cfg = Config(
        models=args.models,
        seeds=args.seeds if args.seeds is not None else ([0] if quick else [0, 1]),
        epochs=epochs,
        qat_start=args.qat_start if args.qat_start is not None else min(1, epochs - 1),
        qat_freeze_bn=args.qat_freeze_bn if args.qat_freeze_bn is not None else max(epochs - 2, 1),
        qat_freeze_observers=args.qat_freeze_observers if args.qat_freeze_observers is not None else epochs - 1,
        observers=[o for o in OBSERVERS if o in args.observers],
        max_accuracy_drop=args.max_accuracy_drop,
        train_subset=args.train_subset or (2048 if quick else None),
        latency_variants=args.latency_variants,
        val_size=500 if quick else 5000,
        timing_steps=args.timing_steps or (15 if quick else 40),
        timing_rounds=args.timing_rounds or (2 if quick else 4),
        latency_repeats=args.latency_repeats or (5 if quick else 30),
        latency_warmup=2 if quick else 5,
        jobs=args.jobs,
        quick=quick,
    )
    if cfg.qat_freeze_observers < cfg.qat_start:
        parser.error("`--qat-freeze-observers` must be >= `--qat-start` so the observers see data first.")
    default_json = BENCH_DIR / ("quantization_results_quick.json" if quick else "quantization_results.json")
    cfg.extra = {
        "json": str(args.json or default_json),
        "benchmarks_md": str(args.benchmarks_md or ("" if quick else BENCHMARKS_MD)),
        "workdir": str(args.workdir or ""),
        "resume_workdir": args.resume_workdir,
        "render_only": args.render_only,
        "note": args.note,
    }
    if args.resume_workdir and not args.workdir:
        parser.error("`--resume-workdir` needs the `--workdir` of the earlier run.")
    return cfg


def render_only(json_path: Path, md_path: Path, note: str = "") -> None:
    """Rewrite the markdown section from a results file (picks up a newer ``bench/minilm_results.json``)."""
    data = json.loads(json_path.read_text())
    cfg = Config(**data["config"])
    cfg.extra["note"] = note or cfg.extra.get("note", "")
    section = benchmarks_section(
        cfg, data["environment"], data["summary"], data["step_time"], data["latency"], data["seconds"]
    )
    write_benchmarks_section("quantization", section, md_path)
    print(f"Updated the quantization section of {md_path} from {json_path}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.extra["render_only"]:
        render_only(Path(cfg.extra["json"]), Path(cfg.extra["benchmarks_md"] or BENCHMARKS_MD), cfg.extra["note"])
        return
    quiet_lightning()
    torch.set_num_threads(1)
    env = environment()
    keep_workdir = bool(cfg.extra["workdir"])
    workdir = Path(cfg.extra["workdir"] or tempfile.mkdtemp(prefix="lc_quant_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg.extra["workdir"] = str(workdir)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    try:
        jobs = accuracy_jobs(cfg)
        print(f"Phase 1: {len(jobs)} training runs, {cfg.epochs} epochs each, {cfg.jobs} at a time", flush=True)
        runs = run_parallel(run_job, jobs, cfg.jobs)
        seconds["accuracy"] = time.perf_counter() - start
        summary = summarize(cfg, runs)

        print(f"Phase 2: QAT step overhead, {cfg.timing_rounds} rounds x {cfg.timing_steps} steps", flush=True)
        t = time.perf_counter()
        steps = {arch: measure_step_overhead(cfg, arch) for arch in cfg.models}
        for arch, s in steps.items():
            print(f"  {arch}: fp32 {s['fp32']['median_ms']:.2f} ms, QAT {s['qat']['median_ms']:.2f} ms", flush=True)
        seconds["step_time"] = time.perf_counter() - t

        print(f"Phase 3: latency, batch sizes {cfg.latency_batch_sizes}", flush=True)
        t = time.perf_counter()
        latency = {arch: measure_latency(cfg, runs, arch) for arch in cfg.models}
        seconds["latency"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - start
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(accuracy_table(summary))
    print()
    print(step_table(steps))
    print()
    print(latency_table(latency))
    print()
    print("\n".join(target_lines(summary, steps, latency)))
    print(f"\n{', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")

    results = {
        "config": asdict(cfg),
        "environment": env,
        "runs": runs,
        "summary": summary,
        "step_time": steps,
        "latency": latency,
        "targets": target_lines(summary, steps, latency),
        "seconds": seconds,
    }
    json_path = Path(cfg.extra["json"])
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {json_path}")
    if cfg.extra["benchmarks_md"]:
        md_path = Path(cfg.extra["benchmarks_md"])
        section = benchmarks_section(cfg, env, summary, steps, latency, seconds)
        write_benchmarks_section("quantization", section, md_path)
        print(f"Updated the quantization section of {md_path}")


if __name__ == "__main__":
    main()
