#!/usr/bin/env bash
# Everything issue 5 needs from a GPU, run from the repository root on a machine with torch,
# transformers and peft (no install, no network). One device call runs at most 10 minutes, so
# the work comes in parts; name one or more (default: all, for a machine without that limit):
#
#   OUT=/some/folder bash bench/gpu_session.sh quick            # every part, shrunk: ~2 min
#   OUT=/some/folder bash bench/gpu_session.sh quick smollm2    # one part, shrunk
#   OUT=/some/folder bash bench/gpu_session.sh tests tinyllama  # then the real ones
#   OUT=/some/folder bash bench/gpu_session.sh smollm2 compiled
#
# tests:     the library's tests on CUDA (oracle equality in bf16/fp32/fp64, the host-sync check)
# tinyllama: bench/step_bench.py, ~1.1B LLaMA shape, allocations 8642 and 2468, two repeats
# smollm2:   the same on the SmolLM2-135M shape
# compiled:  torch.compile of MoLA and matched LoRA on the ~1.1B shape (whole model, as training does)
# compiled-layers: the same, 8642 only, with each decoder layer compiled on its own beside the whole
#            model (the choice mola.compile made on the CPU; not in the default list)
# checkpointing: the ~1.1B shape, 8642, with activation checkpointing (training's gradient_checkpointing),
#            MoLA against matched LoRA and LoRA r=8 (not in the default list)
#
# Each part has its own time limit and a failing part does not stop the next. Output: $OUT/
# bench.log, $OUT/cuda-tests.log and one JSON per benchmark (at most 6 files; the device tool
# returns 8). "quick" shrinks every benchmark to 4 layers and a few steps to check the plumbing.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
date=$(date -u +%Y-%m-%d)
gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name(0).lower().replace(" ", "-"))' 2>/dev/null || echo no-gpu)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests tinyllama smollm2 compiled)
shrink=()
if [ "${parts[0]}" = "quick" ]; then
    shrink=(--warmup 1 --steps 2 --rounds 1 --repeats 1 --layers 4)
    parts=("${parts[@]:1}")
    [ ${#parts[@]} -eq 0 ] && parts=(tests tinyllama smollm2 compiled)
fi

echo "== $gpu, $date, parts ${parts[*]}, torch $($PY -c 'import torch; print(torch.__version__)')" | tee -a "$OUT/bench.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/bench.log"

run_tests() {
    # tests/service needs the web stack, which the GPU image does not have: library tests only.
    timeout 420 $PY -m pytest -q -p no:cacheprovider tests/test_layer.py tests/test_model.py tests/test_logits.py tests/test_train.py \
        >"$OUT/cuda-tests.log" 2>&1
    echo "== tests: exit $? (the end of $OUT/cuda-tests.log:)" | tee -a "$OUT/bench.log"
    tail -n 3 "$OUT/cuda-tests.log" | tee -a "$OUT/bench.log"
}

bench() {  # name, limit in seconds, step_bench flags...
    local name=$1 limit=$2
    shift 2
    echo "== $name: step_bench.py $*" | tee -a "$OUT/bench.log"
    timeout "$limit" $PY bench/step_bench.py "$@" "${shrink[@]}" --output "$OUT/$gpu-$name-$date.json" 2>&1 | tee -a "$OUT/bench.log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
    # The tables for bench/README.md, as tests/test_step_bench.py expects them there.
    [ -f "$OUT/$gpu-$name-$date.json" ] && $PY bench/table.py "$OUT/$gpu-$name-$date.json" | tee -a "$OUT/bench.log"
}

for part in "${parts[@]}"; do
    case $part in
        tests) run_tests ;;
        tinyllama) bench tinyllama-1b 420 --preset tinyllama-1b --allocations 8642,2468 --repeats 2 ;;
        smollm2) bench smollm2-135m 300 --preset smollm2-135m --allocations 8642,2468 --repeats 2 ;;
        compiled) bench tinyllama-1b-compiled 420 --preset tinyllama-1b --allocations 8642,2468 --repeats 1 --variants mola,lora-matched --compile ;;
        compiled-layers) bench tinyllama-1b-compiled-scopes 540 --preset tinyllama-1b --allocations 8642 --repeats 1 --variants mola,lora-matched --compile --compile-scope model,layers ;;
        checkpointing) bench tinyllama-1b-checkpointing 420 --preset tinyllama-1b --allocations 8642 --repeats 2 --variants mola,lora-matched,lora-r8 --gradient-checkpointing ;;
        *) echo "unknown part $part: choose from quick tests tinyllama smollm2 compiled compiled-layers checkpointing" >&2; exit 2 ;;
    esac
done
