#!/usr/bin/env bash
# The GPU half of the compression work in one short call on a CUDA machine (~3-5 minutes):
#   1. the Triton kernels compile and agree with the torch reference on CUDA (pytest -m gpu);
#   2. benchmarks/kernels.py: bandwidth of each kernel as a fraction of a device-to-device copy
#      and the speed-up over the torch reference (CSV + PNG);
#   3. a CompressedDDP ("dgc") and a DiLoCo+int8 fit of the digits example on one GPU over NCCL
#      (one rank: a single-GPU machine cannot pair two NCCL ranks on the same device).
#
#   bash benchmarks/gpu_check.sh            # writes into $OUT, else benchmarks/results/gpu/
#
# It needs torch with CUDA, triton, lightning, pytest, hypothesis, scikit-learn and matplotlib
# (the device image has them); the package itself is used from the checkout (PYTHONPATH).
set -uo pipefail
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
py=${PYTHON:-python3}
status=0

{
  nvidia-smi -L
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt" || status=1

"$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tee "$out/pytest_gpu.txt" || status=1

"$py" -m benchmarks.kernels --out "$out" 2>&1 | tee "$out/kernels.txt" || status=1

for strategy in dgc lightning_fedopt.DiLoCoStrategy; do
  extra=()
  [ "$strategy" != dgc ] && extra=(--trainer.strategy.sync_every=16 --trainer.strategy.compressor=int8)
  "$py" examples/digits.py fit --trainer.accelerator=gpu --trainer.devices=1 --trainer.max_steps=200 \
    --trainer.enable_progress_bar=false --trainer.default_root_dir=/tmp/gpu_check \
    --trainer.strategy="$strategy" "${extra[@]}" 2>&1 | tail -20 | tee -a "$out/fit_nccl.txt" || status=1
done

echo "gpu_check: exit status $status (results in $out)"
exit $status
