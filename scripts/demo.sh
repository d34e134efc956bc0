#!/usr/bin/env bash
# The README's demo command. Sets up .venv (idempotent, see bootstrap.sh), builds the embedded tiny Llama and its
# instruction data (skipped when up to date), fine-tunes the model with BlockLLM through the unmodified
# `llamafactory-cli train recipes/demo/tiny_llama_blockllm_sft.yaml` on CPU, and ends by printing where the model,
# the loss plot and the selection log are. Extra arguments go to llamafactory-cli as overrides, e.g.
# `bash scripts/demo.sh max_steps=50` (the results stay in runs/demo/output).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
"$BIN/python" -m blockllm_factory.demo build runs/demo/assets
"$BIN/llamafactory-cli" train recipes/demo/tiny_llama_blockllm_sft.yaml "$@"
exec "$BIN/python" -m blockllm_factory.demo summary runs/demo/output
