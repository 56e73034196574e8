#!/usr/bin/env bash
# Sets up vljax with its test dependencies and runs the tests: the fast default set, then the
# `slow` set (real weights, end-to-end training, multi-process) as a separate step.
#   bash scripts/test.sh            # both steps
#   bash scripts/test.sh fast|slow  # one of them (after setup)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export PYTHONUNBUFFERED=1
which="${1:-all}"
if [[ "$which" == all || "$which" == fast ]]; then
  echo "[test] default (fast) tests"
  python3 -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=30 tests
fi
if [[ "$which" == all || "$which" == slow ]]; then
  echo "[test] slow tests"
  python3 -m pytest -q -m slow -n 2 --dist loadfile --durations=30 tests
fi
