#!/usr/bin/env bash
# The GPU benchmark, prepared for one NVIDIA H200 (under 8 minutes; the device machine has no network):
#   1. the paper's 100-sample benchmark (Table 9: 100 samples, 6 levels x 15 Langevin steps, 32x32, the paper's EBM
#      and initializer, random weights) in fp32 and bf16, with and without CUDA graphs, unguided and guided, against
#      the naive Algorithm 2 of benchmarks/naive.py, with the fp32 samples checked against it;
#   2. training-step throughput (batch 128, K = 15) against the naive Algorithm 1;
#   3. the opt-in torch.compile path, last, in its own time limit.
# JSON results go to $OUT (the device tool's output folder) or benchmarks/results/.
#
# The GPU image has PyTorch but not diffusers: carry its wheels. Once, here: `bash benchmarks/gpu.sh --fetch-wheels`
# (writes .whl/, ignored by git), then run on the device machine with carry [".whl"]:
#   bash benchmarks/gpu.sh
# Dry run of the same commands on a CPU with a tiny configuration (no CUDA-graph modes):
#   bash benchmarks/gpu.sh --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    exec python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
fi

OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import diffusers" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "diffusers is missing and no wheels were carried: run 'bash benchmarks/gpu.sh --fetch-wheels' here first"
        exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [[ "${1:-}" == "--dry-run" ]]; then
    DEVICE=cpu ARCH=tiny BATCH=4 LEVELS=2 STEPS=2 TRAIN_BATCH=4 TRAIN_STEPS=2 REPEATS=1 BUDGET=60 COMPILE_LIMIT=600
    SAMPLING_MODES="naive fp32 bf16 bf16_cl"
    COMPILE_MODES="fp32_compile"
else
    DEVICE=cuda ARCH=paper BATCH=100 LEVELS=6 STEPS=15 TRAIN_BATCH=128 TRAIN_STEPS=15 REPEATS=5 BUDGET=120 COMPILE_LIMIT=150
    SAMPLING_MODES="naive fp32 fp32_graph bf16 bf16_cl bf16_graph bf16_cl_graph fp16_cl_graph"
    COMPILE_MODES="bf16_cl_compile"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cuda', torch.cuda.is_available())"

status=0
# shellcheck disable=SC2086
timeout 330 python3 benchmarks/bench_sampling.py --device "$DEVICE" --arch "$ARCH" --batch-size "$BATCH" \
    --levels "$LEVELS" --steps "$STEPS" --modes $SAMPLING_MODES --repeats "$REPEATS" --time-budget "$BUDGET" \
    --json "$OUT_DIR/gpu_sampling.json" || status=1
timeout 90 python3 benchmarks/bench_training.py --device "$DEVICE" --arch "$ARCH" --batch-size "$TRAIN_BATCH" \
    --steps "$TRAIN_STEPS" --modes naive fp32 bf16 bf16_cl bf16_ckpt --repeats "$REPEATS" --time-budget 40 \
    --json "$OUT_DIR/gpu_training.json" || status=1
# shellcheck disable=SC2086
timeout "$COMPILE_LIMIT" python3 benchmarks/bench_sampling.py --device "$DEVICE" --arch "$ARCH" \
    --batch-size "$BATCH" --levels "$LEVELS" --steps "$STEPS" --cases unguided --modes fp32 $COMPILE_MODES \
    --repeats "$REPEATS" --no-peak --json "$OUT_DIR/gpu_compile.json" || status=1
# 4. FID of the authors' released checkpoints, converted (docs/checkpoints.md): convert, sample 50k images, evaluate.
#    Only on a GPU with the files present (not part of the timed benchmark): INCEPTION_WEIGHTS (torch-fidelity's
#    Inception file), CIFAR10_CHECKPOINT and CIFAR10_REFERENCE (.npz of the uint8 training images), and/or
#    IMAGENET32_CHECKPOINT and IMAGENET32_REFERENCE (sampled with guidance w = 0.7, the paper's best FID).
paper_fid() {  # name, guidance scale
    local checkpoint_var="${1^^}_CHECKPOINT" reference_var="${1^^}_REFERENCE"
    local checkpoint="${!checkpoint_var:-}" reference="${!reference_var:-}"
    if [[ "$DEVICE" == cuda && -f "$checkpoint" && -f "$reference" && -f "${INCEPTION_WEIGHTS:-}" ]]; then
        python3 benchmarks/paper_fid.py --checkpoint "$checkpoint" --pipeline "$OUT_DIR/converted-$1" \
            --reference "$reference" --inception-weights "$INCEPTION_WEIGHTS" --guidance-scale "$2" \
            --json "$OUT_DIR/paper_fid_$1.json" || status=1
    fi
}
paper_fid cifar10 0.0
paper_fid imagenet32 0.7
ls -l "$OUT_DIR"
exit $status
