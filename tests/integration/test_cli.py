"""LightningCLI can build the callbacks from YAML with `class_path` (all arguments are typed, no callables)."""

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from helpers import TinyClassifier
from lightning_compress import IterativePruningCallback
from lightning_compress.demos import FashionMNISTDataModule, ImageClassifier

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


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _expected_init_args(config: dict) -> list[tuple[str, dict]]:
    return [
        (cb["class_path"].rsplit(".", 1)[1], cb.get("init_args", {}))
        for cb in config["trainer"]["callbacks"]
        if cb["class_path"].startswith("lightning_compress.")
    ]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_yaml_builds_its_callbacks(path, tmp_path, monkeypatch):
    """Each example YAML through LightningCLI (the classes of examples/cli.py), as written: every init_arg arrives."""
    monkeypatch.chdir(tmp_path)  # the TensorBoard logger of the YAML writes under the working directory
    config = yaml.safe_load(path.read_text())
    cli = LightningCLI(ImageClassifier, FashionMNISTDataModule, run=False, args=["--config", str(path)])
    built = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    expected = _expected_init_args(config)
    assert expected, f"{path.name} configures no lightning_compress callback"
    for class_name, init_args in expected:
        callback = built[class_name]
        for key, value in init_args.items():
            assert _setting(callback, key) == value, (path.name, class_name, key)


def _setting(callback, key):
    """A setting as the callback holds it: an attribute, or a field of one of its config objects."""
    if hasattr(callback, key):
        return getattr(callback, key)
    for holder in ("config", "conversion", "schedule"):
        if hasattr(getattr(callback, holder, None), key):
            return getattr(getattr(callback, holder), key)
    raise AssertionError(f"{type(callback).__name__} does not hold the setting {key!r}")
