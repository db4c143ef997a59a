#!/usr/bin/env bash
# The test command of the README: sets everything up, then runs the fast suite (slow tests: add `-m slow`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
