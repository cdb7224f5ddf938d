#!/usr/bin/env bash
# One batched session on a GPU machine (device time is scarce: build, test and
# benchmark in one go). Builds the extension against the jaxlib installed there,
# starts CUDA MPS (so the multi-process tests' kernels run side by side), runs the
# GPU tests and/or the benchmarks, and writes logs under $OUT (default gpu-logs/).
#
#   tools/gpu_session.sh tests            # GPU tests only
#   tools/gpu_session.sh tests bench      # and the default benchmarks
#   tools/gpu_session.sh forms            # dispatch tests under each HT dispatch form
#   tools/gpu_session.sh llprof           # low-latency kernel breakdown (profiler)
#   tools/gpu_session.sh internode        # NVSHMEM path: 2 processes on GPU 0 as 2 virtual nodes
#   tools/gpu_session.sh layer            # MoE layer benchmark (expert paths, exchange share)
# Benchmark JSON goes to $OUT/json, packed into $OUT/json.tgz at the end (few files come back).
#   PYTEST_K="low_latency and cuda" tools/gpu_session.sh tests
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import jax, jaxlib; print("jax", jax.__version__, jaxlib.__version__, jax.devices())'
# optional wheels carried in .whl/ (e.g. nvshmem4py-cu13: the NVSHMEM transport's tests)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c 'import jax_ep; print("backend:", jax_ep.default_backend())'
if nvidia-cuda-mps-control -d 2>/dev/null; then
  echo "CUDA MPS started"; trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
status=0
for stage in "$@"; do
  case "$stage" in
    smoke)
      timeout 240 python3 tools/smoke.py 2>&1 | tee "$OUT/smoke.log" ;;
    tests)
      JAX_EP_TEST_REPORT=$OUT/report.txt JAX_EP_TIMEOUT_S=${JAX_EP_TIMEOUT_S:-20} python3 -m pytest -v -rs ${PYTEST_ARGS:-} --timeout 90 --timeout-method=thread -k "${PYTEST_K:-cuda or kernel or share_one_gpu or command_buffer or nvshmem or internode or ordering}" tests \
        2>&1 | tee "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout" | tail -80
      status=$(( status | ${PIPESTATUS[0]} )) ;;
    forms)  # the dispatch tests with each HT dispatch form forced where it can run
      # (JAX_EP_HT_DISPATCH_FORM, csrc/high_throughput/dispatch_here.cu: identical results)
      for form in ${HT_FORMS:-bitmap here wave}; do
        echo "form $form:"
        JAX_EP_HT_DISPATCH_FORM=$form JAX_EP_TIMEOUT_S=${JAX_EP_TIMEOUT_S:-20} python3 -m pytest -q --timeout 90 \
          --timeout-method=thread -k "cuda" tests/test_dispatch_combine.py tests/test_vjp.py 2>&1 \
          | tee "$OUT/forms-$form.log" | grep -E "FAILED|ERROR|passed|failed|Timeout" | tail -20
        status=$(( status | ${PIPESTATUS[0]} ))
      done ;;
    bench)
      # sized to fit one device call (600 s) with the build; ht runs rewrite their JSON after
      # every case: a run cut by a timeout keeps what it measured
      B="python3 -m jax_ep.bench --calls 10 --repeats 10 --out $OUT/json"
      { timeout 200 $B --ranks 1 --sweep 1024,4096  # EP=1: vs local and ragged_all_to_all
        timeout 120 $B --loopback 2 --baselines all_to_all
        timeout 90 $B --mode low-latency --loopback 2 --tokens 128 --experts 288 --profile
        timeout 70 $B --mode low-latency --ranks 1 --tokens 1 --hidden 128 --experts 8 --topk 1 \
          --chain 32 --backends cuda --tag empty --profile
        python3 -m jax_ep.bench.report --dir $OUT/json --plot $OUT/plot.png  # needs matplotlib
      } 2>&1 | tee "$OUT/bench.log" | grep -v "^ *$" ;;
    llbench)  # the low-latency benchmarks of the bench stage alone
      B="python3 -m jax_ep.bench --calls 10 --repeats 10 --out $OUT/json --mode low-latency"
      { timeout 200 $B --loopback 2 --tokens 128 --experts 288 --profile
        timeout 150 $B --ranks 1 --tokens 1 --hidden 128 --experts 8 --topk 1 --chain 32 --backends cuda \
          --tag empty --profile
        # the same with the one-call ops as two launches: what the one-launch form gains
        timeout 100 $B --ranks 1 --tokens 1 --hidden 128 --experts 8 --topk 1 --chain 32 --backends cuda \
          --tag empty-two-launches --ll-launches two --graphs on --profile
      } 2>&1 | tee "$OUT/llbench.log" | grep -v "^ *$" ;;
    internode)  # one process per rank on one GPU (MPS): numbers show the path, not link speed
      B="python3 -m jax_ep.launch -n 2 --share-gpu --timeout 280 -m jax_ep.bench --transport nvshmem
         --node-size 1 --num-sms 8 --num-copy-sms 32 --calls 10 --repeats 10 --out $OUT/json
         --backends cuda --baselines none"
      { XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 300 $B --tokens 4096 --layouts ragged
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 300 $B --mode low-latency --graphs on --tokens 128 --experts 288
      } 2>&1 | tee "$OUT/internode.log" | grep -v "^ *$" ;;
    layer)  # one MoE layer at DeepSeek-V3 sizes, every expert path, vs the local MaxText-style path
      # (JSON rewritten after every token count: a run cut by the timeout keeps what it measured)
      # (256 experts forward+backward: 22.5 GB of weights and as much of gradients, twice in flight)
      # (300 s reached 256 experts x 4096 tokens on an H200; run it as a call of its own)
      { XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 520 python3 -m jax_ep.bench --mode layer \
          --out $OUT/json --compile-workers 8
      } 2>&1 | tee "$OUT/layer.log" | grep -v "^ *$" ;;
    llprof)  # where the low-latency time goes: kernel breakdown from the profiler
      B="python3 -m jax_ep.bench --mode low-latency --graphs on --profile --calls 10 --repeats 10 --out $OUT"
      { timeout 150 $B --ranks 1 --tokens 1 --hidden 128 --experts 8 --topk 1 --chain 32 \
          --backends cuda --tag profile-empty
        timeout 200 $B --loopback 2 --tokens 128 --experts 288 --backends cuda --baselines none \
          --tag profile-
      } 2>&1 | tee "$OUT/llprof.log" | grep -v "^ *$" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
if [ -d "$OUT/json" ]; then tar czf "$OUT/json.tgz" -C "$OUT" json && rm -rf "$OUT/json"; fi
exit $status
