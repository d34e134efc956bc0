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
# One thread unless told otherwise: on these tiny shapes a second thread gains nothing, and on a busy 2-core machine
# torch's spinning threads made the 300 steps take 314 s instead of 67 s (measured side by side, same losses).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
BIN="$ROOT/.venv/bin"
"$BIN/blockllm-factory" demo build runs/demo/assets
"$BIN/llamafactory-cli" train recipes/demo/tiny_llama_blockllm_sft.yaml "$@"
exec "$BIN/blockllm-factory" demo summary runs/demo/output
