"""The demo study: what compression buys on a ResNet on Fashion-MNIST, dense vs pruned vs int8 vs pruned + int8.

    python examples/study.py                  # the full study (about 10 minutes on 2 CPU cores)
    python examples/study.py --quick          # small subsets, 1 epoch: a smoke test
    python examples/study.py --net lenet5     # LeNet-5: dense, 90% unstructured pruning, + QAT, PTQ (~2 minutes)
    python examples/study.py --studies dense channel --epochs 6 --logdir runs/mine

Every study trains (or, for ``ptq``, quantizes) the network (``--net``: the ResNet-ish net by default, 3 stages x 2
residual blocks of widths 32/64/128, 0.7M parameters; or LeNet-5) from the same seed with the same data order, and is
its own TensorBoard run under one log directory (``<logdir>/<study>/version_N``) with a :class:`CompressionReport`:

* ``dense``: the baseline;
* ``channel``: :class:`IterativePruningCallback` with ``structure="channel"``, a cubic ramp to 50% of the channels
  over the first half of training, then the pruned channels removed at fit end: a smaller, faster float network;
* ``channel_qat``: the same channel pruning, then :class:`QATCallback` from the end of the ramp on: the int8 model of
  the compact network (pruned + int8);
* ``prune``: :class:`IterativePruningCallback`, cubic ramp to 90% (unstructured) sparsity over the first half;
* ``prune_qat``: the same pruning, then :class:`QATCallback` from the end of the ramp on: a sparse int8 model;
* ``ptq``: :class:`PostTrainingQuantCallback` on the dense model (its saved weights, no retraining), run by
  ``trainer.validate``: int8 without retraining.

The ResNet-ish net runs ``dense channel channel_qat ptq`` by default, LeNet-5 ``dense prune prune_qat ptq`` (too
small for channel pruning to speed it up); ``--studies`` picks any of them. At the end every artifact is loaded back
from disk and measured the same way: test accuracy, the weights left (non-zero weights of the artifact against the
dense network's), size on disk (float: the saved ``state_dict``, compact: its smaller ``state_dict``; int8: the
``.onnx`` file of the callbacks' default ONNX Runtime backend) and CPU latency at batch 1 and 64 (1 thread, medians of
runs alternated with the dense model; float eager, int8 run by ONNX Runtime, or compiled with Inductor for a
``.pt2``), each relative to dense. The table is printed and written to ``study.md`` / ``study.json`` in the log
directory, with a cross-run accuracy-vs-sparsity figure in the TensorBoard run ``study``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from lightning_compress import IterativePruningCallback, QATCallback
from lightning_compress.callbacks import _figures as figures
from lightning_compress.callbacks.report import CompressionReport, jsonable
from lightning_compress.demos.data import FashionMNISTDataModule
from lightning_compress.demos.models import ImageClassifier, build_model
from lightning_compress.engine.convert import compile_int8, int8_weights, load_quantized
from lightning_compress.engine.masks import measure_sparsity
from lightning_compress.engine.measure import compare_latency, measure_latency
from lightning_compress.engine.selection import select_parameters
from lightning_compress.engine.structured import load_compact

STUDIES = ("dense", "channel", "channel_qat", "prune", "prune_qat", "ptq")
NETS = {"resnetish": "ResNet-ish", "lenet5": "LeNet-5"}
DEFAULT_STUDIES = {
    "resnetish": ("dense", "channel", "channel_qat", "ptq"),
    "lenet5": ("dense", "prune", "prune_qat", "ptq"),
}
DEFAULT_LOGDIR = "runs/demo"
TARGET_SPARSITY = 0.9  # unstructured: a fraction of the weights
CHANNEL_SPARSITY = 0.5  # structured: a fraction of the prunable channels
LATENCY_BATCH_SIZES = (1, 64)
FLOAT_FILE = "model_float.pt"

# A wide console when the output is a file or a pipe, so the table stays one line per study in logs.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


@dataclass
class Settings:
    """What a study invocation runs on (from the command line)."""

    logdir: Path
    epochs: int
    seed: int
    quick: bool
    net: str = "resnetish"
    batch_size: int = 128
    train_subset: int | None = None
    val_size: int = 5000
    test_subset: int | None = None
    calibration_batches: int = 32
    latency_repeats: int = 15

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        logdir = Path(args.logdir).resolve()
        if args.quick:
            epochs = args.epochs or 1
            return cls(
                logdir, epochs, args.seed, True, args.net, 64, 1024, 512, 512, calibration_batches=4, latency_repeats=5
            )
        if args.net == "resnetish":
            # 81M multiply-accumulates per image: about 0.9 s per training step of 128 on one core, so an 8k-image
            # subset for 3 epochs keeps the four studies near 10 minutes
            return cls(logdir, args.epochs or 3, args.seed, False, args.net, train_subset=8000, val_size=2000)
        return cls(logdir, args.epochs or 4, args.seed, False, args.net)  # LeNet-5: ~88% dense, ~2 minutes


@dataclass
class StudyRun:
    """One study's run: where it is, its artifact, what its report said, and what the final measurement found."""

    name: str
    log_dir: Path
    artifact: Path
    kind: str  # "float", "compact" (channels removed, float) or "int8"
    report: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (sparsity, val_acc) during training
    seconds: float = 0.0
    measured: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Running the studies
