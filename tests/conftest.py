import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py
sys.path.insert(0, str(ROOT / "examples"))  # the study CLI (study.py) and tools/ (the TensorBoard client)
torch.set_num_threads(1)  # the CI machine has 2 cores; keep tests from oversubscribing them
