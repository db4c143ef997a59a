"""``examples/render_dashboard.py``: screenshots of a real TensorBoard in headless Chromium (slow; needs Chromium)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import urllib.parse
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import image as mpimg

from helpers import TinyClassifier, loader, trainer
from lightning_compress import IterativePruningCallback

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "render_dashboard.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("render_dashboard", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_view_urls():
    urls = _load_script().view_urls("http://127.0.0.1:6006", "^compress/sparsity$")
    assert set(urls) == {"dashboard_scalars", "dashboard_custom_scalars", "dashboard_hparams"}
    scalars = urllib.parse.urlsplit(urls["dashboard_scalars"])
    assert scalars.fragment == "timeseries"
    query = urllib.parse.parse_qs(scalars.query)
    assert query["tagFilter"] == ["^compress/sparsity$"] and query["forceSVG"] == ["true"]
    assert urls["dashboard_custom_scalars"].endswith("#custom_scalars&_smoothingWeight=0")


def test_missing_logdir_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="`--logdir` must be an existing log directory"):
        _load_script().render(tmp_path / "nope", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium: apt-get install -y chromium")
def test_renders_three_views(tmp_path):
    logs = tmp_path / "logs"
    pruning = IterativePruningCallback(target_sparsity=0.5, monitor="val_acc", update_every_n_steps=1, verbose=False)
    fit = trainer(logs, [pruning], max_epochs=2, log_every_n_steps=1, logger=TensorBoardLogger(logs, name="tiny"))
    fit.fit(TinyClassifier(), loader(128), loader(64))

    saved = _load_script().render(
        logs, tmp_path / "shots", width=1000, height=700, hparams_width=1200, budget_ms=15_000
    )

    assert [p.name for p in saved] == ["dashboard_scalars.png", "dashboard_custom_scalars.png", "dashboard_hparams.png"]
    for path, width in zip(saved, (1000, 1000, 1200), strict=True):
        pixels = mpimg.imread(path)
        assert pixels.shape[:2] == (700, width), path.name
        # Not a blank page: TensorBoard's header, charts and text give many different colours.
        assert pixels[..., :3].std() > 0.1, path.name
