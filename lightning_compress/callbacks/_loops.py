"""What the QAT and PTQ callbacks share: find the target network, capture an example input, run the user's own
validation (or test) loop with a replacement network, time it, and log the results.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_compress.engine.measure import Evaluation

#: The positional and keyword arguments of one call of a network.
Call = tuple[tuple[Any, ...], dict[str, Any]]


def registered_module(pl_module: LightningModule, name: str | None) -> nn.Module:
    """The module registered as ``name`` (``None``: ``pl_module``), as it is called: a ``torch.compile`` wrapper
    stays wrapped (hooks that catch its calls go there)."""
    if name is None:
        return pl_module
    modules = dict(pl_module.named_modules())
    if name not in modules:
        children = ", ".join(n for n, _ in pl_module.named_children()) or "none"
        raise ValueError(
            f"`module`={name!r} is not a submodule of {type(pl_module).__name__}. Its submodules: {children}."
        )
    return modules[name]


def target_module(pl_module: LightningModule, name: str | None) -> nn.Module:
    """The network to quantize: ``pl_module`` itself (``name=None``) or its submodule ``name``, unwrapped from
    ``torch.compile`` (the original module: its layer names, and what export captures with a dynamic batch)."""
    return unwrap_compiled(registered_module(pl_module, name))


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``module`` itself."""
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod  # type: ignore[assignment]
    return module


def channel_removal(trainer: Trainer, pl_module: LightningModule, name: str | None, owner: str) -> Any:
    """The ``ChannelRemoval`` of a channel-pruning callback of this fit on the same network (the int8 model is then
    the compact network), else ``None``; a pruning callback on another network is named in a warning."""
    target = target_module(pl_module, name)
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        removal_of = getattr(callback, "channel_removal", None)
        if getattr(callback, "compression_role", None) != "pruning" or not callable(removal_of):
            continue
        removal = removal_of()
        if removal is None:
            continue
        if target_module(pl_module, callback.module) is not target:
            rank_zero_warn(
                f"{owner}: channel pruning targets `module`={callback.module!r} and quantization {name!r}: the int8"
                " model is converted from the masked network, pruned channels not removed. Give both callbacks the"
                " same `module` to convert the compact network."
            )
            return None
        return removal
    return None


