#!/usr/bin/env bash
# The GPU checklist in one call, for a lent CUDA machine whose python3 already has torch, triton,
# torchvision, numba and pytest (run from the repository root; no install, the package is read
# from src/): versions, the gpu tests, the CUDA benchmark against torchvision in float32,
# float16 and bfloat16, the launch-parameter sweep and a per-kernel profile of forward+backward.
# Logs and CSVs go to $OUT (else gpu_out/). On a fresh H200 (2026-11-30) the tests alone needed
# more than 200 s (about 4 per second on 8 workers: Triton compiles a variant per integer-argument
# pattern), the sweep 90 s and the benchmark about 150 s per dtype: about 11 minutes in all, more
# than one 10-minute device call. Each step's time limit is a variable, and 0 skips the step: run
# `T_BENCH=0 T_PROFILE=0` in one call and `T_TESTS=0 T_TUNE=0` in the next (the second then uses the
# shipped launch parameters).
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  python3 -c "import sys, torch, triton, torchvision, numba, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$out/env.txt"
if [ "${T_TESTS:-330}" -gt 0 ]; then
  echo "== pytest -m gpu"
  timeout "${T_TESTS:-330}" python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 --maxfail=20 tests \
    > "$out/pytest.log" 2>&1; echo "pytest rc $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest.log" | tail -n 25 | cut -c1-300
fi
if [ "${T_TUNE:-90}" -gt 0 ]; then  # T_TUNE=0 skips the sweep (the shipped constants are used)
  echo "== tune_cuda"
  timeout "${T_TUNE:-90}" python3 benchmarks/tune_cuda.py --dtypes "${TUNE_DTYPES:-float32}" --csv "$out/tune.csv" --best "$out/best.json" \
    > "$out/tune.log" 2>&1; echo "tune rc $?"
  grep -E "^best|torchvision|Error" "$out/tune.log" | cut -c1-160
fi
if [ "${T_BENCH:-450}" -gt 0 ]; then
  echo "== bench_cuda (with the swept best settings, when the sweep wrote them)"
  settings=()
  [ -s "$out/best.json" ] && settings=(--settings "$out/best.json")
  timeout "${T_BENCH:-450}" python3 benchmarks/bench_cuda.py --dtypes float32,float16,bfloat16 --rep "${REP:-50}" \
    --workloads "${WORKLOADS:-boxhead-P2,train-P3,mask-14,adaptive,train-batch}" --csv "$out/cuda.csv" "${settings[@]}" \
    ${BENCH_EXTRA:-} > "$out/bench.log" 2>&1; echo "bench rc $?"
  grep -v "^$" "$out/bench.log" | cut -c1-150
fi
if [ "${T_PROFILE:-60}" -gt 0 ]; then
  echo "== profile_cuda (float32, NCHW: device time per kernel)"
  timeout "${T_PROFILE:-60}" python3 benchmarks/profile_cuda.py --rows 6 > "$out/profile.log" 2>&1; echo "profile rc $?"
  grep -E "^==|ms  x" "$out/profile.log" | cut -c1-120
fi
