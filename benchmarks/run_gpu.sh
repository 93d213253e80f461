#!/usr/bin/env bash
# The GPU session's script: `bash benchmarks/run_gpu.sh a` (GPU tests + throughput) and
# `bash benchmarks/run_gpu.sh b` (memory and attention benchmarks). Writes under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
case "${1:-a}" in
a)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/memory tests/kvcache tests/models \
    tests/engine tests/attention/test_paged_backends.py 2>&1 | grep -v DEBUG | tail -25 > "$OUT/tests_core.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/attention --ignore=tests/attention/test_paged_backends.py \
    2>&1 | grep -v DEBUG | tail -40 > "$OUT/tests_attention.txt"
  tail -3 "$OUT/tests_core.txt" "$OUT/tests_attention.txt"
  timeout 220 python3 benchmarks/bench_throughput.py --out "$OUT/throughput" 2>&1 | tail -12
  ;;
b)
  timeout 115 python3 benchmarks/bench_throughput.py --systems vattention,paged --out "$OUT/throughput" 2>&1 | tail -5
  timeout 200 python3 benchmarks/bench_attention.py --budget-s 140 --out /tmp/attention > "$OUT/attention.log" 2>&1
  mkdir -p "$OUT/attention" && cp /tmp/attention/results.json /tmp/attention/results.md "$OUT/attention/"
  grep -E "copy|^decode llama-3-8b B=(1|64|256) |^prefill" "$OUT/attention.log" | cut -c1-200
  timeout 75 python3 benchmarks/bench_memory.py --steps 100 --out "$OUT/memory" 2>&1 | grep -E "step time|interference"
  ;;
esac
