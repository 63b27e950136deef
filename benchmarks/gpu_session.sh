#!/usr/bin/env bash
# One GPU session's checks, in one go (docs/benchmarks.md): the CUDA tests, then the
# engine step-time table (Qwen2.5-0.5B shapes, prompt 512, completion 512, G=8), each engine
# with train.async off and one_step (the overlapped pipeline vs sync, issue 16).
# Usage: OUT=results_dir bash benchmarks/gpu_session.sh   (grouprl importable, or run from
# the repository root: src/ is put on PYTHONPATH)
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider --tb=short 2>&1 | grep -v DEBUG > "$OUT/test_gpu_full.txt"; tail -40 "$OUT/test_gpu_full.txt" | tee "$OUT/test_gpu.txt"
timeout 360 python3 benchmarks/engine_step.py --size 0.5b --prompt-len 512 --completion-len 512 \
  --G 8 --prompts 8 --steps 3 --async off one_step --out "$OUT/engine_step.md" 2>&1 | grep -v "^\(INFO\|WARNING\)" > "$OUT/engine_step.log"; tail -40 "$OUT/engine_step.log"
