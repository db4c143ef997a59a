"""``IterativePruningCallback``: gradual magnitude pruning scheduled over optimizer steps."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.callbacks import _figures, _logging
from lightning_compress.callbacks._loops import artifact_path, latency_batch_sizes, target_module
from lightning_compress.callbacks._resume import check_same_settings, check_state_key
from lightning_compress.engine import structured
from lightning_compress.engine.config import (
    DEFAULT_ROUND_TO,
    DEFAULT_TARGET_SPARSITY,
    Criterion,
    PruningConfig,
    Schedule,
    Scope,
)
from lightning_compress.engine.distributed import shard_group
from lightning_compress.engine.measure import compare_latency
from lightning_compress.engine.pruner import GradualPruner, PruningReport
from lightning_compress.engine.selection import select_parameters
from lightning_compress.engine.validation import check_bool, check_optional_str

PREFIX = f"{_logging.PREFIX}/sparsity"


class IterativePruningCallback(Callback):
    r"""Prune a model gradually while it trains, to an absolute target sparsity.

    At each mask update the smallest-magnitude weights (``global``: across all selected tensors) are zeroed so that
    exactly ``round(s * N)`` of the ``N`` selected weights are zero, where ``s`` follows ``schedule`` from
    ``initial_sparsity`` at ``start_step`` to ``target_sparsity`` at ``end_step``. Steps are optimizer steps
    (``trainer.global_step``), so gradient accumulation is accounted for.

    Masks are applied in place: after every optimizer step the pruned weights are set back to zero (and their
    gradients are zeroed before it), so momentum or weight decay cannot revive them. There is no reparametrization:
    parameter objects and ``state_dict`` keys never change, checkpoints load into the plain model, ``deepcopy``
    works, and quantization-aware training composes. The masks (bit-packed) and the schedule position are saved
    in the checkpoint, so ``trainer.fit(ckpt_path=...)`` resumes exactly; a resume with other settings than the
    checkpoint's is refused with the differences named.

    Pruned weights are re-zeroed by an optimizer step post-hook, so they are zero right after every
    ``optimizer.step()``, under manual optimization too. With weight averaging (``StochasticWeightAveraging``,
    ``WeightAveraging``/EMA) the averaged weights the Trainer ends with are masked again at fit end, so the final
    model has the target sparsity; the averages used for validation before the end of training are not masked.
    A callback object can be reused for a new fit: its state is reset in ``setup`` unless a checkpoint restores it.

    **Example**

    ```python
    from lightning import Trainer
    from lightning_compress import IterativePruningCallback

    trainer = Trainer(callbacks=[IterativePruningCallback(target_sparsity=0.9, monitor="val_acc")])
    ```

    Args:
        target_sparsity: The fraction pruned from ``end_step`` on, in [0, 1), in the unit of ``structure``:
            of the selected **weights** for ``"unstructured"``; of the prunable **channels** (``C``, counted over
            all channel groups; a head counts its width) for ``"channel"``, where the fraction of weights zeroed
            differs (it is logged as ``sparsity`` next to ``channel_sparsity``); ``(M-N)/M`` for ``"N:M"``.
        schedule: ``"cubic"`` (Zhu & Gupta), ``"linear"``, ``"exponential"`` or ``"constant"`` (one shot).
        initial_sparsity: Target at ``start_step``, in [0, ``target_sparsity``].
        start_step: Optimizer step of the first mask update.
        end_step: Optimizer step at which ``target_sparsity`` is reached. ``None``: ``end_fraction`` of
            ``trainer.estimated_stepping_batches``, leaving the rest of training to recover at the target.
        update_every_n_steps: Steps between mask updates. ``None``: about 100 updates over the ramp.
        scope: ``"global"`` (one magnitude ranking across all selected tensors) or ``"local"`` (each tensor pruned
            to the target on its own).
        structure: ``"unstructured"`` (single weights), ``"channel"`` (whole channel groups: every producer's output
            rows and biases, the norms' affine entries and every consumer's input columns of a channel are zeroed
            together, so the channels can be removed exactly; see ``lightning_compress.engine.structured``) or
            ``"N:M"`` such as ``"2:4"`` (N of every M consecutive weights along the input dimension kept, Linear and
            Conv weights whose input dimension is a multiple of M; a mask only on CPU: the speedup needs a GPU
            with 2:4 sparse kernels). Channel pruning never prunes the network's output features, keeps
            ``min_channels_per_group`` channels of every group, and needs an example input of the network:
            ``example_input_array`` of the LightningModule, else the first training call of the network is
            caught (masks then start after that call).
        criterion: ``"magnitude"`` or ``"random"`` (seeded by ``seed``; identical on every DDP rank).
        include: Regular expressions searched in full parameter names (``"net.fc1.weight"``); when given, they
            narrow the default (every ``weight`` of ``nn.Linear`` and ``nn.ConvNd``) to the weights they match:
            ``"transformer\\.h\\."`` prunes those blocks' Linear weights, not their norms and biases. A pattern
            that matches none of those weights selects the other parameters it matches (``"fc1\\.bias"``,
            ``"^embed\\.weight$"``): biases, norms and embeddings are pruned only when targeted that way.
        exclude: Regular expressions of parameter names never to prune.
        end_fraction: Fraction of ``trainer.estimated_stepping_batches`` used as ``end_step`` when it is ``None``.
        monitor: A metric the LightningModule logs in validation (e.g. ``"val_acc"``). At every validation end the
            pair (sparsity, metric) is recorded and drawn as an accuracy-vs-sparsity curve.
        rewind_to_step: Lottery-ticket rewinding (off by default). The selected weights are snapshotted at this
            step (<= ``start_step``) and, after every mask update, the surviving weights are reset to the snapshot.
        seed: Seed of the ``random`` criterion.
        verbose: Print a sparsity summary on rank zero at the end of fit.
        round_to: Channel pruning: kept channels of every group rounded to a multiple of this (kernels are
            faster at such widths; default 16, measured). ``1`` gives exactly ``round(s * C)`` pruned channels.
        min_channels_per_group: Channel pruning: channels every group keeps, a count (>= 1) or a fraction in (0, 1).
        compact_on_fit_end: Channel pruning: at fit end, on rank zero, remove the pruned channels from a deep copy
            (``compact_model``), measure it against the masked model, and save it. ``None``: on for
            ``structure="channel"``.
        module: The network inside the LightningModule to prune channels of (e.g. ``"net"``); ``None``: the
            LightningModule's own ``forward``.
        compact_path: Where to save the compact model's state dict (``.pt``, rebuilt by
            ``load_compact``); the exported program goes next to it as ``.pt2``.
            ``None``: ``compact_model.pt`` in the first logger's ``log_dir``, else ``default_root_dir``.
    """

    def __init__(
        self,
        target_sparsity: float = DEFAULT_TARGET_SPARSITY,
        schedule: Schedule = "cubic",
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int | None = None,
        update_every_n_steps: int | None = None,
        scope: Scope = "global",
        structure: str = "unstructured",
        criterion: Criterion = "magnitude",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        end_fraction: float = 0.75,
        monitor: str | None = None,
        rewind_to_step: int | None = None,
        seed: int = 0,
        verbose: bool = True,
        round_to: int = DEFAULT_ROUND_TO,
        min_channels_per_group: int | float = 1,
        compact_on_fit_end: bool | None = None,
        module: str | None = None,
        compact_path: str | None = None,
    ) -> None:
        #: The validated settings (``end_step``/``update_every_n_steps`` as given; resolved at fit start).
        self.config = PruningConfig(
            target_sparsity=target_sparsity,
            schedule=schedule,
            initial_sparsity=initial_sparsity,
            start_step=start_step,
            end_step=end_step,
            update_every_n_steps=update_every_n_steps,
            scope=scope,
            structure=structure,
            criterion=criterion,
            include=include,  # type: ignore[arg-type]  # validated and stored as a tuple
            exclude=exclude,  # type: ignore[arg-type]
            end_fraction=end_fraction,
            rewind_to_step=rewind_to_step,
            seed=seed,
            round_to=round_to,
            min_channels_per_group=min_channels_per_group,
            compact_on_fit_end=compact_on_fit_end,
        )
        self.module = check_optional_str("module", module)
        self.compact_path = check_optional_str("compact_path", compact_path)
        self.monitor = check_optional_str("monitor", monitor)
        self.verbose = check_bool("verbose", verbose)
        #: The pruner of the current fit (``None`` before ``on_fit_start``).
        self.pruner: GradualPruner | None = None
        #: The summary measured at fit end (also logged under ``compress/final/``): ``sparsity``, ``target_sparsity``,
        #: ``target_reached``, ``nonzero_params``, ``total_params``, ``dense_bytes``, ``sparse_bytes`` and
        #: ``sparsity/<parameter>``.
        self.results: dict[str, float] = {}
        self._history: list[tuple[int, float, float]] = []  # (step, sparsity, monitored metric) per validation
        self._pending_state: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        #: The channel-pruned network with the pruned channels removed (``compact_on_fit_end``; rank zero), an
        #: ``nn.Module`` called like the network. ``None`` until fit end.
        self.compact_model: nn.Module | None = None
        #: The compact model's files (state dict, then ``.pt2``) once saved at fit end; empty before.
        self.compact_paths: list[str] = []
        self._example: structured.Call | None = None  # a CPU copy of one call of the network (channel pruning)
        self._catch_handle: Any = None
        self._caught: structured.Call | None = None

    def __getattr__(self, name: str) -> Any:
        # The settings read as attributes, as before the config existed (``callback.target_sparsity``).
        config = self.__dict__.get("config")
        if config is not None and name in PruningConfig.__dataclass_fields__:
            value = getattr(config, name)
            return list(value) if isinstance(value, tuple) else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PruningConfig.__dataclass_fields__ and "config" in self.__dict__:
            raise AttributeError(
                f"`{name}` is a setting of the frozen `config`: create a new {type(self).__name__} to change it."
            )
        super().__setattr__(name, value)

    #: What ``CompressionReport`` takes this callback for (see ``callbacks.report.CompressionCallback``).
    compression_role: ClassVar[str] = "pruning"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, structure=self.structure)

    @property
    def history(self) -> list[tuple[int, float, float]]:
        """``(step, sparsity, monitored metric)`` recorded at each validation end during fit (with ``monitor``)."""
        return list(self._history)

    def dashboard_categories(self) -> dict[str, list[tuple[str, list[str]]]]:
        """Charts of this callback in the TensorBoard custom-scalars layout."""
        charts = [
            ("sparsity: target vs measured", [rf"^{PREFIX}$", rf"^{_logging.PREFIX}/target_sparsity$"]),
            ("per-layer sparsity", [rf"^{PREFIX}/"]),
        ]
        if self.monitor:
            curve = (f"{self.monitor} vs sparsity (x axis: sparsity in per mille)", [re.escape(self._curve_tag())])
            charts.append(curve)
        return {"pruning": charts}

    @property
    def compression_started(self) -> bool:
        """Whether weights are pruned now (``CompressionReport`` takes its baseline from validations before)."""
        return self.pruner is not None and self.pruner.current_target > 0  # no weight count, no collective

    def compression_settings(self) -> dict[str, str | int | float]:
        """The settings ``CompressionReport`` puts in its report and in TensorBoard's HParams tab."""
        config = self.config
        return {
            "target_sparsity": config.target_sparsity,
            "schedule": config.schedule,
            "scope": config.scope,
            "structure": config.structure,
        }

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:  # a reused callback object starts afresh, unless a checkpoint restores it
            self.pruner, self.results, self._history, self._pending_state = None, {}, [], None
            self.compact_model, self._example, self._caught = None, None, None
            self.compact_paths = []

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        check_state_key(checkpoint, type(self).__name__, self.state_key, "`include`, `exclude` or `structure`")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor and not is_overridden("validation_step", pl_module):
            raise ValueError(
                f"`monitor`={self.monitor!r} needs a validation loop, but "
                f"{type(pl_module).__name__} does not define `validation_step`."
            )
        select_parameters(pl_module, self.config.include, self.config.exclude)  # fail before the sanity check
        if self.config.structure == "channel":
            target_module(pl_module, self.module)
        if self._pending_state is not None:
            check_same_settings(type(self).__name__, self._pending_state.get("config"), self.config.to_dict())
        _logging.write_dashboard_layout(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not in on_fit_start: the length of training is known without setting up the train dataloader
        # early, which would perturb a dataloader that resumes mid-epoch.
        # Pruned weights are re-zeroed right after every optimizer step, automatic or manual optimization alike.
        self._hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]
        weights = select_parameters(pl_module, self.config.include, self.config.exclude)
        group = shard_group(list(weights.values()))  # FSDP2: masks of the local shards, rankings over all shards
        if self.config.structure != "channel":
            config = self.config.resolve(trainer.estimated_stepping_batches)
            with _engine_warnings():
                self._start(trainer, GradualPruner(weights, config, shard_group=group))
            return
        if group is not None:
            raise ValueError(
                "`structure`='channel' needs the whole network to find its channel groups, but its parameters are"
                " sharded (FSDP2). Prune unstructured or N:M under sharding, or channels without sharding."
            )
        network = target_module(pl_module, self.module)
        example = pl_module.example_input_array if self.module is None else None
        if example is not None:
            args = example if isinstance(example, tuple) else () if isinstance(example, dict) else (example,)
            self._build_channel_pruner(trainer, pl_module, (args, example if isinstance(example, dict) else {}))
            return

        # No example input: catch the network's first training call; the groups are built before its backward.
        # The latest call is kept: under DDP, Lightning first calls the module with (batch, batch_idx) to redirect
        # ``training_step`` through ``forward``; the network's own call comes inside it.
        def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._caught = _detached_cpu((args, kwargs))

        self._catch_handle = network.register_forward_pre_hook(catch, with_kwargs=True)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self.pruner is None and self._caught is not None:
            self._remove_catch()
            # Masks start at the end of this step: zeroing weights now would modify tensors saved for backward.
            self._build_channel_pruner(trainer, pl_module, self._caught, step_now=False)

    def _build_channel_pruner(
        self, trainer: Trainer, pl_module: LightningModule, example: structured.Call, step_now: bool = True
    ) -> None:
        network = target_module(pl_module, self.module)
        prefix = f"{self.module}." if self.module else ""
        self._example = _detached_cpu(_two_rows(example))
        device_example = move_data_to_device(self._example, pl_module.device)
        with _engine_warnings():
            search = structured.find_channel_groups(
                network, device_example, prefix=prefix, include=self.config.include, exclude=self.config.exclude
            )
        if not search.groups:
            raise ValueError(
                f"`structure`='channel' found no channel group that can be pruned and removed exactly in"
                f" {type(network).__name__} (left out: {search.left_out or 'none'}; network outputs:"
                f" {search.output_groups}). Use `structure`='unstructured', or change `include`/`exclude`."
            )
        tensors = dict([*pl_module.named_parameters(), *pl_module.named_buffers()])
        weights = {name: tensors[name] for group in search.groups for name in group.tensors}
        config = self.config.resolve(trainer.estimated_stepping_batches)
        self._start(trainer, GradualPruner(weights, config, groups=search.groups), step_now)

    def _start(self, trainer: Trainer, pruner: GradualPruner, step_now: bool = True) -> None:
        self.pruner = pruner
        if self._pending_state is not None:
            self.pruner.load_state_dict(self._pending_state)
            self._history = [(int(s), float(sp), float(m)) for s, sp, m in self._pending_state.get("history", [])]
            self._pending_state = None
        _warn_if_ramp_outlasts_training(self.pruner.config, trainer.estimated_stepping_batches)
        if step_now:
            self._step(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.pruner is not None:
            self.pruner.mask_gradients()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.pruner is None and self.config.structure == "channel":
            where = f"`{self.module}`" if self.module else "the LightningModule's `forward`"
            raise RuntimeError(
                "IterativePruningCallback with `structure`='channel' needs an example input of the network: set"
                f" `example_input_array` on the LightningModule, or let one batch run through {where} (the"
                " training_step did not call it; pass the submodule it calls as `module`, e.g. module='net')."
            )
        if self.pruner is not None and trainer.global_step != self.pruner.last_step:  # an optimizer step happened
            self._step(trainer)

    @override
    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_monitor(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.monitor or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        assert self.pruner is not None
        self._check_monitor(trainer)
        sparsity = self.pruner.stats().sparsity
        metric = float(trainer.callback_metrics[self.monitor])
        self._history.append((trainer.global_step, sparsity, metric))
        _logging.log_scalars(trainer, {self._curve_tag(): metric}, step=round(1000 * sparsity))
        curve = _figures.metric_vs_sparsity({"this run": [(s, m) for _, s, m in self._history]}, metric=self.monitor)
        _logging.log_figure(
            trainer, f"{_logging.PREFIX}/pruning/{self.monitor}_vs_sparsity", curve, trainer.global_step
        )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        if self.pruner is None:  # training never started (e.g. `max_steps=0`)
            return
        self.pruner.apply()  # weight averaging (SWA, EMA) may have swapped in weights that were never masked
        report = self.pruner.report()
        self.results = report.to_metrics()
        self._log_report(trainer, report)
        if self.config.structure == "channel" and self.config.compact_on_fit_end and trainer.is_global_zero:
            self._compact(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()  # also when fit raised

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.pruner is None:
            return {}
        return {
            **self.pruner.state_dict(),
            "config": self.config.to_dict(),
            "history": [list(point) for point in self._history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start, once the selected parameters are known (Lightning restores callbacks earlier).
        self._pending_state = state_dict or None

    def channel_removal(self) -> structured.ChannelRemoval | None:
        """The removal of the pruned channels, which ``QATCallback`` and ``PostTrainingQuantCallback`` apply to
        their float copy so that the int8 model is the compact network (channel structure with
        ``compact_on_fit_end``); ``None`` otherwise."""
        if self.pruner is None or self._example is None or not self.pruner.groups:
            return None
        if self.config.structure != "channel" or not self.config.compact_on_fit_end:
            return None
        keep = {name: mask.detach().cpu() for name, mask in self.pruner.group_masks.items()}
        return structured.ChannelRemoval(self.pruner.groups, keep, self._example)

    # ----------------------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------------------
    def _compact(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the pruned channels from a copy, check it against the masked network, measure, save, log."""
        assert self.pruner is not None and self._example is not None
        network = target_module(pl_module, self.module)
        example = move_data_to_device(self._example, pl_module.device)
        compact = structured.remove_channels(network, self.pruner.groups, self.pruner.group_masks, example)
        # Checked and timed as float networks: with QAT in the same fit, fewer terms per sum can flip a rounding
        # of the fake quantization, which is no error of the removal (and the int8 model is measured by QAT).
        masked = structured._float(copy.deepcopy(network)).eval()
        evaluated = structured._float(copy.deepcopy(compact)).eval()
        with torch.no_grad():
            reference, output = structured._call(masked, example), structured._call(evaluated, example)
        scale = float(reference.abs().max())
        results = {"max_abs_diff": float((output - reference).abs().max()), "output_scale": scale}
        one = _resized(example, 1)
        results["params_before"], results["macs_before"] = map(float, structured.count_params_and_macs(masked, one))
        results["params_after"], results["macs_after"] = map(float, structured.count_params_and_macs(evaluated, one))
        for batch_size in latency_batch_sizes(trainer, None):
            timing = compare_latency(masked, evaluated, _resized(example, batch_size)[0], kwargs=example[1])
            results[f"latency_ms_before/batch_{batch_size}"] = timing["a"]["median_ms"]
            results[f"latency_ms_after/batch_{batch_size}"] = timing["b"]["median_ms"]
            results[f"speedup/batch_{batch_size}"] = timing["speedup"]
        path = artifact_path(trainer, self.compact_path, "compact_model.pt")
        results["state_dict_bytes"] = float(structured.save_compact(evaluated, path))
        try:
            results["pt2_bytes"] = float(
                structured.export_compact(evaluated, _resized(example, 2), path.with_suffix(".pt2"))
            )
        except Exception as err:  # torch.export cannot take every network; the state-dict form still rebuilds it
            rank_zero_warn(
                f"IterativePruningCallback: the compact model was not exported to .pt2 ({type(err).__name__}: {err})."
            )
        self.compact_model = compact
        self.compact_paths = [str(path), str(path.with_suffix(".pt2"))]
        self.results.update({f"compact/{key}": value for key, value in results.items()})
        _logging.log_scalars(
            trainer, {f"{_logging.PREFIX}/compact/{k}": v for k, v in results.items()}, trainer.global_step
        )
        if scale and results["max_abs_diff"] > 1e-5 * scale:
            rank_zero_warn(
                f"IterativePruningCallback: the compact model's outputs differ from the masked model's by"
                f" {results['max_abs_diff']:.3g} (output scale {scale:.3g})."
            )
        if self.verbose:
            speed = ", ".join(f"{k.split('/')[1]} {v:.2f}x" for k, v in results.items() if k.startswith("speedup/"))
            rank_zero_info(
                f"IterativePruningCallback compact model: params {results['params_before']:,.0f} ->"
                f" {results['params_after']:,.0f}, MACs {results['macs_before']:,.0f} -> {results['macs_after']:,.0f},"
                f" speedup {speed}; saved to {path} (+ .pt2)."
            )

    def _log_report(self, trainer: Trainer, report: PruningReport) -> None:
        """The final numbers to every logger, the per-layer figure and the summary table to TensorBoard."""
        step = trainer.global_step
        final_keys = ("sparsity", "target_reached", "nonzero_params", "dense_bytes", "sparse_bytes")
        _logging.log_scalars(trainer, {f"{_logging.PREFIX}/final/{key}": self.results[key] for key in final_keys}, step)
        if not report.target_reached:
            rank_zero_warn(
                f"IterativePruningCallback: training ended at step {step} with the masks at sparsity"
                f" {report.applied_target:.4f}, below `target_sparsity`={report.target_sparsity} (the ramp ends at"
                f" step {self.pruner.config.end_step if self.pruner else '?'}). Train longer, or set `end_step`"
                " within the training length."
            )
        per_layer = report.stats.per_tensor()
        figure = _figures.per_layer_bars(per_layer, title="sparsity per layer", xlabel="sparsity", limit_one=True)
        _logging.log_figure(trainer, f"{_logging.PREFIX}/pruning/per_layer_sparsity", figure, step)
        summary = report.markdown()
        _logging.log_text(trainer, f"{_logging.PREFIX}/pruning/summary", summary, step)
        if self.verbose:
            rank_zero_info(f"\nIterativePruningCallback summary (step {step}):\n{summary}")

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.pruner is not None:
            self.pruner.after_optimizer_step(optimizer)  # pruned weights exactly zero, by the cheapest safe pass

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._remove_catch()

    def _remove_catch(self) -> None:
        if self._catch_handle is not None:
            self._catch_handle.remove()
            self._catch_handle = None

    def _step(self, trainer: Trainer) -> None:
        """After an optimizer step: update masks when the schedule says so, log."""
        assert self.pruner is not None
        step = trainer.global_step
        updated = self.pruner.step(step)
        if updated or step % max(getattr(trainer, "log_every_n_steps", 50), 1) == 0:
            stats = self.pruner.stats()
            metrics = {PREFIX: stats.sparsity, f"{_logging.PREFIX}/target_sparsity": self.pruner.target(step)}
            if self.pruner.groups:
                pruned, total = self.pruner.channel_counts()
                metrics[f"{_logging.PREFIX}/channel_sparsity"] = pruned / max(total, 1)
            metrics.update({f"{PREFIX}/{name}": value for name, value in stats.per_tensor().items()})
            _logging.log_scalars(trainer, metrics, step=step)

    def _check_monitor(self, trainer: Trainer) -> None:
        if self.monitor and self.monitor not in trainer.callback_metrics:
            available = ", ".join(f"`{k}`" for k in trainer.callback_metrics) or "none"
            raise ValueError(
                f"`monitor`={self.monitor!r} is not logged by the LightningModule. Metrics logged so far: {available}."
            )

    def _curve_tag(self) -> str:
        return f"{_logging.PREFIX}/{self.monitor}_vs_sparsity"


def _warn_if_ramp_outlasts_training(config: PruningConfig, total_steps: float) -> None:
    assert config.end_step is not None
    if math.isfinite(total_steps) and config.end_step > total_steps:
        rank_zero_warn(
            f"IterativePruningCallback: the ramp ends at step {config.end_step} (`end_step`), but training is"
            f" estimated at {int(total_steps)} optimizer steps: `target_sparsity`={config.target_sparsity} will not"
            " be reached. Lower `end_step`/`start_step` or train longer."
        )


@contextmanager
def _engine_warnings() -> Iterator[None]:
    """The engine's notices (groups left out, N:M layers excluded) as rank-zero warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        rank_zero_warn(f"IterativePruningCallback: {warning.message}")


def _detached_cpu(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().cpu().clone() if isinstance(t, Tensor) else t, tree)


def _two_rows(example: structured.Call) -> structured.Call:
    """The first two rows of a batch-major call: the group search runs the network a few times per group, which on
    a whole training batch took seconds per group. Unchanged when the tensors do not share one leading size."""
    sizes = {t.shape[0] for t in torch.utils._pytree.tree_leaves(example) if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1 or next(iter(sizes)) <= 2:
        return example
    return torch.utils._pytree.tree_map(lambda t: t[:2] if isinstance(t, Tensor) and t.dim() > 0 else t, example)


def _resized(example: structured.Call, batch_size: int) -> structured.Call:
    """``example`` with every tensor argument repeated/trimmed along dim 0 to ``batch_size``."""

    def resize(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        return t.repeat(-(-batch_size // t.shape[0]), *([1] * (t.dim() - 1)))[:batch_size]

    return torch.utils._pytree.tree_map(resize, example[0]), torch.utils._pytree.tree_map(resize, example[1])
