"""Render the TensorBoard dashboard of a log directory to PNG screenshots, with headless Chromium.

Starts a real TensorBoard on loopback over ``--logdir``, opens the Time Series (scalars), Custom Scalars and HParams
views in headless Chromium (Debian: ``apt-get install -y chromium``), and saves one PNG per view::

    python examples/render_dashboard.py                       # the demo's logs -> docs/dashboard_*.png
    python examples/render_dashboard.py --logdir lightning_logs --out /tmp/shots

TensorBoard's web app is JavaScript, so Chromium is given a virtual-time budget to load the data and draw the charts
before the screenshot is taken. Each screenshot uses a fresh browser profile (nothing from a previous run's local
storage changes the views) and no network besides the local server.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

from study import DEFAULT_LOGDIR  # the demo study's log directory, "runs/demo"
from tools.tensorboard_client import TensorBoardClient, running_tensorboard

#: Tags shown in the scalars screenshot: the sparsity curves, the metric-vs-sparsity curve, accuracy and loss.
DEFAULT_SCALARS_FILTER = r"^(compress/(sparsity|target_sparsity|[^/]+_vs_sparsity)|val_acc|train_loss)$"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
]


def view_urls(base_url: str, scalars_filter: str) -> dict[str, str]:
    """``{file stem: URL}`` of the views to render.

    The Time Series view reads its tag filter, smoothing and feature flags from the query string (``forceSVG``:
    its default WebGL line charts stay empty in a GPU-less headless browser); the legacy dashboards (Custom Scalars)
    read their settings from the fragment.
    """
    query = urllib.parse.urlencode({"tagFilter": scalars_filter, "smoothing": 0, "forceSVG": "true"})
    return {
        "dashboard_scalars": f"{base_url}/?{query}#timeseries",
        "dashboard_custom_scalars": f"{base_url}/#custom_scalars&_smoothingWeight=0",
        "dashboard_hparams": f"{base_url}/#hparams",
    }


def find_chromium(given: str | None) -> str:
    """The Chromium executable: ``given``, else the first of ``chromium``/``chromium-browser``/``google-chrome``."""
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        f"`--chromium` must name a Chromium executable, got {given!r}; none found on PATH."
        " Install it with `apt-get install -y chromium`."
    )


def screenshot(chromium: str, url: str, path: Path, *, width: int, height: int, budget_ms: int) -> None:
    """Load ``url`` in a fresh headless Chromium profile and save a ``width`` x ``height`` PNG to ``path``."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={path}",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget_ms / 1000 + 120, check=False)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"Chromium failed on {url} (exit code {done.returncode}):\n{done.stderr[-2000:]}")


def render(
    logdir: Path,
    out: Path,
    *,
    chromium: str | None = None,
    scalars_filter: str = DEFAULT_SCALARS_FILTER,
    width: int = 1600,
    height: int = 1000,
    hparams_width: int = 2400,
    budget_ms: int = 20_000,
) -> list[Path]:
    """Start TensorBoard over ``logdir`` and save the screenshots into ``out``; return their paths."""
    if not logdir.is_dir():
        raise FileNotFoundError(
            f"`--logdir` must be an existing log directory, got {str(logdir)!r}: run the demo first"
            " (`bash examples/demo.sh`) or pass the log directory of your runs."
        )
    browser = find_chromium(chromium)
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with running_tensorboard(logdir) as url:
        runs = TensorBoardClient(url).runs()
        if not runs:
            raise FileNotFoundError(f"`--logdir` {str(logdir)!r} has no TensorBoard event files.")
        print(f"TensorBoard at {url}: {len(runs)} runs ({', '.join(runs)})")
        for stem, view in view_urls(url, scalars_filter).items():
            path = out / f"{stem}.png"
            # The HParams table shows the first 5 settings and 5 metrics by default: wider, so they all fit.
            view_width = hparams_width if stem == "dashboard_hparams" else width
            screenshot(browser, view, path, width=view_width, height=height, budget_ms=budget_ms)
            print(f"saved {path} ({path.stat().st_size / 1024:.0f} KB)")
            saved.append(path)
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, default=Path(DEFAULT_LOGDIR), help="TensorBoard log directory")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where to save the PNGs")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: found on PATH)")
    parser.add_argument("--scalars-filter", default=DEFAULT_SCALARS_FILTER, help="tag regex of the scalars view")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--hparams-width", type=int, default=2400, help="window width of the HParams view")
    parser.add_argument("--budget-ms", type=int, default=20_000, help="virtual time Chromium gives the page")
    args = parser.parse_args(argv)
    render(
        args.logdir,
        args.out,
        chromium=args.chromium,
        scalars_filter=args.scalars_filter,
        width=args.width,
        height=args.height,
        hparams_width=args.hparams_width,
        budget_ms=args.budget_ms,
    )


if __name__ == "__main__":
    main()
