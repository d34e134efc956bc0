#!/usr/bin/env bash
# The README's test command: sets up .venv (idempotent, see bootstrap.sh) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k optim`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
bash "$ROOT/scripts/ensure_browser.sh"  # Chromium for the web UI test (tests/test_webui.py)
cd "$ROOT"
# The checkout is installed editable (bootstrap.sh), so the tests run this tree's blockllm_factory/ and patches/ as
# every process started through the import hook does; no reinstall after an edit.
# Two pytest workers (pytest-xdist): most of the suite's time is llamafactory-cli runs, each one process on one thread
# (OMP_NUM_THREADS=1), so one worker leaves the second core of a 2-core CI machine idle. --dist loadfile keeps each test
# file on one worker, so a module's shared runs (module-scoped fixtures) are made once. BLOCKLLM_TEST_WORKERS=0 runs
# everything in this one process (e.g. to debug with -s or --pdb).
exec "$ROOT/.venv/bin/pytest" -q -rs -n "${BLOCKLLM_TEST_WORKERS:-2}" --dist loadfile "$ROOT/tests" "$@"  # -rs: skips
