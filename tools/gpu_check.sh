#!/usr/bin/env bash
# GPU check of onnx-tucker: environment, CUDA-marked tests, and `bench` of the committed CIFAR-10 CNN
# against its ratio-0.5 compression at batch 1 and 64 on the CUDA and CPU execution providers.
# Everything goes into one text file plus one JSON (both named below); runs to the end on a CPU-only
# machine too, where it records why CUDA is absent. Meant to finish in well under 4 minutes.
#
#   tools/gpu_check.sh [OUT.txt]           OUT (env or argument), default docs/gpu_check.txt;
#                                          the JSON goes next to it (docs/gpu_check.json)
#   WHEELS=.whl tools/gpu_check.sh         first install the wheels in .whl (offline) into /tmp/site,
#                                          e.g. onnxruntime_gpu, onnx_graphsurgeon, tensorly, tqdm
#   PYTHON=python3.12 RUNS=200 CPU_RUNS=30 CPU_THREADS=2   other knobs
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-${OUT:-docs/gpu_check.txt}}
JSON=${OUT%.txt}.json
PY=${PYTHON:-python3}
RUNS=${RUNS:-200}
CPU_RUNS=${CPU_RUNS:-30}
CPU_THREADS=${CPU_THREADS:-2}
TMP=$(mktemp -d /tmp/onnx-tucker-gpu-check.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
START=$(date +%s)

say() { echo "$*" | tee -a "$OUT"; }
section() { say ""; say "== $* (t=$(( $(date +%s) - START ))s)"; }
# run a command, its output into the report, its exit code noted; never stops the script
step() { "$@" 2>&1 | tee -a "$OUT"; local rc=${PIPESTATUS[0]}; say "-> exit $rc"; return 0; }

if [ -n "${WHEELS:-}" ]; then
    section "install wheels from $WHEELS into $TMP/site (offline, no dependencies)"
    step "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$TMP/site" "$WHEELS"/*.whl
    export PYTHONPATH="$TMP/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

section "environment"
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
else
    say "nvidia-smi: not found"
fi
step "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os, platform
print("python", platform.python_version(), "| cpus", os.cpu_count())
for dist in ("onnxruntime", "onnxruntime-gpu", "onnx", "onnx-graphsurgeon", "tensorly", "numpy", "tqdm", "pytest", "torch"):
    try:
        print(f"  {dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist}: not installed")
try:
    import torch
    print("torch CUDA", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
except Exception as exc:
    print("torch:", type(exc).__name__)
import onnxruntime as ort
print("onnxruntime", ort.__version__, "from", os.path.dirname(ort.__file__))
print("available providers:", ort.get_available_providers())
from onnx_tucker.runtime import available_providers, provider_unavailable_reason
for p in ("cuda", "tensorrt"):
    print(f"{p}: {'available' if p in available_providers() else 'NOT available: ' + provider_unavailable_reason(p)}")
EOF

section "CUDA-marked tests"
if "$PY" -c "import pytest" 2>/dev/null; then
    step "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_bench.py tests/test_runtime.py
else
    say "pytest not installed: CUDA-marked tests not run"
fi

section "compress models/cifar10_cnn.onnx at ratio 0.5"
step "$PY" -m onnx_tucker models/cifar10_cnn.onnx "$TMP/r05.onnx" --ratio 0.5 --no-check -q
if [ ! -f "$TMP/r05.onnx" ]; then
    say "compression failed: benchmarking the original model alone"
    MODELS=(models/cifar10_cnn.onnx)
else
    MODELS=(models/cifar10_cnn.onnx "$TMP/r05.onnx")
fi

section "bench on CUDA: batch 1 and 64, $RUNS runs, cudnn_conv_algo_search EXHAUSTIVE, top-1 on the 500-image sample"
step "$PY" -m onnx_tucker bench "${MODELS[@]}" --providers cuda --batch ${CUDA_BATCHES:-1,64,256} --runs "$RUNS" --warmup 20 \
    --cudnn-algo EXHAUSTIVE --data models/cifar10_test_sample.npz --json "$TMP/cuda.json" --no-progress

if "$PY" -c "from onnx_tucker.runtime import available_providers as a; raise SystemExit('tensorrt' not in a())" 2>/dev/null; then
    section "bench on TensorRT (bonus): batch 1 and 64"
    step "$PY" -m onnx_tucker bench "${MODELS[@]}" --providers tensorrt --batch 1,64 --runs 100 --warmup 20 \
        --json "$TMP/tensorrt.json" --no-progress
fi

section "bench on CPU: batch 1 and 64, $CPU_THREADS threads, $CPU_RUNS runs, per-layer profile"
step "$PY" -m onnx_tucker bench "${MODELS[@]}" --providers cpu --batch 1,64 --threads "$CPU_THREADS" \
    --runs "$CPU_RUNS" --warmup 3 --per-layer --data models/cifar10_test_sample.npz --json "$TMP/cpu.json" --no-progress

section "merge JSON into $JSON"
"$PY" - "$TMP" "$JSON" <<'EOF' 2>&1 | tee -a "$OUT"
import json, pathlib, sys
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
out.write_text(json.dumps({"schema": "onnx-tucker.gpu_check/1", "runs": runs}, indent=2))
print(f"wrote {out} with runs: {', '.join(runs) or 'none'}")
EOF
section "done in $(( $(date +%s) - START ))s; report: $OUT"