class InputCatcher:
    """Keeps a CPU copy of the positional and keyword arguments of the first call to ``module`` (for export)."""

    def __init__(self) -> None:
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] = {}
        self._handle: Any = None

    def attach(self, module: nn.Module) -> None:
        if self.args is None and self._handle is None:
            self._handle = module.register_forward_pre_hook(self._catch, with_kwargs=True)

    def _catch(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = _detached_cpu(args), _detached_cpu(kwargs)
        self.detach()

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _detached_cpu(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().cpu().clone() if isinstance(t, Tensor) else t, tree)


def example_inputs(
    pl_module: LightningModule,
    module_name: str | None,
    catcher: InputCatcher,
    saved: Call | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs to export (and to measure per-layer error) with, of a batch of at least 2 rows.

    In order: a real batch caught in this fit (training, validation or sanity check), ``saved`` (the example kept
    in a checkpoint: a resumed fit that has nothing left to train runs no batch), else ``example_input_array``
    (for a submodule target, the LightningModule's ``forward`` is run on it and the submodule's call recorded). A
    real batch comes first: ``example_input_array`` is often zeros, which gives a meaningless quantization error.
    A batch of 1 is repeated to 2 rows, so that export keeps the batch dimension dynamic.
    """
    if catcher.args is not None:
        return at_least_two_rows((catcher.args, catcher.kwargs))
    if saved is not None:
        return at_least_two_rows(saved)
    call = _call_of_example_array(pl_module, module_name)
    if call is not None:
        return at_least_two_rows(call)
    raise RuntimeError(
        "No example input to export the model with: set `example_input_array` on the LightningModule, or let"
        " at least one training or validation batch run before the conversion."
    )


def _call_of_example_array(pl_module: LightningModule, module_name: str | None) -> Call | None:
    """The call of the target network when the LightningModule runs ``example_input_array`` (``None``: none set)."""
    example = pl_module.example_input_array
    if example is None:
        return None
    if module_name is None:
        if isinstance(example, dict):
            return (), _detached_cpu(example)
        args = example if isinstance(example, tuple) else (example,)
        return _detached_cpu(args), {}
    from lightning.fabric.utilities.apply_func import move_data_to_device

    catcher = InputCatcher()
    catcher.attach(registered_module(pl_module, module_name))
    was_training = pl_module.training
    try:
        pl_module.eval()  # observers move in training mode only
        with torch.no_grad():
            example = move_data_to_device(example, pl_module.device)
            if isinstance(example, dict):
                pl_module(**example)
            elif isinstance(example, tuple):
                pl_module(*example)
            else:
                pl_module(example)
    finally:
        catcher.detach()
        pl_module.train(was_training)
    if catcher.args is None:
        raise RuntimeError(
            f"`example_input_array` went through {type(pl_module).__name__}.forward, which never called "
            f"`{module_name}`: set `module` to the submodule `forward` calls, or let a batch run first."
        )
    return catcher.args, catcher.kwargs


def _batch_size(call: Call) -> int | None:
    """The shared first dimension of every tensor argument with at least one dimension (``None``: none shared)."""
    sizes = {t.shape[0] for t in torch.utils._pytree.tree_leaves(call) if isinstance(t, Tensor) and t.ndim >= 1}
    return sizes.pop() if len(sizes) == 1 else None


def at_least_two_rows(call: Call) -> Call:
    """``call`` with a batch of 1 repeated to 2 rows (export specializes a batch of 1 to a fixed shape)."""
    if _batch_size(call) != 1:
        return call
    return torch.utils._pytree.tree_map(
        lambda t: torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim >= 1 else t, call
    )


def first_rows(call: Call, rows: int) -> Call:
    """``call`` with its batch cut to its first ``rows`` rows (unchanged when the batch dimension is unclear)."""
    size = _batch_size(call)
    if size is None or size <= rows:
        return call
    return torch.utils._pytree.tree_map(
        lambda t: t[:rows].clone() if isinstance(t, Tensor) and t.ndim >= 1 else t, call
    )


_PLAIN = (Tensor, bool, int, float, str, type(None))


def call_to_state(call: Call | None, rows: int = 8) -> dict[str, Any]:
    """A small example call as checkpoint state (``weights_only`` loads tensors, numbers, strings and containers);
    ``{}`` when there is none or it holds anything else."""
    if call is None:
        return {}
    args, kwargs = first_rows(call, rows)
    if not all(isinstance(leaf, _PLAIN) for leaf in torch.utils._pytree.tree_leaves((args, kwargs))):
        return {}
    return {"args": list(args), "kwargs": dict(kwargs)}


def call_from_state(state: Any) -> Call | None:
    """The example call saved by ``call_to_state`` (``None`` when the state holds none)."""
    if not isinstance(state, dict) or "args" not in state:
        return None
    return tuple(state["args"]), dict(state.get("kwargs", {}))


class Recorder(nn.Module):
    """Calls ``network`` and keeps what goes through it: a call count, and a CPU copy of each call's arguments
    (``keep_inputs``, for calibration) and of its tensor outputs (``keep_outputs``, for top-1 agreement)."""

    network: Any

    def __init__(self, network: Any, keep_inputs: bool = False, keep_outputs: bool = False) -> None:
        super().__init__()
        # Not registered as a submodule: the loop's ``.eval()``/``.to()`` must not reach an exported program
        # (``ExportedProgram.module()`` refuses ``train()``); the caller puts ``network`` in eval mode itself.
        object.__setattr__(self, "network", network)
        self.keep_inputs = keep_inputs
        self.keep_outputs = keep_outputs
        self.calls = 0
        self.inputs: list[Call] = []
        self.outputs: list[Tensor] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.keep_inputs:
            self.inputs.append(_detached_cpu((args, kwargs)))
        out = self.network(*args, **kwargs)
        if self.keep_outputs and isinstance(out, Tensor):
            self.outputs.append(out.detach().cpu())
        return out


@contextlib.contextmanager
def _swapped(pl_module: LightningModule, module_name: str | None, replacement: nn.Module) -> Iterator[None]:
    """Put ``replacement`` where the target network is (the submodule, or the LightningModule's ``forward``)."""
    if module_name is None:
        # A plain instance attribute (``nn.Module.__setattr__`` would register a submodule named "forward" instead,
        # which ``__call__`` never uses): it shadows the class's ``forward`` until removed.
        object.__setattr__(pl_module, "forward", replacement)
        try:
            yield
        finally:
            pl_module.__dict__.pop("forward", None)
        return
    parent_name, _, child = module_name.rpartition(".")
    parent = pl_module.get_submodule(parent_name)
    original = getattr(parent, child)
    setattr(parent, child, replacement)
    try:
        yield
    finally:
        setattr(parent, child, original)


@contextlib.contextmanager
def _local_metrics(pl_module: LightningModule) -> Iterator[None]:
    """Keep torchmetrics from synchronizing across processes while only this rank measures (DDP: it would hang)."""
    from torchmetrics import Metric

    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved = [(m.sync_on_compute, m.dist_sync_on_step) for m in metrics]
    for m in metrics:
        m.sync_on_compute = False
        m.dist_sync_on_step = False
    try:
        yield
    finally:
        for m, (on_compute, on_step) in zip(metrics, saved, strict=True):
            m.sync_on_compute, m.dist_sync_on_step = on_compute, on_step


@contextlib.contextmanager
def _quiet_inner_loop() -> Iterator[None]:
    """Silence what the inner CPU loop prints and warns that says nothing about the user's setup (accelerators found,
    ``limit_*_batches`` echoes, few workers, a shuffled calibration loader)."""
    info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = info.level
    info.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=r".*shuffling enabled.*")
            yield
    finally:
        info.setLevel(level)


def run_inner_loop(
    trainer: Trainer,
    pl_module: LightningModule,
    module_name: str | None,
    network: nn.Module,
    loop: Literal["validate", "test"],
    dataloaders: Any,
    limit_batches: int | float,
    callbacks: Sequence[Callback] = (),
) -> dict[str, float]:
    """Run the user's ``validation_step`` (or ``test_step``) over ``dataloaders`` with ``network`` as the target.

    A separate CPU ``Trainer`` runs the loop, so the user's logging (``self.log``, torchmetrics) works unchanged and
    the outer Trainer's callbacks (checkpointing, early stopping) never see the swapped model. Its console chatter is
    silenced, and torchmetrics do not synchronize across processes (only this rank runs the loop). The
    LightningModule is restored afterwards: its network, its trainer reference, its device and its mode.

    Returns:
        The metrics the loop logged.
    """
    device, was_training = pl_module.device, pl_module.training
    try:
        with _quiet_inner_loop():
            inner = Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                callbacks=list(callbacks),
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=limit_batches,
                limit_test_batches=limit_batches,
            )
            run = inner.test if loop == "test" else inner.validate
            with _swapped(pl_module, module_name, network), _local_metrics(pl_module):
                results = run(pl_module, dataloaders=dataloaders, verbose=False)
    finally:
        pl_module.trainer = trainer
        pl_module.to(device)
        pl_module.train(was_training)
    return {k: float(v) for k, v in results[0].items()} if results else {}


def evaluate_network(
    trainer: Trainer,
    pl_module: LightningModule,
    module_name: str | None,
    network: Any,
    loop: Literal["validate", "test"] = "validate",
) -> Evaluation:
    """Run the user's ``validation_step`` (or ``test_step``) over the trainer's data with ``network`` as the target.

    Returns:
        The metrics the loop logged, and the target network's outputs per batch.

    Raises:
        RuntimeError: If the trainer has no dataloader for ``loop``, or the loop never called the target.
    """
    dataloaders = trainer.test_dataloaders if loop == "test" else trainer.val_dataloaders
    if dataloaders is None and loop == "validate" and trainer.state.fn == "fit":
        # A fit resumed after training ended runs no validation, so its dataloaders were never set up.
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        dataloaders = trainer.val_dataloaders
    if dataloaders is None:
        raise RuntimeError(f"There is no {loop} dataloader to measure the quantized model on.")
    if network is pl_module:
        # The whole LightningModule is the target and is evaluated as it is: record its own (class) ``forward``,
        # bound now, because the instance's ``forward`` is about to be the recorder itself.
        network = type(pl_module).forward.__get__(pl_module)
    limit = trainer.limit_test_batches if loop == "test" else trainer.limit_val_batches
    recorder = Recorder(network, keep_outputs=True)
    metrics = run_inner_loop(trainer, pl_module, module_name, recorder, loop, dataloaders, limit)
    if recorder.calls == 0:
        where = f"`{module_name}`" if module_name else "`forward`"
        name, step = ("test", "test_step") if loop == "test" else ("validation", "validation_step")
        raise RuntimeError(
            f"The {name} loop never called {where}, so the quantized network was not evaluated. Pass the name of"
            f" the submodule your `{step}` calls as `module` (e.g. module='net')."
        )
    return Evaluation(metrics, recorder.outputs)


def latency_batch_sizes(trainer: Trainer, given: list[int] | None) -> list[int]:
    """The batch sizes to time: ``given``, else 1 and the validation batch size (64 when it has none)."""
    if given:
        return list(given)
    loaders = trainer.val_dataloaders
    first = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    return sorted({1, getattr(first, "batch_size", None) or 64})


def artifact_path(trainer: Trainer, given: str | None, filename: str) -> Path:
    """Where to save the int8 program: ``given``, else the first logger's ``log_dir``, else ``default_root_dir``."""
    if given:
        return Path(given)
    log_dir = next((lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None)
    return Path(log_dir or trainer.default_root_dir) / filename


def int8_artifact_path(trainer: Trainer, given: str | None, stem: str, backend: str, auto: bool = False) -> Path:
    """Where to save the int8 artifact of ``backend``: ``given``, else ``<log_dir>/<stem>.onnx`` (ONNX Runtime) or
    ``<stem>.pt2`` (Inductor). Under ``backend="auto"`` a given ``.pt2``/``.onnx`` path takes the chosen backend's
    suffix."""
    suffix = ".onnx" if backend == "onnxruntime" else ".pt2"
    path = artifact_path(trainer, given, stem + suffix)
    if auto and given and path.suffix.lower() in (".pt2", ".onnx"):
        path = path.with_suffix(suffix)
    return path


def preflight(
    backend: str, network: nn.Module, call: Call, config: Any, full: bool = True, float_layers: Sequence[str] = ()
) -> float:
    """Fail before training when the fit-end int8 conversion of ``network`` would fail: with ``full``, the whole
    conversion (export, dead-code elimination, prepare, calibrate on the one call, convert) runs once on a copy and
    is thrown away; without, only the export is tried (``check_exportable_for``). ``"auto"`` fails only if neither
    backend converts. Returns the seconds it took.

    Raises:
        OrtConversionError: or ``Int8ConversionError``: the conversion's own error, prefixed with "Preflight".
    """
    import dataclasses
    import time

    from lightning_compress.engine.convert import Int8ConversionError
    from lightning_compress.engine.convert.backend import convert_with_backend
    from lightning_compress.engine.ort import OrtConversionError

    start = time.perf_counter()
    if not full:
        check_exportable_for(backend, network, call)
        return time.perf_counter() - start
    args, kwargs = at_least_two_rows(call)
    one_batch = dataclasses.replace(config, calibration_batches=1)
    errors: list[Exception] = []
    for name in ("onnxruntime", "inductor") if backend == "auto" else (backend,):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fit-end conversion gives its notes; a trial run stays quiet
                convert_with_backend(name, network, args, kwargs, config=one_batch, float_layers=float_layers)
            return time.perf_counter() - start
        except (OrtConversionError, Int8ConversionError) as err:
            errors.append(err)
    what = "\n\nAnd for the 'inductor' backend: ".join(str(e) for e in errors)
    raise type(errors[-1])(
        f"Preflight (the fit-end int8 conversion tried before training on a copy, with one batch; `preflight=False`"
        f" skips it): {what}"
    ) from errors[-1]


def check_exportable_for(backend: str, network: nn.Module, call: Call) -> None:
    """Fail before training, quoting the exporter, when ``backend`` will not be able to convert ``network``.

    ``"auto"`` fails only if neither backend can take the model.
    """
    from lightning_compress.engine.convert import Int8ConversionError, check_exportable
    from lightning_compress.engine.ort import OrtConversionError, export_onnx

    if backend == "inductor":
        check_exportable(network, call[0], call[1])
        return
    args, kwargs = at_least_two_rows(call)
    if backend == "onnxruntime":
        export_onnx(network, args, example_kwargs=kwargs)  # raises OrtConversionError quoting the exporter's reason
        return
    try:
        export_onnx(network, args, example_kwargs=kwargs)
    except OrtConversionError as ort_error:
        try:
            check_exportable(network, call[0], call[1])
        except Int8ConversionError as pt2e_error:
            raise Int8ConversionError(f"{ort_error}\n\nAnd for the 'inductor' backend: {pt2e_error}") from None


# --------------------------------------------------------------------------------------------------------------------
# FSDP2 (Lightning's ModelParallelStrategy): the whole model on rank zero, gathered
# --------------------------------------------------------------------------------------------------------------------


def _no_configure_model() -> None:
    """``configure_model`` of a rank-zero copy: it is complete and must not be sharded again."""


class FullModelOnRankZero:
    """What the int8 callbacks need under FSDP2: the whole LightningModule, unsharded, on rank zero.

    ``capture`` (in ``setup``, before ``configure_model`` shards the model) keeps a meta-device copy of the
    LightningModule: no memory for the weights. ``gather`` (every process, at the same point) collects the full state
    dict on rank zero's CPU and fills a fresh copy with it: a plain LightningModule that rank zero converts, calibrates
    and measures alone, with the usual code (the sharded one would wait in FSDP's all-gathers for the other ranks).
    Under any other strategy ``active`` is ``False`` and nothing is kept.
    """

    def __init__(self) -> None:
        self._skeleton: LightningModule | None = None
        self._share: list[object] = []

    @property
    def active(self) -> bool:
        """Whether the model is (to be) sharded by FSDP2 and the whole-model work goes through ``gather``."""
        return self._skeleton is not None

    def capture(self, trainer: Trainer, pl_module: LightningModule, owner: str) -> None:
        """Keep a meta-device copy of ``pl_module`` under ``ModelParallelStrategy``; refuse strategies that cannot work.

        Raises:
            ValueError: Under ``FSDPStrategy`` (FSDP1), with ``tensor_parallel_size > 1``, or if the module was
                sharded before ``setup`` (it cannot be copied then).
            TypeError: If the module cannot be deep-copied.
        """
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        from lightning_compress.engine.distributed import is_fully_sharded, meta_copy

        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                f"{owner} does not support `strategy`=FSDPStrategy (FSDP1, whose flat parameters hide the layers):"
                " use `ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with `fully_shard` in"
                " `configure_model` (FSDP2), or DDP."
            )
        if not isinstance(strategy, ModelParallelStrategy):
            self._skeleton = None
            return
        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel > 1:
            raise ValueError(
                f"{owner} supports ModelParallelStrategy with FSDP2 data parallelism only: `tensor_parallel_size`"
                f" must be 1, got {tensor_parallel}."
            )
        if is_fully_sharded(pl_module):
            if self._skeleton is not None:  # a later stage (test after fit) of the module already sharded
                return
            raise ValueError(
                f"{owner}: {type(pl_module).__name__} is already sharded with `fully_shard` when the callback is set"
                " up; apply `fully_shard` in `configure_model` (it runs after the callbacks' `setup`)."
            )
        self._share = [trainer, strategy.device_mesh]
        try:
            skeleton = meta_copy(pl_module, self._share)
        except Exception as err:  # e.g. a lock or an open file among the module's attributes
            raise TypeError(
                f"{owner} under ModelParallelStrategy copies {type(pl_module).__name__} in `setup` (weights on the"
                " `meta` device) to rebuild it unsharded on rank zero, and the copy failed: "
                f"{type(err).__name__}: {err}. Keep objects that cannot be deep-copied out of the module's attributes."
            ) from err
        assert isinstance(skeleton, LightningModule)
        self._skeleton = skeleton

    def gather(self, pl_module: LightningModule) -> LightningModule | None:
        """The whole ``pl_module`` on rank zero's CPU (a plain copy with the gathered weights); ``None`` elsewhere.

        A collective: every process calls it at the same point.
        """
        import torch.distributed as dist

        from lightning_compress.engine.distributed import gather_full_state, materialize, meta_copy

        assert self._skeleton is not None
        state = gather_full_state(pl_module)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        # (Non-persistent buffers are in no state dict; FSDP2 does not shard buffers, so this rank's are whole.)
        copy = materialize(meta_copy(self._skeleton, self._share), state, dict(pl_module.named_buffers()))
        assert isinstance(copy, LightningModule)
        # The copy is complete: an inner Trainer's ``configure_model`` call must not shard it again.
        object.__setattr__(copy, "configure_model", _no_configure_model)
        return copy.train(pl_module.training)