# --------------------------------------------------------------------------------------------------------------------
class _EpochLines(Callback):
    """One progress line per validation: epoch, accuracy, sparsity, elapsed time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        acc = float(trainer.callback_metrics.get("val_acc", math.nan))
        pruning = [
            cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, IterativePruningCallback) and cb.history
        ]
        extra = f", weight sparsity {pruning[0].history[-1][1]:.1%}" if pruning else ""
        console.print(
            f"  [{self.name}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: val_acc {acc:.4f}{extra}"
            f" ({time.perf_counter() - self.start:.0f} s)",
            markup=False,
        )


def _data(settings: Settings) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        batch_size=settings.batch_size,
        val_size=settings.val_size,
        train_subset=settings.train_subset,
        test_subset=settings.test_subset,
        seed=settings.seed,
    )


def _trainer(settings: Settings, name: str, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    logger = TensorBoardLogger(settings.logdir, name=name, default_hp_metric=False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=settings.epochs,
        logger=logger,
        callbacks=[*callbacks, _EpochLines(name)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5 if settings.quick else 20,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _steps(settings: Settings, data: FashionMNISTDataModule) -> int:
    data.setup("fit")
    assert data.train_set is not None
    return settings.epochs * math.ceil(len(data.train_set) / settings.batch_size)


def _report(baseline: float | None) -> CompressionReport:
    return CompressionReport(
        monitor="val_acc",
        baseline_metric=baseline,
        module="net",
        latency_batch_sizes=list(LATENCY_BATCH_SIZES),
        verbose=False,
    )


def train_study(name: str, settings: Settings, baseline: float | None) -> StudyRun:
    """Train the network from the common seed with the callbacks of study ``name`` (every study but ``ptq``)."""
    data = _data(settings)
    total = _steps(settings, data)
    ramp_end = max(1, total // 2)  # prune over the first half, then recover (and, for *_qat, quantize)
    callbacks: list[Callback] = [_report(baseline)]
    pruning: IterativePruningCallback | None = None
    if name in ("prune", "prune_qat"):
        pruning = IterativePruningCallback(
            target_sparsity=TARGET_SPARSITY, end_step=ramp_end, monitor="val_acc", verbose=False
        )
    if name in ("channel", "channel_qat"):
        # group-complete channel masks during training; at fit end the pruned channels are removed for real, and a
        # QATCallback in the same fit converts that compact network
        pruning = IterativePruningCallback(
            target_sparsity=CHANNEL_SPARSITY,
            structure="channel",
            end_step=ramp_end,
            module="net",
            monitor="val_acc",
            verbose=False,
        )
    if pruning is not None:
        callbacks.append(pruning)
    if name in ("prune_qat", "channel_qat"):
        callbacks.append(
            QATCallback(
                start=ramp_end,
                freeze_observers_at=ramp_end + (total - ramp_end) * 3 // 4,
                module="net",
                monitor="val_acc",
                latency_batch_sizes=list(LATENCY_BATCH_SIZES),
                verbose=False,
            )
        )
    L.seed_everything(settings.seed, verbose=False)  # the same initial weights for every study
    model = ImageClassifier(arch=settings.net, lr_schedule="cosine")
    trainer = _trainer(settings, name, callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    log_dir = Path(trainer.log_dir or settings.logdir)
    run = StudyRun(name, log_dir, log_dir / FLOAT_FILE, "float", seconds=time.perf_counter() - start)
    if pruning is not None:
        run.curve = [(s, m) for _, s, m in pruning.history]
        if pruning.compact_paths:  # the compact network's state dict (rebuilt with load_compact)
            run.artifact, run.kind = Path(pruning.compact_paths[0]), "compact"
    for cb in callbacks:
        if isinstance(cb, QATCallback):
            run.artifact, run.kind = Path(str(cb.results["saved_to"])), "int8"
    if run.kind == "float":  # the float artifact: the network's weights, loadable into a fresh network
        torch.save(model.net.state_dict(), run.artifact)
    _take_report(run, callbacks)
    return run


def ptq_study(settings: Settings, dense_weights: Path, baseline: float | None) -> StudyRun:
    """Quantize the dense model's saved weights with ``PostTrainingQuantCallback`` in ``trainer.validate``."""
    from lightning_compress.callbacks.ptq import PostTrainingQuantCallback

    data = _data(settings)
    model = ImageClassifier(arch=settings.net)
    model.net.load_state_dict(torch.load(dense_weights, weights_only=True))
    ptq = PostTrainingQuantCallback(
        mode="static",
        calibration_batches=settings.calibration_batches,
        observer="histogram",
        module="net",
        monitor="val_acc",
        run_on=["validate"],
        latency_batch_sizes=list(LATENCY_BATCH_SIZES),
        verbose=False,
    )
    callbacks: list[Callback] = [_report(baseline), ptq]
    trainer = _trainer(settings, "ptq", callbacks)
    start = time.perf_counter()
    trainer.validate(model, datamodule=data, verbose=False)
    log_dir = Path(trainer.log_dir or settings.logdir)
    run = StudyRun("ptq", log_dir, Path(str(ptq.results["saved_to"])), "int8", seconds=time.perf_counter() - start)
    _take_report(run, callbacks)
    return run


