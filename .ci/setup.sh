#!/usr/bin/env bash
# Sets up everything the demo and the tests need, on a fresh machine, idempotently:
#   a virtual environment in .venv, torch==2.13.0 (CPU) installed first, this package with its dev, demo and docs
#   extras, and the Fashion-MNIST Debian package (real offline data).
# Sourced by examples/demo.sh, tests/run.sh and .ci/run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.lightning_compress_setup"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# Re-install when pyproject.toml changed since the last setup.
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing torch==2.13.0 (CPU) first, then lightning_compress[dev,demo,docs]"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev,demo,docs]"
  touch "$STAMP"
fi

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing the Debian package dataset-fashion-mnist (31 MB, real Fashion-MNIST)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "[setup] could not install dataset-fashion-mnist; the demo will say how to get it"
  else
    echo "[setup] Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"
  fi
fi
export PATH="$VENV/bin:$PATH"
