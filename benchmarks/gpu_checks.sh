#!/usr/bin/env bash
# Issue 6's checks on a lent GPU machine, in one call: the CUDA tests, then the GPU table of
# benchmarks/bench_generation.py, the VQ-GAN encoder on the GPU (#29) and training (#28).
# Logs and JSON go to $OUT (the device tool's folder) or ./gpu-out. Nothing here runs in CI
# (no GPU there).
#
# Optional carried input (ignored by git, named in the device call's `carry`): .whl/*.whl,
# Python packages put first on the path (the transformers version this project is tested
# with; the machine's image has its own). The tokenizer is the GPT-NeoX-20B copy in models/.
# Knobs: GPU_TESTS_S, GPU_BENCH_S (timeouts), GPU_DEADLINE_S (start no row after),
# GPU_ROWS (bench_generation --gpu-rows), GPU_BATCHES (--gpu-batches).
# Inductor's max-autotune on the node's own loop, not yet measured, within one lease:
#   GPU_ROWS=bf16,bf16:autotune GPU_BATCHES=1 GPU_BENCH_S=480 bash benchmarks/gpu_checks.sh
# (autotuning compiles for minutes; batch 1 alone is what the target is about).
set -u
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
t0=$(date +%s)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c 'import sys, torch, transformers, onnxruntime as o
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "onnxruntime", o.__version__,
      o.get_available_providers())'
    echo "cpus $(nproc)"
} 2>&1 | tee "$out/env.txt"

timeout "${GPU_TESTS_S:-200}" python3 -m pytest -m gpu tests/engine/test_transformers_paths.py \
    tests/models/test_torch_tokenizer.py \
    -p no:cacheprovider -q -rA --timeout "${GPU_TESTS_S:-200}" >"$out/pytest.log" 2>&1
echo "pytest rc=$? after $(($(date +%s) - t0)) s"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$out/pytest.log" | tail -12

timeout "${GPU_BENCH_S:-330}" python3 benchmarks/bench_generation.py --gpu-only \
    --gpu-rows "${GPU_ROWS:-bf16:eager,bf16,bf16:generate,fp32:eager}" \
    --gpu-batches "${GPU_BATCHES:-1,8,32}" --deadline-s "${GPU_DEADLINE_S:-240}" \
    --out-dir /tmp/bench-gpu --json-out "$out/gpu.json" >"$out/bench.log" 2>&1
echo "bench rc=$? after $(($(date +%s) - t0)) s"
# the table (the JSON that follows it is in gpu.json); the log's tail when there is no table
if grep -q "^GPU:" "$out/bench.log"; then
    sed -n '/^GPU:/,/^{/p' "$out/bench.log" | sed '$d'
else
    tail -40 "$out/bench.log"
fi

# #29 part 4: the VQ-GAN encoder on the GPU (PyTorch) against ONNX on the host CPU, and the
# agreement of their codes, at the published size
timeout "${GPU_VQ_S:-120}" python3 benchmarks/bench_image_tokenizer.py --device cuda \
    --threads "$(nproc)" >"$out/vqgan.log" 2>&1
echo "vqgan bench rc=$? after $(($(date +%s) - t0)) s"
grep -E "^ +[0-9]|agreement|batch" "$out/vqgan.log" || tail -20 "$out/vqgan.log"

# #28: training tokens/s and MFU at the dolly-v2-3b shape (random weights), one GPU
timeout "${GPU_TRAIN_S:-300}" python3 benchmarks/bench_training.py --dolly --steps 20 \
    --batch 2 >"$out/train.log" 2>&1
echo "train bench rc=$? after $(($(date +%s) - t0)) s"
grep -E "^(shape|\||MFU)" "$out/train.log" || tail -20 "$out/train.log"
