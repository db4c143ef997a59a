import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py
sys.path.insert(0, str(ROOT / "examples"))  # the study CLI (study.py) and tools/ (the TensorBoard client)
torch.set_num_threads(1)  # the CI machine has 2 cores; keep tests from oversubscribing them


def pytest_collection_modifyitems(config, items):
    """Multi-process tests (marker ``ddp``) get two reruns: a gloo worker process sometimes aborts while the
    interpreter exits ("terminate called without an active exception"), after the test's work is done. A real
    failure fails three times in a row."""
    import pytest

    for item in items:
        if item.get_closest_marker("ddp") is not None:
            item.add_marker(pytest.mark.flaky(reruns=2))
