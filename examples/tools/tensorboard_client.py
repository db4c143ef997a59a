"""Run a real TensorBoard server over a log directory and read what it shows through its HTTP data API.

Used by the tests (what the callbacks write must really appear in TensorBoard, not only in the event files) and by
``examples/render_dashboard.py`` (screenshots of the dashboard). Only the standard library is needed::

    from tools.tensorboard_client import TensorBoardClient, running_tensorboard

    with running_tensorboard("lightning_logs") as url:
        client = TensorBoardClient(url)
        print(client.runs(), client.tags("scalars"))

The routes are those of TensorBoard 2.x's plugins (``tensorboard/plugins/*/..._plugin.py``): ``/data/runs``,
``/data/plugin/<plugin>/tags``, ``/data/plugin/scalars/scalars``, ``/data/plugin/images/images`` and
``individualImage``, ``/data/plugin/text/text``, ``/data/plugin/custom_scalars/layout`` and the hparams plugin's
``experiment`` and ``session_groups`` (POST, JSON body).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Every session status, so that the hparams plugin lists all runs whatever their status.
_ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
#: TensorBoard prints ``TensorBoard 2.21.0 at http://127.0.0.1:40123/ (Press CTRL+C to quit)`` once it listens.
_URL_LINE = re.compile(r"TensorBoard \S+ at (http://\S+?)/? ")
#: Requests to the loopback server must never go through an HTTP proxy set in the environment (``http_proxy``).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def running_tensorboard(
    logdir: str | Path,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    reload_interval: float | None = None,
    timeout: float = 60.0,
) -> Iterator[str]:
    """Start ``tensorboard`` over ``logdir``, yield its base URL once it answers, and always stop it.

    The server runs offline: ``--load_fast=false`` keeps the pure-Python loader (no separate data-server binary),
    and it binds to ``host`` only. It is terminated (then killed, if needed) when the block exits, also on errors.

    Args:
        logdir: Directory with the event files (searched recursively; each sub-directory with events is a run).
        port: Port to listen on; ``0`` lets the operating system choose a free one.
        host: Interface to bind.
        reload_interval: ``None``: load the logs once, completely, before answering (for finished runs: what the
            first request sees is final). A number: reload every that many seconds (for runs still training).
        timeout: Seconds to wait for the server to answer.

    Yields:
        The base URL, e.g. ``"http://127.0.0.1:40123"`` (no trailing slash).

    Raises:
        FileNotFoundError: ``logdir`` does not exist (TensorBoard would silently serve an empty dashboard).
        RuntimeError: The process exited before answering (its output is in the message).
        TimeoutError: It did not answer within ``timeout`` seconds.
    """
    if not Path(logdir).is_dir():
        raise FileNotFoundError(f"`logdir` must be an existing directory, got {str(logdir)!r}.")
    reload = ["--reload_interval", "0", "--reload_task", "blocking"]
    if reload_interval is not None:
        reload = ["--reload_interval", str(reload_interval)]
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        host,
        "--port",
        str(port),
        "--load_fast=false",
        *reload,
    ]
    # The server's output goes to a file rather than a pipe (a full pipe would block it); it is read with
    # ``os.pread``, which does not move the file offset the server writes at.
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield _wait_until_serving(process, output.fileno(), timeout)
        finally:
            _stop(process)


def _read_output(fd: int) -> str:
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def _wait_until_serving(process: subprocess.Popen[bytes], output_fd: int, timeout: float) -> str:
    """Poll the server's output for its URL, then ``/data/environment`` until it answers."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        text = _read_output(output_fd)
        if process.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {process.returncode} before serving:\n{text}")
        if url is None and (match := _URL_LINE.search(text)):
            url = match.group(1)
        if url is not None:
            with contextlib.suppress(OSError), _OPENER.open(f"{url}/data/environment", timeout=5):
                return url
        time.sleep(0.2)
    raise TimeoutError(f"tensorboard did not answer within {timeout:.0f} s; its output:\n{_read_output(output_fd)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process``, kill it if it is still alive after 10 s, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class ScalarPoint:
    """One point of a scalar series as TensorBoard serves it."""

    wall_time: float
    step: int
    value: float


@dataclass(frozen=True)
class TextEntry:
    """One text summary: TensorBoard serves the markdown rendered to (sanitized) HTML."""

    wall_time: float
    step: int
    html: str


@dataclass(frozen=True)
class TensorBoardClient:
    """The HTTP data API of a running TensorBoard (the requests its web frontend makes).

    Args:
        base_url: As yielded by :func:`running_tensorboard`, without trailing slash.
        timeout: Seconds to wait for each response.
    """

    base_url: str
    timeout: float = 30.0

    # ---- generic requests ---------------------------------------------------------------------------------------
    def get_bytes(self, route: str, **params: Any) -> bytes:
        """GET ``route`` (e.g. ``"/data/runs"``) with query ``params``; return the body."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return self._open(urllib.request.Request(f"{self.base_url}{route}{query}"))

    def get_json(self, route: str, **params: Any) -> Any:
        """GET ``route`` with query ``params``; return the decoded JSON body."""
        return json.loads(self.get_bytes(route, **params))

    def post_json(self, route: str, body: dict[str, Any]) -> Any:
        """POST ``body`` as JSON to ``route``; return the decoded JSON body."""
        request = urllib.request.Request(
            f"{self.base_url}{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return json.loads(self._open(request))

    def _open(self, request: urllib.request.Request) -> bytes:
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise RuntimeError(f"{request.get_method()} {request.full_url} -> HTTP {error.code}: {detail}") from error

    # ---- runs and tags ------------------------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Names of the runs (log sub-directories relative to ``--logdir``), e.g. ``["tiny/version_0"]``."""
        return self.get_json("/data/runs")

    def tags(self, plugin: str) -> dict[str, set[str]]:
        """``{run: {tag, ...}}`` of a plugin: ``"scalars"``, ``"images"``, ``"text"``, ``"histograms"`` ...

        Text tags are the ones written to the event file: PyTorch's ``add_text(tag, ...)`` stores
        ``f"{tag}/text_summary"``.
        """
        return {run: set(tags) for run, tags in self.get_json(f"/data/plugin/{plugin}/tags").items()}

    # ---- data ---------------------------------------------------------------------------------------------------
    def scalars(self, run: str, tag: str) -> list[ScalarPoint]:
        """The scalar series ``tag`` of ``run``, in step order."""
        rows = self.get_json("/data/plugin/scalars/scalars", run=run, tag=tag)
        return [ScalarPoint(wall_time=w, step=s, value=v) for w, s, v in rows]

    def images(self, run: str, tag: str, sample: int = 0) -> list[dict[str, Any]]:
        """Metadata of the images of ``tag`` (``wall_time``, ``step``, ``query`` for :meth:`image_bytes`)."""
        return self.get_json("/data/plugin/images/images", run=run, tag=tag, sample=sample)

    def image_bytes(self, run: str, tag: str, index: int = -1) -> bytes:
        """The encoded image (PNG for figures) of ``tag`` at position ``index`` of its series (last by default)."""
        query = self.images(run, tag)[index]["query"]
        return self.get_bytes(f"/data/plugin/images/individualImage?{query}")

    def text(self, run: str, tag: str) -> list[TextEntry]:
        """The text summaries of ``tag`` (full tag, e.g. ``"compress/pruning/summary/text_summary"``)."""
        rows = self.get_json("/data/plugin/text/text", run=run, tag=tag)
        return [TextEntry(wall_time=r["wall_time"], step=r["step"], html=r["text"]) for r in rows]

    def custom_scalars_layout(self) -> dict[str, dict[str, list[str]]]:
        """The Custom Scalars layout as ``{category title: {chart title: [tag regex, ...]}}`` (empty if none)."""
        layout = self.get_json("/data/plugin/custom_scalars/layout")
        result: dict[str, dict[str, list[str]]] = {}
        for category in layout.get("category", []):
            charts = result.setdefault(category["title"], {})
            for chart in category.get("chart", []):
                lines = chart.get("multiline") or chart.get("marginCustom") or {}
                charts[chart["title"]] = list(lines.get("tag", [])) or [
                    s["value"] for s in lines.get("series", []) if "value" in s
                ]
        return result

    def hparams_experiment(self) -> dict[str, Any]:
        """The HParams experiment: ``hparamInfos`` (the columns) and ``metricInfos`` (the metric columns)."""
        return self.post_json("/data/plugin/hparams/experiment", {"experimentName": "", "includeMetrics": True})

    def hparams_session_groups(self) -> list[dict[str, Any]]:
        """The HParams table rows: one group per run, with ``hparams`` values and ``metricValues``."""
        body = {
            "experimentName": "",
            "allowedStatuses": _ALL_STATUSES,
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100_000,
            "includeMetrics": True,
        }
        return self.post_json("/data/plugin/hparams/session_groups", body).get("sessionGroups", [])
