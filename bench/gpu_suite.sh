#!/usr/bin/env bash
# GPU benchmark suite: the precompute ratio, the train-step ratios and peak memory at real sizes
# (SAM-H teacher, MobileSAM vit_t student, image_size 1024, random weights), in about 5 minutes
# on one H100 (QUICK=1: about 4), with no internet.
#
# Usage (from anywhere):   bash bench/gpu_suite.sh [WHEEL_DIR]
#
# Needs python3 with a CUDA build of PyTorch + torchvision. The project runs from this source
# tree (PYTHONPATH); packages the machine lacks (segment-anything, zarr 3 + numcodecs +
# google-crc32c + donfig, pycocotools) are installed from WHEEL_DIR (default: .whl/ in the repo)
# into a private folder, without touching the machine's site-packages. Make the wheels on a
# machine with internet, for the GPU machine's Python (e.g. 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       segment-anything==1.0 zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 \
#       donfig==0.8.1.post1 pycocotools==2.0.11
# Logs go to $OUT when it is set (the lent-machine tool collects that folder), else a temp dir.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
logs="${OUT:-$(mktemp -d)}"
mkdir -p "$logs"

need='import segment_anything, zarr, numcodecs, google_crc32c, pycocotools'
if ! python3 -c "$need" 2>/dev/null; then
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "gpu_suite: missing Python packages and no wheels in $wheels (see the header of this script)" >&2
        exit 2
    fi
    site=/tmp/maskteacher-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c "$need; import maskteacher, torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('gpu_suite:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1

# QUICK=1 halves the work (2 images, 4 steps) for a lease with little time left.
images=4; steps=6; lim_pre=150; lim_train=300
if [ "${QUICK:-0}" = 1 ]; then images=2; steps=4; lim_pre=120; lim_train=260; fi

status=0
run() {  # run NAME SECONDS COMMAND...: one benchmark with a time limit, its output kept in $logs
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
}

# 1. precompute: our generator vs SamAutomaticMaskGenerator, SAM-H, 32x32 grid, ~100 masks/image
run precompute "$lim_pre" python3 bench/precompute.py --device cuda --model vit_h --image-size 1024 \
    --images "$images" --batch "$images" --points-per-batch 256
# 2. train step: naive loop vs our batched bf16 step (vit_t, 1024, batch 8, 64 prompts), with
#    decoder checkpointing, compiled, compiled + checkpointing; dual_supervision from the cache vs
#    GT only; online SAM-H teacher (16x16 grid) vs the cache
run train_step "$lim_train" python3 bench/train_step.py --device cuda --model vit_t --image-size 1024 \
    --batch 8 --prompts 64 --teacher-model vit_h --teacher-grid 16 --steps "$steps" \
    --variants naive batched_bf16 dual_cache_bf16 dual_online_bf16 bf16_ckpt compiled compiled_ckpt
echo "gpu_suite: logs in $logs"
exit $status
