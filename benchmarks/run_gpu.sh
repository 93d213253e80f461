#!/usr/bin/env bash
# The GPU session's script: `bash benchmarks/run_gpu.sh PART...` runs the named parts in order and
# writes logs and results under $OUT. Parts (each under 4 minutes on the H200):
#   tests       all `gpu`-marked tests (core, then attention)
#   prefill     bench_attention, prefill phases only (fresh prompts and chunks)
#   decode      bench_attention, decode phase only (plus the cross-layer layout section);
#               ATTN_ARGS / ATTN_TAG / ATTN_BUDGET / ATTN_TIMEOUT adjust prefill and decode
#   memory      bench_memory
#   throughput  bench_throughput: vattention, paged and HF generate_batch
#   ours        bench_throughput: vattention and paged only
#   profile     profile_engine (GPU time by kernel category over the throughput workload)
#   flexfail    tracebacks of the flex GPU tests (diagnostic)
#   memprofile  the start-up memory profile on llama-3-8b (both caches, 1K-7K-token prompts)
#   steptests   the `gpu` tests of the step path: prefill kernels, pa_triton, auto variants,
#               LLM.generate in every graph/mapping mode
#   online      bench_online against `vattention serve` (both caches); ONLINE_ARGS adjusts it;
#               needs fastapi/uvicorn/pydantic: carry them as wheels in .whl (see the device notes)
#   sanitize    compute-sanitizer memcheck over engine runs (tiny preset, bf16, CUDA graphs of
#               mixed steps, uneven prompts): auto, fa2_varlen and the paged cache; SAN_CONFIGS
#               (';'-separated option sets, later options win) and SAN_MODEL adjust it, e.g.
#               prefix segments: SAN_MODEL=tiny-wide SAN_CONFIGS="--trace shared-prefix
#               --prompt-len 512" (a 2 MiB page holds 64 of its tokens)
#   serving     bench_serving; SERVE_RUNS holds "model:trace[:extra args]" entries separated
#               by ';' (default: yi-6b:uneven), each written to $OUT/serving_<model>_<trace>
#   cascade     cascade decoding: the decode kernels' gpu tests, bench_cascade (one step over
#               both real caches), then the shared-prefix trace with it on (the default) and
#               off, both caches
#   pending     what the results index lists as not yet measured (2026-12-03): the cuDNN rule
#               A/B on long-context, shared-prefix in the other order with the step log,
#               cascade over page-by-page groups, test_llm_gpu.py (about 7 minutes)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
for part in "$@"; do
  echo "== $part ($(date +%T))"
  case "$part" in
  tests)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/memory tests/kvcache tests/models \
      tests/engine --ignore=tests/engine/test_memory_profile_gpu.py \
      tests/attention/test_paged_backends.py --tb=short -rf 2>&1 | grep -v DEBUG | tail -400 > "$OUT/tests_core.txt"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/attention --ignore=tests/attention/test_paged_backends.py \
      --tb=short -rf 2>&1 | grep -v DEBUG | tail -600 > "$OUT/tests_attention.txt"
    tail -n 3 "$OUT/tests_core.txt" "$OUT/tests_attention.txt"
    ;;
  prefill|decode)  # ATTN_ARGS: extra bench_attention options (e.g. --models yi-6b); ATTN_TAG: name
    tag=${ATTN_TAG:-$part}
    timeout ${ATTN_TIMEOUT:-230} python3 benchmarks/bench_attention.py --phases "$part" \
      --budget-s ${ATTN_BUDGET:-180} ${ATTN_ARGS:-} --out "/tmp/attention_$tag" > "$OUT/attention_$tag.log" 2>&1
    mkdir -p "$OUT/attention_$tag"
    cp /tmp/attention_$tag/results.json /tmp/attention_$tag/*.png "$OUT/attention_$tag/" 2>/dev/null
    grep -E "copy|^decode [a-z0-9-]+ B=(1|64|256) |prefill" "$OUT/attention_$tag.log" | cut -c1-200
    ;;
  memory)
    timeout ${MEM_TIMEOUT:-240} python3 benchmarks/bench_memory.py --steps 100 --out "$OUT/memory" 2>&1 | grep -E "step time|interference|same pages"
    ;;
  throughput)
    timeout 230 python3 benchmarks/bench_throughput.py --out "$OUT/throughput" 2>&1 | tail -12
    ;;
  ours)
    timeout 130 python3 benchmarks/bench_throughput.py --systems vattention,paged --out "$OUT/throughput" 2>&1 | tail -6
    ;;
  profile)
    timeout 150 python3 benchmarks/profile_engine.py --num-requests 256 --output-len 128 --out "$OUT/profile" 2>&1 | tail -40
    ;;
  flexfail)  # tracebacks of the flex tests that failed on the GPU
    for t in "tests/attention/test_paged_attention.py::test_paged_flex_gpu[case0-16]" \
             "tests/attention/test_contiguous_virtual.py::test_backends_read_only_backed_rows[per_layer-cuda]"; do
      timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short "$t" 2>&1 \
        | grep -v DEBUG | grep -v "^E  *$" | tail -300 >> "$OUT/flex_failures.txt"
    done
    grep -E "passed|failed" "$OUT/flex_failures.txt"
    ;;
  memprofile)
    timeout ${TEST_TIMEOUT:-230} python3 -m pytest -q -s -p no:cacheprovider -m gpu \
      tests/engine/test_memory_profile_gpu.py --tb=short -rf 2>&1 | grep -v DEBUG | tail -150 \
      > "$OUT/tests_memprofile.txt"
    grep -E "KV budget|grew|passed|failed" "$OUT/tests_memprofile.txt"
    ;;
  steptests)  # one process per file: a sticky CUDA error cannot fail the files after it
    : > "$OUT/tests_step.txt"
    files=(tests/engine/test_llm_gpu.py tests/attention/test_prefill_kernels.py
           tests/attention/test_paged_backends.py tests/engine/test_llama3_8b_gpu.py
           "tests/attention/test_contiguous_backends.py -k auto")
    [ -n "${STEP_TEST_FILES:-}" ] && IFS=';' read -ra files <<< "$STEP_TEST_FILES"
    for f in "${files[@]}"; do
      echo "### $f" >> "$OUT/tests_step.txt"
      timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -m gpu $f -x \
        --tb=short -rf 2>&1 | grep -v DEBUG | head -150 >> "$OUT/tests_step.txt"
      tail -n 1 "$OUT/tests_step.txt"
    done
    ;;
  serving)
    IFS=';' read -ra runs <<< "${SERVE_RUNS:-yi-6b:uneven}"
    for run in "${runs[@]}"; do
      IFS=':' read -r model trace extra <<< "$run"
      name="serving_${model}_${trace}"
      mkdir -p "$OUT/$name"  # results.json and run.log (which holds the table) come back
      timeout ${SERVE_TIMEOUT:-230} python3 benchmarks/bench_serving.py --model "$model" --trace "$trace" \
        ${extra:-} --out "/tmp/$name" > "$OUT/$name/run.log" 2>&1
      cp "/tmp/$name/results.json" "$OUT/$name/" 2>/dev/null
      grep -E "^\| (vattention|paged)|^vattention /" "$OUT/$name/run.log" || tail -n 5 "$OUT/$name/run.log"
    done
    ;;
  online)
    mkdir -p "$OUT/online"
    timeout ${ONLINE_TIMEOUT:-300} python3 benchmarks/bench_online.py --model ${ONLINE_MODEL:-llama-3-8b} \
      ${ONLINE_ARGS:---rates 4,16,64 --num-requests 100} --out /tmp/online \
      -- --load-format dummy --dtype bfloat16 > "$OUT/online/run.log" 2>&1
    cp /tmp/online/results.json "$OUT/online/" 2>/dev/null
    grep -E "^\| " "$OUT/online/run.log" || tail -n 20 "$OUT/online/run.log"
    ;;
  cascade)
    timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -m gpu \
      tests/attention/test_cascade_decode.py tests/attention/test_contiguous_triton.py \
      tests/attention/test_paged_kernels.py --tb=short -rf 2>&1 | grep -v DEBUG | tail -60 \
      > "$OUT/tests_cascade.txt"
    tail -n 1 "$OUT/tests_cascade.txt"
    timeout 150 python3 benchmarks/bench_cascade.py --model llama-3-8b --batches 64,256 \
      --prefix 4096 --out "$OUT/cascade" 2>&1 | grep -E "^\|" | tail -6
    name=serving_llama-3-8b_shared-prefix_cascade
    mkdir -p "$OUT/$name"
    timeout ${SERVE_TIMEOUT:-230} python3 benchmarks/bench_serving.py --model llama-3-8b \
      --trace shared-prefix --busy-fraction 0 --out "/tmp/$name" --systems \
      "vattention+prefix,paged+prefix,vattention+prefix%cascade_attention=false,paged+prefix%cascade_attention=false" \
      > "$OUT/$name/run.log" 2>&1
    cp "/tmp/$name/results.json" "$OUT/$name/" 2>/dev/null
    grep -E "^\| (vattention|paged)" "$OUT/$name/run.log" || tail -n 5 "$OUT/$name/run.log"
    ;;
  pending)
    STEP_TEST_FILES="tests/engine/test_llm_gpu.py" bash "$0" steptests
    SERVE_TIMEOUT=120 SERVE_RUNS='llama-3-8b:shared-prefix:--busy-fraction 0 --timeline 8 --systems vattention+prefix%cascade_attention=false,vattention+prefix' \
      bash "$0" serving
    mv "$OUT/serving_llama-3-8b_shared-prefix" "$OUT/serving_shared-prefix_order"
    SERVE_TIMEOUT=120 SERVE_RUNS='llama-3-8b:shared-prefix:--busy-fraction 0 --systems vattention+prefix@per_layer,vattention+prefix-noseg,vattention+prefix-noseg%cascade_attention=false' \
      bash "$0" serving
    SERVE_TIMEOUT=200 SERVE_RUNS='llama-3.1-8b:long-context:--max-model-len 70000 --max-num-seqs 64 --busy-fraction 0 --systems vattention,vattention%attention_options={"cudnn_min_work":268435456},paged' \
      bash "$0" serving
    ;;
  sanitize)
    : > "$OUT/sanitize.txt"
    configs=("--attention-backend auto" "--attention-backend fa2_varlen"
             "--attention-backend fa2_varlen --kv-layout per_layer" "--kv-cache paged")
    [ -n "${SAN_CONFIGS:-}" ] && IFS=';' read -ra configs <<< "$SAN_CONFIGS"
    # API errors are not reported: cuda-bindings' cuInit probes every driver entry point with
    # cuGetProcAddress, and the 34 this driver lacks each count as an error (all at cuInit,
    # before any kernel: benchmarks/results/serving/gpu_tests/sanitize_2026-12-02_api_errors.txt)
    for opts in "${configs[@]}"; do
      echo "### $opts" >> "$OUT/sanitize.txt"
      timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 7 \
        python3 -m vattention.cli bench ${SAN_MODEL:-tiny} --load-format dummy --dtype bfloat16 --trace uneven \
        --num-requests 24 --prompt-len 96 --output-len 24 --max-num-seqs 8 \
        --max-num-batched-tokens 256 --max-model-len 1024 --mixed-graph-tokens 256 $opts \
        >> "$OUT/sanitize.txt" 2>&1
      echo "exit $?" >> "$OUT/sanitize.txt"
      grep -E "ERROR SUMMARY|^exit|uneven trace" "$OUT/sanitize.txt" | tail -n 3
    done
    ;;
  *)
    echo "unknown part $part" >&2
    ;;
  esac
done
