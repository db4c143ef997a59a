"""LightningCLI can build the callbacks from YAML with `class_path` (all arguments are typed, no callables)."""

import pytest
from lightning.pytorch.cli import LightningCLI

from helpers import TinyClassifier
from lightning_compress import IterativePruningCallback

CONFIG = """
trainer:
  accelerator: cpu
  logger: false
  callbacks:
    - class_path: lightning_compress.IterativePruningCallback
      init_args:
        target_sparsity: 0.95
        schedule: linear
        start_step: 10
        end_step: 200
        update_every_n_steps: 5
        exclude: ["fc2"]
        monitor: val_acc
"""


def test_yaml_class_path(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = LightningCLI(TinyClassifier, run=False, args=["--config", str(config)])
    (pruner,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, IterativePruningCallback)]
    assert (pruner.target_sparsity, pruner.schedule, pruner.start_step, pruner.end_step) == (0.95, "linear", 10, 200)
    assert pruner.exclude == ["fc2"] and pruner.monitor == "val_acc"


def test_yaml_bad_value_reports_argument(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("schedule: linear", "schedule: quadratic"))
    with pytest.raises(SystemExit):
        LightningCLI(TinyClassifier, run=False, args=["--config", str(config)])
    error = capsys.readouterr().err
    assert 'Parser key "schedule"' in error and "quadratic" in error and "'cubic'" in error