def _take_report(run: StudyRun, callbacks: list[Callback]) -> None:
    report = next(cb for cb in callbacks if isinstance(cb, CompressionReport))
    run.report, run.settings = dict(report.results), dict(report.settings)


def _latest_dense(logdir: Path, net: str) -> Path | None:
    """The dense weights of the latest earlier ``dense`` run of network ``net`` in ``logdir``."""
    candidates = sorted(logdir.glob(f"dense/version_*/{FLOAT_FILE}"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in reversed(candidates):
        try:  # a dense run of the other network may share the log directory
            build_model(net).load_state_dict(torch.load(path, weights_only=True))
        except RuntimeError:
            continue
        return path
    return None


# --------------------------------------------------------------------------------------------------------------------
# Measuring the artifacts the same way
# --------------------------------------------------------------------------------------------------------------------
def _load(run: StudyRun, net_name: str) -> tuple[Callable[..., Any], Callable[..., Any], dict[str, float]]:
    """(eager function, deployed function, weight counts) of a run's artifact loaded from disk."""
    if run.kind in ("float", "compact"):
        if run.kind == "compact":  # a fresh network, shrunk to the saved layer shapes
            net = load_compact(run.artifact, model=build_model(net_name))
        else:
            net = build_model(net_name)
            net.load_state_dict(torch.load(run.artifact, weights_only=True))
        net.eval()
        stats = measure_sparsity(select_parameters(net, None, None))
        return net, net, {"weights": float(stats.total_numel), "nonzero_weights": float(stats.nonzero)}
    int8 = load_quantized(run.artifact)
    if run.artifact.suffix == ".onnx":  # ONNX Runtime (the callbacks' default backend): fast as it is
        weights = _onnx_int8_weights(run.artifact)
        deployed: Callable[..., Any] = int8
    else:  # torch.export program (backend="inductor"): compiled with Inductor
        weights = list(int8_weights(int8.program).values())
        deployed = compile_int8(int8.program, dynamic=False)
    counts = {
        "weights": float(sum(w.numel() for w in weights)),
        "nonzero_weights": float(sum(int(w.count_nonzero()) for w in weights)),
    }
    return int8, deployed, counts


def _onnx_int8_weights(path: Path) -> list[torch.Tensor]:
    """The int8 weight tensors (initializers of rank >= 2) of an int8 ``.onnx`` file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return [
        torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in proto.graph.initializer
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2
    ]


@torch.no_grad()
def _accuracy(fn: Callable[..., Any], loader: Any) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((fn(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def _file_sizes(path: Path) -> dict[str, float]:
    raw = path.read_bytes()
    return {"size_bytes": float(len(raw)), "gzip_bytes": float(len(gzip.compress(raw, compresslevel=6)))}


def measure_runs(runs: list[StudyRun], dense: StudyRun | None, settings: Settings) -> None:
    """Test accuracy, weights, sizes and latency of every artifact; latency alternated with the dense model."""
    data = _data(settings)
    data.setup("test")
    loader = data.test_dataloader()
    images = torch.cat([x for x, _ in loader])[: max(LATENCY_BATCH_SIZES)]
    dense_fn = _load(dense, settings.net)[1] if dense is not None else None
    dense_weights = measure_sparsity(select_parameters(build_model(settings.net), None, None)).total_numel
    for run in runs:
        console.print(f"  measuring {run.name} ({run.artifact.name}) ...")
        eager, deployed, counts = _load(run, settings.net)
        run.measured = {"test_acc": _accuracy(eager, loader), **counts, **_file_sizes(run.artifact)}
        # against the dense network's weights: a removed channel counts like a zeroed weight
        run.measured["sparsity"] = 1.0 - counts["nonzero_weights"] / dense_weights
        for n in LATENCY_BATCH_SIZES:
            batch = images[:n].contiguous()
            if dense_fn is None or run is dense:
                timing = measure_latency(deployed, batch, warmup=3, repeats=settings.latency_repeats)
                run.measured[f"ms/batch_{n}"] = timing["median_ms"]
            else:
                # Alternated with the dense model, in 3 rounds: both times and the ratio come from these same
                # interleaved series (so they agree), and the rounds give the spread of the ratio.
                rounds = [
                    compare_latency(dense_fn, deployed, batch, warmup=3, repeats=settings.latency_repeats)
                    for _ in range(3)
                ]
                dense_ms = statistics.median(r["a"]["median_ms"] for r in rounds)
                run.measured[f"ms/batch_{n}"] = statistics.median(r["b"]["median_ms"] for r in rounds)
                run.measured[f"dense_ms_in_pair/batch_{n}"] = dense_ms
                run.measured[f"ratio_to_dense/batch_{n}"] = run.measured[f"ms/batch_{n}"] / dense_ms
                run.measured[f"ratio_min/batch_{n}"] = min(r["ratio"] for r in rounds)
                run.measured[f"ratio_max/batch_{n}"] = max(r["ratio"] for r in rounds)


# --------------------------------------------------------------------------------------------------------------------
# The comparison table
# --------------------------------------------------------------------------------------------------------------------
COLUMNS = (
    "study",
    "test acc",
    "Δ acc (pts)",
    "sparsity",
    "non-zero weights",
    "size on disk",
    "gzipped",
    "latency b=1",
    "latency b=64",
)


def table_rows(runs: list[StudyRun], dense: StudyRun | None) -> list[list[str]]:
    """The table as text cells (the same for the console, Markdown and TensorBoard); ratios are "x dense"."""
    base = dense.measured if dense is not None else {}
    rows = []
    for run in runs:
        m = run.measured

        def cell(key: str, text: str, m: dict[str, float] = m) -> str:
            return f"{text} ({m[key] / base[key]:.2f}x)" if base.get(key) else text

        def latency(n: int, m: dict[str, float] = m, is_dense: bool = run is dense) -> str:
            if is_dense or f"ratio_to_dense/batch_{n}" not in m:
                return f"{m[f'ms/batch_{n}']:.2f} ms"
            # the dense time of the same alternated series, so that times and ratio agree
            times = f"{m[f'ms/batch_{n}']:.2f} vs {m[f'dense_ms_in_pair/batch_{n}']:.2f} ms"
            spread = f"{m[f'ratio_min/batch_{n}']:.2f}-{m[f'ratio_max/batch_{n}']:.2f}"
            return f"{times} ({m[f'ratio_to_dense/batch_{n}']:.2f}x, {spread})"

        rows.append(
            [
                f"{run.name} ({run.kind})",
                f"{m['test_acc']:.2%}",
                f"{100 * (m['test_acc'] - base['test_acc']):+.2f}" if base else "n/a",
                f"{m['sparsity']:.1%}",
                cell("nonzero_weights", f"{m['nonzero_weights']:,.0f}"),
                cell("size_bytes", f"{m['size_bytes'] / 1e3:,.1f} kB"),
                cell("gzip_bytes", f"{m['gzip_bytes'] / 1e3:,.1f} kB"),
                *(latency(n) for n in LATENCY_BATCH_SIZES),
            ]
        )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


NOTES = (
    "Ratios are x dense: below 1.00x is fewer, smaller or faster. "
    "Accuracy: the Fashion-MNIST test images, each artifact loaded back from disk (load_compact, load_quantized). "
    "Sparsity and non-zero weights: the Linear/Conv weights of the artifact against the dense network's (removed "
    "channels count as zeros; int8 rounding adds a few zeros). "
    "Size: float = the saved state_dict, compact = the state_dict of the network with its pruned channels removed, "
    "int8 = the saved .onnx (ONNX Runtime, the callbacks' default backend); "
    "gzipped shows what sparsity saves once compressed. Latency: medians, 1 thread, after warm-up; float eager, "
    "int8 run by ONNX Runtime (a .pt2 from backend='inductor' is compiled with Inductor). Each study is timed "
    "alternated with the dense model in 3 rounds: 'A vs B' are its median and the dense median of those same runs, "
    "the ratio is A/B and the range after it the lowest and highest ratio of the rounds (the dense row's own time "
    "was measured alone, at another moment of a noisy machine)."
)


def write_outputs(runs: list[StudyRun], dense: StudyRun | None, settings: Settings, seconds: float) -> str:
    """Print the table, write ``study.md``/``study.json`` and the cross-run TensorBoard run ``study``."""
    rows = table_rows(runs, dense)
    title = f"{NETS[settings.net]} on Fashion-MNIST, {settings.epochs} epoch(s){' (quick)' if settings.quick else ''}"
    table = Table(title=title)
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(NOTES, style="dim")

    markdown = f"{markdown_table(rows)}\n\n{NOTES}\n"
    (settings.logdir / "study.md").write_text(markdown)
    document = {
        "net": settings.net,
        "epochs": settings.epochs,
        "train_subset": settings.train_subset,
        "quick": settings.quick,
        "seed": settings.seed,
        "seconds": seconds,
        "runs": {
            r.name: {
                "log_dir": str(r.log_dir),
                "artifact": str(r.artifact),
                "kind": r.kind,
                "train_or_quantize_seconds": r.seconds,
                "measured": r.measured,
                "report": r.report,
                "settings": r.settings,
            }
            for r in runs
        },
    }
    (settings.logdir / "study.json").write_text(json.dumps(jsonable(document), indent=2) + "\n")
    _write_study_run(runs, settings.logdir, markdown)
    return markdown


def _write_study_run(runs: list[StudyRun], logdir: Path, markdown: str) -> None:
    """The cross-run view: validation accuracy against sparsity for every run, and the table, in run ``study``."""
    from torch.utils.tensorboard import SummaryWriter

    curves: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        if run.curve:
            curves[f"{run.name} (training)"] = run.curve
        if "val_acc" in run.report and "sparsity" in run.report:
            curves[f"{run.name} ({run.kind}, final)"] = [(run.report["sparsity"], run.report["val_acc"])]
    writer = SummaryWriter(str(logdir / "study"))
    try:
        if curves:
            figure = figures.metric_vs_sparsity(curves, metric="val_acc")
            writer.add_figure("compress/study/val_acc_vs_sparsity", figure, global_step=0)
        writer.add_text("compress/study/summary", markdown, global_step=0)
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="examples/study.py",
        description="Train a network on Fashion-MNIST dense, pruned, int8 and pruned + int8, and compare them.",
    )
    parser.add_argument("--quick", action="store_true", help="small subsets and 1 epoch: a smoke test (a few minutes)")
    parser.add_argument(
        "--net", choices=list(NETS), default="resnetish", help="the network (default resnetish; lenet5 is faster)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 3 for resnetish, 4 for lenet5)"
    )
    parser.add_argument(
        "--studies",
        nargs="+",
        choices=STUDIES,
        default=None,
        help="which studies to run (default: "
        + "; ".join(f"{n}: {' '.join(s)}" for n, s in DEFAULT_STUDIES.items())
        + ")",
    )
    parser.add_argument(
        "--logdir", default=DEFAULT_LOGDIR, help=f"TensorBoard log directory (default {DEFAULT_LOGDIR})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training (default 1: on a busy 2-core machine 2 threads ran up to 8x slower per step"
        " than 1)",
    )
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"`--epochs` must be a positive integer, got {args.epochs}.")
    if args.threads < 1:
        parser.error(f"`--threads` must be a positive integer, got {args.threads}.")
    return args


def _quiet() -> None:
    """Keep the console to the study's own lines: Lightning's info banners and known harmless warnings off."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("torchao", "torch.utils._pytree"):  # optional CUDA kernels absent on CPU; a deprecation note
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (
        r".*does not have many workers.*",
        r".*LeafSpec.*",
        r".*treespec.*",
        r".*To copy construct from a tensor.*",  # inside Inductor's int8 lowering
    ):
        warnings.filterwarnings("ignore", message=message)


def main(argv: Sequence[str] | None = None) -> dict[str, StudyRun]:
    """Run the studies, measure the artifacts, print and write the comparison; returns the runs by name."""
    args = parse_args(argv)
    settings = Settings.from_args(args)
    settings.logdir.mkdir(parents=True, exist_ok=True)
    _quiet()
    torch.set_num_threads(args.threads)  # latency is always timed with 1 thread
    chosen = args.studies or DEFAULT_STUDIES[settings.net]
    studies = [s for s in STUDIES if s in chosen]
    start = time.perf_counter()
    runs: dict[str, StudyRun] = {}
    subset = f" ({settings.train_subset:,} training images)" if settings.train_subset else ""
    console.print(
        f"[bold]Compression study[/bold]: {NETS[settings.net]} on Fashion-MNIST, {settings.epochs} epoch(s){subset},"
        f" studies {', '.join(studies)}; logs in {settings.logdir}"
    )
    for index, name in enumerate(studies, 1):
        console.print(f"[bold][{index}/{len(studies)}] {name}[/bold]: {_describe(name, NETS[settings.net])}")
        baseline = runs["dense"].report.get("val_acc") if "dense" in runs else None
        if name == "ptq":
            dense_weights = runs["dense"].artifact if "dense" in runs else _latest_dense(settings.logdir, settings.net)
            if dense_weights is None:
                console.print("  ptq needs the dense model and there is none in the log directory: training it first")
                runs["dense"] = train_study("dense", settings, None)
                dense_weights, baseline = runs["dense"].artifact, runs["dense"].report.get("val_acc")
            runs[name] = ptq_study(settings, dense_weights, baseline)
        else:
            runs[name] = train_study(name, settings, baseline)
        console.print(f"  done in {runs[name].seconds:.0f} s; run directory {runs[name].log_dir}")

    console.print("[bold]Measuring the artifacts[/bold] (test accuracy, size, latency alternated with dense) ...")
    dense = runs.get("dense")
    if dense is None and (earlier := _latest_dense(settings.logdir, settings.net)) is not None:
        dense = StudyRun("dense", earlier.parent, earlier, "float")  # compare with the earlier dense run
    ordered = [r for r in runs.values()]
    measure_runs([dense, *ordered] if dense is not None and dense not in ordered else ordered, dense, settings)
    seconds = time.perf_counter() - start
    shown = [dense] if dense is not None and dense not in ordered else []
    write_outputs([*shown, *ordered], dense, settings, seconds)
    console.print(f"Wrote {settings.logdir / 'study.md'} and study.json; total time {seconds / 60:.1f} min.")
    console.print(f"Open the dashboard with:\n  tensorboard --logdir {settings.logdir}")
    return runs


def _describe(name: str, net: str) -> str:
    return {
        "dense": f"train {net} without compression (the baseline)",
        "channel": f"IterativePruningCallback(structure='channel'): {CHANNEL_SPARSITY:.0%} of the channels over the"
        " first half, then removed for real",
        "channel_qat": "the same channel pruning, then QATCallback from the end of the ramp: the compact net in int8",
        "prune": f"train with IterativePruningCallback, cubic ramp to {TARGET_SPARSITY:.0%} over the first half",
        "prune_qat": "the same pruning, then QATCallback from the end of the ramp: a sparse int8 model",
        "ptq": "PostTrainingQuantCallback on the dense weights in trainer.validate: int8 without retraining",
    }[name]


if __name__ == "__main__":
    main()
