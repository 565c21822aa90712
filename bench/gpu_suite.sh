#!/usr/bin/env bash
# GPU benchmark suite at real sizes (SAM-H teacher, MobileSAM vit_t student, image_size 1024,
# random weights), with no internet; every stage has a time limit and the limits add up to
# 290 s, so the suite ends within 5 minutes (QUICK=1: 235 s) whatever happens:
#   1. precompute: ours vs SamAutomaticMaskGenerator, + the generation speed options (sdpa,
#      bf16, compile), the SDPA encoder (time, max abs diff) and hierarchical vs
#      grid (decoder prompts, time, agreement)                           bench/precompute.py
#   2. train step, 64 prompts/image: full-map decoding vs point-sampled decoding (bf16, and
#      compiled point-sampled): ms/image and peak memory               bench/train_step.py
#   3. the same at 256 prompts/image (bf16, eager; batch 2: the same prompts per step)
#   4. AdamW: single-tensor vs foreach vs fused                         bench/optimizer.py
# DRY_RUN=1 prints the commands instead of running them; TINY=1 runs the same commands on the
# CPU with tiny models (a check of the script and its flags, not a measurement).
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
dev=cuda; teacher=vit_h; student=vit_t; size=1024; loss_points=4096; grid=32
if [ "${TINY:-0}" = 1 ]; then dev=cpu; teacher=vit_b_tiny; student=vit_t_tiny; size=128; loss_points=256; grid=8; fi
if [ "${DRY_RUN:-0}" != 1 ] && [ "$dev" = cuda ]; then
    python3 -c "$need; import maskteacher, torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('gpu_suite:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
fi

# QUICK=1: fewer images and steps, shorter limits, for a lease with little time left.
images=2; steps=4; lim_pre=120; lim_t64=100; lim_t256=50; lim_opt=20
if [ "${QUICK:-0}" = 1 ]; then images=1; steps=3; lim_pre=100; lim_t64=80; lim_t256=40; lim_opt=15; fi
if [ "${TINY:-0}" = 1 ]; then lim_pre=600; lim_t64=600; lim_t256=300; lim_opt=120; fi  # CPU compiles

status=0
run() {  # run NAME SECONDS COMMAND...: one benchmark with a time limit, its output kept in $logs
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit $limit s): $*"
    if [ "${DRY_RUN:-0}" = 1 ]; then return; fi
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
}

train=(python3 bench/train_step.py --device "$dev" --model "$student" --image-size "$size" --batch 8
       --loss-points "$loss_points" --steps "$steps" --warmup 1)
# 1. precompute: ours vs the reference, SAM-H, 32x32 grid, ~100 masks/image; then the speed
#    options, the SDPA encoder and hierarchical vs grid on the same teacher and images
run precompute "$lim_pre" python3 bench/precompute.py --device "$dev" --model "$teacher" \
    --image-size "$size" --points-per-side "$grid" --images "$images" --batch "$images" \
    --points-per-batch 256 --no-pipeline --extra options encoder strategies --compile
# 2. + 3. train step: full maps vs point-sampled decoding at 64 and 256 prompts per image
run train_64 "$lim_t64" "${train[@]}" --prompts 64 --variants batched_bf16 points_bf16 points_compiled
run train_256 "$lim_t256" "${train[@]}" --prompts 256 --batch 2 --variants batched_bf16 points_bf16
# 4. the optimizer step
run optimizer "$lim_opt" python3 bench/optimizer.py --device "$dev" --models "$student" "$teacher"
echo "gpu_suite: logs in $logs"
exit $status
