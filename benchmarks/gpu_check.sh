#!/usr/bin/env bash
# Every check that needs the GPU machine. One device call runs at most 10 minutes, so the work is split
# into parts; give them as arguments, one call each, back to back (an idle machine is gone after 30 s):
#   tests       the tests marked gpu (DALI's mixed decoder, bf16 paths, the Triton kernels compiled)
#   data        data-only throughput: dali-mixed with an hw_decoder_load sweep, dali-cpu and torchvision
#   kernels     python -m benchmarks.kernels: the fused loss and head against eager and torch.compile, device
#               and host time (needs hydra, not DALI: it fits in device-wheels.sh's first call)
#   throughput  python -m benchmarks.throughput --ablate: R50 -> R18, 224 px, batch 256, bf16 (data, compute,
#               e2e and the ablation rows from the official-style baseline)
#   step        python -m benchmarks.throughput --modes compute --step-variants: the same configuration's step
#               eager, under each torch.compile mode and as a CUDA graph (picks trainer.compile_mode, cuda_graph)
#   profile     python -m benchmarks.profile: a chrome trace of a few e2e steps and the kernels by phase
#   modes       python -m benchmarks.throughput --modes e2e --distill-modes: the same configuration as configured,
#               with a cached teacher, weak/strong views, SEED and SEED + 6 small patches, e2e each
#   dino        python -m benchmarks.throughput --modes e2e --distill-modes --distill-rows 2: DINOv3 ViT-L/16 -> R50
#               (experiment=dinov3_vitl16_r50, random teacher weights), batch 256, bf16, e2e with the teacher online
#               and cached; the cache write's time (4000 images, start-up included) is recorded too
#   all         every part in order (more than one call's 10 minutes on an H100)
#
# BUDGET (seconds, default 540) bounds one invocation: every command runs under what is left of it, so the
# call returns with its files before the device tool's 600 s limit.
# On the device, after ../shared/tools/device-wheels.sh's calls have installed DALI and hydra:
#   FASTREG_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_check.sh tests data   # results under $OUT
# Then commit them under benchmarks/results/ (the names carry the GPU, the date and the commit).
set -uo pipefail
parts=("$@")
[ ${#parts[@]} -eq 0 ] && { echo "usage: $0 tests|data|kernels|throughput|step|profile|modes|dino|all ..."; exit 2; }
[ "${parts[0]}" = all ] && parts=(tests data kernels throughput step profile modes dino)
out=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$out"
# The device tool's copy of the tree has no .git: pass the commit in, FASTREG_COMMIT=$(git rev-parse HEAD)
export FASTREG_COMMIT=${FASTREG_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
[ -n "$FASTREG_COMMIT" ] || { echo "no git here: run as FASTREG_COMMIT=<git rev-parse HEAD> bash $0 ..."; exit 2; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
stamp="${gpu}_$(date +%F)_${FASTREG_COMMIT:0:12}"
status=0
# fastreg.kernels, .pipelines and .configs live in top-level folders that pyproject maps under fastreg., so
# the project must be installed (editable, no dependencies: the machine's image has them), not put on PYTHONPATH
python3 -c "import fastreg.kernels, fastreg.pipelines, fastreg.configs" 2>/dev/null \
  || python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "cannot install the project (pip install -e .)"; exit 2; }

nvidia-smi > "$out/nvidia-smi_$stamp.txt"
python3 -c "import torch, triton, hydra; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee "$out/versions_$stamp.txt" || { echo "hydra missing: run device-wheels.sh's first call first"; exit 2; }
# kernels and step need no DALI (they fit in device-wheels.sh's first call); every other part does
if [ -n "$(printf '%s\n' "${parts[@]}" | grep -vxE 'kernels|step')" ]; then
  python3 -c "import nvidia.dali; print('dali', nvidia.dali.__version__)" | tee -a "$out/versions_$stamp.txt" \
    || { echo "DALI missing: run device-wheels.sh's calls first"; exit 2; }
fi
data=/tmp/fastreg_jpegs  # ImageNet-like JPEGs cut from real photos (~500x375, q90)
jpegs() { [ -d "$data" ] || limited python3 -m benchmarks.make_jpegs "$data" --images 4000 --classes 10 > /dev/null; }
# R50 -> R18 at 224 px, batch 256, bf16: the reference configuration of the throughput targets (random teacher weights: the
# speed does not depend on them)
r50_r18=(experiment=simreg_r50_r18 teacher.checkpoint=random "data.root=$data" data.batch_size=256
         trainer.precision=bf16 data.workers=8)
# DINOv3 ViT-L/16 -> R50, the same batch, crop and precision (the teacher at its 224 px)
vitl16_r50=(experiment=dinov3_vitl16_r50 teacher.checkpoint=random "data.root=$data" data.batch_size=256
            trainer.precision=bf16 data.workers=8)

# Every part runs under a deadline, so that a device call returns (and $OUT comes back) before its 600 s limit:
# the parts' time in one call shares BUDGET seconds (default 540), each command getting what is left.
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
limited() {
  local left=$(( deadline - $(date +%s) ))
  [ "$left" -gt 10 ] || { echo "no time left for: $*"; return 124; }
  timeout --kill-after=10 "$left" "$@"
}

for part in "${parts[@]}"; do
  echo "== $part"
  case $part in
    tests)
      limited python3 -m pytest -m gpu -q -rs tests 2>&1 | tee "$out/gpu_tests_$stamp.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    data)
      jpegs || status=1
      json="$out/data_$stamp.jsonl"
      bench() { limited python3 -m benchmarks.data_throughput --root "$data" --batch-size 256 --batches 40 --json "$json" \
                  "$@" || status=1; }
      bench --loader dali --device cuda --workers 4 8 --hw-decoder-load 0 0.25 0.5 0.65 0.75 0.9 1.0
      bench --loader dali --device cpu --workers 8 16
      bench --loader torchvision --device cuda --workers 8 16 ;;
    kernels)
      limited python3 -m benchmarks.kernels --out "$out" || status=1 ;;
    throughput)
      jpegs || status=1
      limited python3 -m benchmarks.throughput --ablate --steps 50 --warmup 15 --out "$out" "${r50_r18[@]}" || status=1 ;;
    step)
      limited python3 -m benchmarks.throughput --modes compute --step-variants --steps 50 --warmup 15 --out "$out" \
        "${r50_r18[@]}" || status=1 ;;
    profile)
      jpegs || status=1
      limited python3 -m benchmarks.profile --out "$out" "${r50_r18[@]}" || status=1 ;;
    modes)
      jpegs || status=1
      limited python3 -m benchmarks.throughput --modes e2e --distill-modes --steps 30 --warmup 10 --out "$out" \
        "${r50_r18[@]}" || status=1 ;;
    dino)
      jpegs || status=1
      limited python3 -m benchmarks.throughput --modes e2e --distill-modes --distill-rows 2 --steps 30 --warmup 10 \
        --out "$out" "${vitl16_r50[@]}" || status=1 ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
