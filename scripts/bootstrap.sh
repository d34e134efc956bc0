#!/usr/bin/env bash
# Creates or refreshes .venv/ in the checkout, idempotently: third-party packages are installed only when
# constraints.txt or the dependency list below changed, this project only when its own sources changed.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
# Everything the product and its tests need, resolved through constraints.txt (the pinned working set: torch 2.11.0
# with llamafactory 0.9.5; README.md, "Use it in your LLaMA-Factory environment"). torch/torchaudio/torchvision are
# pinned: a plain `pip install llamafactory` resolves a broken pair.
DEPS=(setuptools wheel torch torchaudio torchvision llamafactory trl badam galore-torch apollo-torch bitsandbytes
      deepspeed gguf matplotlib pytest pytest-xdist ruff playwright)

log() { printf '[bootstrap] %s\n' "$*" >&2; }
digest() { sha256sum | cut -c1-16; }

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi

deps_key="$( { cat "$ROOT/constraints.txt"; printf '%s\n' "${DEPS[@]}"; } | digest)"
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null)" != "$deps_key" ]; then
  log "installing pinned dependencies (first time: about 5 minutes, ~6 GB)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -c "$ROOT/constraints.txt" "${DEPS[@]}"
  echo "$deps_key" > "$VENV/.deps-stamp"
else
  log "dependencies up to date"
fi

# The project itself, as an editable install (setuptools' PEP 660 wheel, see build_hooks.py): every process imports
# blockllm_factory/ and patches/ from this checkout, so an edit is live without a reinstall, and the import hook file
# blockllm_factory.pth still lands at the top of site-packages, as with a user's `pip install .`. Re-installed only
# when a packaging file changed (a new package, an entry point, the hook line) or the checkout moved.
pkg_key="$( { echo "editable $ROOT"; cd "$ROOT" && cat setup.cfg pyproject.toml build_hooks.py blockllm_factory.pth; } \
  | digest)"
if [ "$(cat "$VENV/.pkg-stamp" 2>/dev/null)" != "$pkg_key" ]; then
  log "installing blockllm-factory from $ROOT (editable)"
  "$PY" -m pip install -q --no-deps --no-build-isolation --force-reinstall -e "$ROOT"
  rm -rf "$ROOT"/*.egg-info
  echo "$pkg_key" > "$VENV/.pkg-stamp"
else
  log "blockllm-factory up to date"
fi
