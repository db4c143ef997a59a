#!/usr/bin/env bash
# The README's demo command: sets everything up (venv, torch 2.13.0 CPU, this package, Fashion-MNIST), then runs
# the compression study on real Fashion-MNIST and writes TensorBoard logs plus a report. Extra arguments go to the
# study (e.g. `--quick`, `--epochs 6`, `--studies dense prune`); `--help` lists them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/setup.sh"
cd "$ROOT"
exec python examples/study.py "$@"
