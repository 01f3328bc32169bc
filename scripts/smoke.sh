#!/usr/bin/env bash
# A short end-to-end run of the installed grpo-mlx on the embedded demo: train a few steps,
# generate, eval with adapters, fuse (and fuse --overwrite), eval the fused model.
# .ci/run runs it against the lowest mlx and mlx-lm that pyproject.toml accepts.
# Usage: scripts/smoke.sh [grpo-mlx executable]   (default: grpo-mlx on PATH)
set -euo pipefail
grpo="${1:-grpo-mlx}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$grpo" train --steps 3 --save-every 2 --output "$work/run"
test -s "$work/run/adapters.safetensors"
"$grpo" train --steps 4 --save-every 2 --output "$work/run" --resume
"$grpo" generate --adapter-path "$work/run" --prompt "What is 21 plus 21?" --max-tokens 8
"$grpo" eval --adapter-path "$work/run" --limit 8 --samples 2 --max-tokens 8 --output "$work/eval.json"
test -s "$work/eval.json"
"$grpo" fuse --adapter-path "$work/run" --output "$work/fused"
"$grpo" fuse --adapter-path "$work/run" --output "$work/fused" --overwrite
"$grpo" eval --model "$work/fused" --limit 8 --max-tokens 8 --output "$work/eval-fused.json"
# The fused model scores what base + adapters score.
python - "$work/eval.json" "$work/eval-fused.json" <<'PY'
import json, sys
adapted, fused = (json.load(open(p)) for p in sys.argv[1:])
assert adapted["accuracy"] == fused["accuracy"], (adapted["accuracy"], fused["accuracy"])
PY
echo "smoke: ok"
