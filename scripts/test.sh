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
exec "$ROOT/.venv/bin/pytest" -q -rs "$ROOT/tests" "$@"  # -rs: print why a test was skipped
