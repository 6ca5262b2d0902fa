#!/usr/bin/env bash
# Every check that needs the GPU machine, in one call (its idle machine is gone after 30 s):
#   1. the tests marked gpu (DALI's mixed decoder, bf16 paths);
#   2. data-only throughput: dali-mixed with an hw_decoder_load sweep, dali-cpu and torchvision;
#   3. the kernel benchmark (fused loss against eager and torch.compile).
# (Compute-only and end-to-end runs join here with their issue.)
#
# On the device, after ../shared/tools/device-wheels.sh's calls have installed DALI and hydra:
#   bash benchmarks/gpu_check.sh          # results under $OUT (the device tool brings them back)
# Then commit them under benchmarks/results/ (the names carry the GPU, the date and the commit).
set -uo pipefail
out=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
stamp="${gpu}_$(date +%F)_$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
status=0

nvidia-smi > "$out/nvidia-smi_$stamp.txt"
python3 -c "import torch, nvidia.dali, hydra; print('torch', torch.__version__, 'dali', nvidia.dali.__version__)" \
  | tee "$out/versions_$stamp.txt" || { echo "DALI or hydra missing: run device-wheels.sh's calls first"; exit 2; }

echo "== 1. tests marked gpu"
python3 -m pytest -m gpu -q -rs tests 2>&1 | tee "$out/gpu_tests_$stamp.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. data-only throughput (ImageNet-like JPEGs from real photos)"
data=/tmp/fastreg_jpegs
python3 benchmarks/make_jpegs.py "$data" --images 4000 --classes 10 > /dev/null || status=1
json="$out/data_$stamp.jsonl"
bench() { python3 benchmarks/data_throughput.py --root "$data" --batch-size 256 --batches 40 --json "$json" "$@" \
            || status=1; }
bench --loader dali --device cuda --workers 4 8 --hw-decoder-load 0 0.25 0.5 0.65 0.75 0.9 1.0
bench --loader dali --device cpu --workers 8 16
bench --loader torchvision --device cuda --workers 8 16

echo "== 3. kernels"
python3 benchmarks/kernels.py --out "$out" || status=1

exit $status
