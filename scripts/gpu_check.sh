#!/usr/bin/env bash
# The GPU check of fedhet (about 8 minutes on one GPU): the CUDA-relevant tests on CUDA,
# local-training throughput on CUDA, lockstep vs one-by-one training on CUDA, and two
# rounds of a gpu config. Results go to $OUT (default /tmp/fedhet-gpu): RESULTS.md
# sections to copy into benchmarks/RESULTS.md, and the run's folder.
#
# Run it from the repository root on a machine with a CUDA build of torch:
#     bash scripts/gpu_check.sh
# On a lent device machine (the device tool's `run`), the image's python3 holds
# torch; what it lacks travels with the working tree (`carry`):
#   .whl/            wheels of fedhet's other dependencies missing there (installed into
#                    /tmp/site when present; transformers>=5.24 among them)
#   .fedhet-cache/   a copy of ~/.cache/fedhet: at least gguf/*/tokenizer (the SmolLM2
#                    tokenizer of the tiny test model); SmolLM2-135M's converted weights
#                    too where the size limit allows (else only the tiny model runs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fedhet-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ -d .fedhet-cache ]; then export FEDHET_CACHE="$PWD/.fedhet-cache"; fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

echo "== 1. CUDA-relevant tests (lockstep on CUDA, training and LoRA on the CPU model)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_lockstep.py tests/test_train.py \
    tests/test_lora.py 2>&1 | tee "$OUT/tests.log"

MODEL=tiny
if python3 -c "from fedhet.model import load_base_model; load_base_model('smollm2-135m')" \
    >/dev/null 2>&1; then MODEL=smollm2-135m; fi
echo "== 2. local-training throughput on CUDA ($MODEL available)"
timeout 120 python3 benchmarks/bench_local_training.py --steps 4 --out "$OUT/RESULTS.md"

echo "== 3. lockstep vs one by one on CUDA"
timeout 180 python3 benchmarks/bench_lockstep.py --model "$MODEL" --device cuda --steps 2 \
    --out "$OUT/RESULTS.md"

echo "== 4. two rounds of configs/s-cls-gpu.yaml (lockstep: auto, on CUDA)"
timeout 120 python3 -m fedhet.cli run configs/s-cls-gpu.yaml --overwrite \
    --set model.name="$MODEL" --set federation.rounds=2 --set eval.global_size=64 \
    --set eval.local_clients=2 --set output_dir="$OUT/runs" 2>&1 | tee "$OUT/run.log"
echo "done: $OUT"
