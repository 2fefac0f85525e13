#!/usr/bin/env bash
# GPU check of onnx-tucker: every GPU measurement of issue 13 in one call (device time is short).
#
#   1. environment and the CUDA-marked tests;
#   2. the committed CIFAR-10 CNN: ratio 0.5, and --latency-aware --provider cuda at batch 1 and 32,
#      benched on CUDA at batch 1 and 32: plain, --cuda-graph and --fp16 (TensorRT fp16 where it loads);
#   3. ResNet50 and VGG16 (224 px, random weights, tools/zoo_models.py, no torchvision needed):
#      --latency-aware --provider cuda at batch 1 and 32 (ResNet50 with its 1x1 convs as candidates),
#      VGG16 and ResNet50 under --target-latency at batch 32 (calibrated on seeded noise: latency only),
#      benched on CUDA at batch 1 and 32;
#   4. the CNN on the CPU EP with the per-layer profile;
#   5. (between 1 and 2, when torch sees a GPU) --distill --distill-device cuda on ResNet-20, timed.
# Each step has its own timeout and the optional ones are skipped past DEADLINE seconds, so the whole
# run stays inside its budget (6 minutes with the wheel install). Everything goes into one text report and
# one JSON next to it; on a machine without CUDA it runs to the end and records why.
#
#   tools/gpu_check.sh [OUT.txt]           default docs/gpu_check.txt (JSON: docs/gpu_check.json)
#   WHEELS=.whl tools/gpu_check.sh         first install the wheels in .whl (offline) into a temporary folder:
#                                          onnxruntime-gpu and the pure-Python packages missing there
#                                          (onnx-graphsurgeon, tensorly, tqdm, ...; /work/.library/device/README.md)
#   PYTHON=python3.12 RUNS=200 BIG_RUNS=50 DEADLINE=300 BIG=0   other knobs (BIG=0: skip ResNet50/VGG16)
#   PROVIDER=cpu RUNS=5 BIG=0 tools/gpu_check.sh /tmp/dry.txt    a dry run of every step on the CPU EP (no GPU needed)
#   SCALE=1 tools/gpu_check.sh             also issue 15's figure: ResNet50 --target-macs 0.5 --layers kxk,1x1 --calibrate DIR
#                                          (512 seeded noise PNGs), timed (at most SCALE_LIMIT=300 s more; off by default); it runs
#                                          right after the tests, so a short DEADLINE drops the optional benches, not it;
#                                          SCALE=only: environment, tests and that figure alone; SCALE_PROFILE=DIR: a second
#                                          run of it under cProfile (DIR/resnet50_t05.prof)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-${OUT:-docs/gpu_check.txt}}
JSON=${OUT%.txt}.json
PY=${PYTHON:-python3}
RUNS=${RUNS:-200}
BIG_RUNS=${BIG_RUNS:-50}
CPU_RUNS=${CPU_RUNS:-30}
CPU_THREADS=${CPU_THREADS:-2}
DEADLINE=${DEADLINE:-300}
PROVIDER=${PROVIDER:-cuda}  # what the "GPU" steps run on; cpu for a dry run
BIG=${BIG:-1}
SCALE=${SCALE:-0}
TMP=$(mktemp -d /tmp/onnx-tucker-gpu-check.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$(dirname "$OUT")" "$TMP/json"
: > "$OUT"
START=$(date +%s)

say() { echo "$*" | tee -a "$OUT"; }
elapsed() { echo $(( $(date +%s) - START )); }
section() { say ""; say "== $* (t=$(elapsed)s)"; }
# run a command with a timeout, its output into the report, its exit code noted; never stops the script
step() { local limit=$1; shift; timeout "$limit" "$@" 2>&1 | tee -a "$OUT"; local rc=${PIPESTATUS[0]}; say "-> exit $rc$([ "$rc" = 124 ] && echo " (timed out after ${limit}s)")"; return 0; }
in_time() { if [ "$(elapsed)" -ge "$DEADLINE" ]; then say "skipped: past DEADLINE=${DEADLINE}s"; return 1; fi; return 0; }

if [ -n "${WHEELS:-}" ]; then
    section "install wheels from $WHEELS into $TMP/site (offline, no dependencies)"
    step 120 "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$TMP/site" "$WHEELS"/*.whl
    export PYTHONPATH="$TMP/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export XDG_CACHE_HOME="$TMP/cache"  # a fresh per-layer latency table: every figure measured in this run

section "environment"
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)  commit: $(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
    step 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
else
    say "nvidia-smi: not found"
fi
step 60 "$PY" - <<'EOF'
import importlib.metadata as md, os, platform
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
from onnx_tucker.providers import available_providers, unavailable_reason
for p in ("cuda", "tensorrt"):
    print(f"{p}: {'available' if p in available_providers() else 'NOT available: ' + unavailable_reason(p)}")
EOF
HAVE_CUDA=0
"$PY" -c "from onnx_tucker.providers import available_providers as a; raise SystemExit('$PROVIDER' not in a())" 2>/dev/null && HAVE_CUDA=1
HAVE_TRT=0
"$PY" -c "from onnx_tucker.providers import available_providers as a; raise SystemExit('tensorrt' not in a())" 2>/dev/null && HAVE_TRT=1

cuda_tests() {
    section "CUDA-marked tests"
    if "$PY" -c "import pytest" 2>/dev/null; then
        step 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_bench.py tests/test_runtime.py tests/test_latency_table.py tests/test_reconstruct.py
    else
        say "pytest not installed: CUDA-marked tests not run"
    fi
}
[ "$SCALE" = only ] || cuda_tests  # SCALE=only: the figure first, the tests after it

# bench_on NAME PROVIDER BATCHES RUNS EXTRA... -- MODELS...: one bench call, its JSON kept under NAME
bench_on() {
    local name=$1 provider=$2 batches=$3 runs=$4; shift 4
    local extra=()
    while [ "$1" != "--" ]; do extra+=("$1"); shift; done; shift
    step 240 "$PY" -m onnx_tucker bench "$@" --providers "$provider" --batch "$batches" --runs "$runs" --warmup 20 \
        --cudnn-algo EXHAUSTIVE --json "$TMP/json/$name.json" --no-progress "${extra[@]}"
}

if [ "$HAVE_CUDA" = 1 ] && [ "$SCALE" != 0 ]; then
    section "issue 15: ResNet50 --target-macs 0.5 --layers kxk,1x1 --calibrate DIR (512 noise PNGs), wall time"
    [ -f "$TMP/resnet50.onnx" ] || step 90 "$PY" tools/zoo_models.py resnet50 "$TMP/resnet50.onnx"
    step 60 "$PY" tools/zoo_models.py images "$TMP/imgs" --shape 512,32,32,3
    # the user's command as it is, self-check included (the 10-minute CPU figure was taken with it);
    # SCALE_PROFILE=DIR: once more under cProfile, the profile saved as DIR/resnet50_t05.prof (where the time goes)
    T0=$(date +%s)
    step "${SCALE_LIMIT:-300}" "$PY" -m onnx_tucker "$TMP/resnet50.onnx" "$TMP/resnet50_t05.onnx" --target-macs 0.5 --layers kxk,1x1 \
        --calibrate "$TMP/imgs" --calib-size 512 -v --report "$TMP/json/compress_resnet50_t05_folder.json"
    say "ResNet50 image-folder budget: $(( $(date +%s) - T0 )) s wall"
    # next to the text report at once: back even if a later step is killed at the call's limit
    [ "$SCALE" = only ] && cp "$TMP/json/compress_resnet50_t05_folder.json" "$(dirname "$OUT")/" 2>/dev/null
    if [ -n "${SCALE_PROFILE:-}" ]; then
        T0=$(date +%s)
        step "${SCALE_LIMIT:-300}" "$PY" -m cProfile -o "$SCALE_PROFILE/resnet50_t05.prof" -m onnx_tucker "$TMP/resnet50.onnx" "$TMP/resnet50_t05b.onnx" \
            --target-macs 0.5 --layers kxk,1x1 --calibrate "$TMP/imgs" --calib-size 512 --report "$TMP/json/compress_resnet50_t05_folder_profiled.json"
        say "ResNet50 image-folder budget, second run under cProfile: $(( $(date +%s) - T0 )) s wall"
    fi
fi
[ "$SCALE" = only ] && SKIP_REST=1 || SKIP_REST=0
[ "$SCALE" = only ] && cuda_tests

if [ "$SKIP_REST" = 1 ]; then
    say "SCALE=only: the other measurements are skipped"
else
if "$PY" -c "import torch; raise SystemExit(not torch.cuda.is_available())" 2>/dev/null && in_time; then
    section "--distill on CUDA (reconstruction and global phase): ResNet-20 --ratio 0.5, 512 noise PNGs (timing only)"
    [ -d "$TMP/imgs" ] || step 60 "$PY" tools/zoo_models.py images "$TMP/imgs" --shape 512,32,32,3
    T0=$(date +%s)
    step 240 "$PY" -m onnx_tucker models/cifar10_resnet20.onnx "$TMP/r20_distill.onnx" --ratio 0.5 --calibrate "$TMP/imgs" \
        --calib-size 512 --distill --distill-device cuda --no-check -q --report "$TMP/json/compress_r20_distill_cuda.json"
    say "ResNet-20 --distill on CUDA: $(( $(date +%s) - T0 )) s wall"
else
    say "torch sees no CUDA GPU (or past DEADLINE): --distill on CUDA not timed"
fi

section "CIFAR-10 CNN: ratio 0.5, and latency-aware on CUDA at batch 1 and 32"
CNN=models/cifar10_cnn.onnx
step 120 "$PY" -m onnx_tucker "$CNN" "$TMP/cnn_r05.onnx" --ratio 0.5 --no-check -q
CNN_MODELS=("$CNN" "$TMP/cnn_r05.onnx")
if [ "$HAVE_CUDA" = 1 ]; then
    for b in 1 32; do
        step 120 "$PY" -m onnx_tucker "$CNN" "$TMP/cnn_la_b$b.onnx" --ratio 0.5 --latency-aware --provider "$PROVIDER" --latency-batch "$b" \
            --no-check --report "$TMP/json/compress_cnn_la_b$b.json"
        [ -f "$TMP/cnn_la_b$b.onnx" ] && CNN_MODELS+=("$TMP/cnn_la_b$b.onnx")
    done
    section "bench CIFAR-10 CNN on CUDA: plain, CUDA graph, fp16 (batch 1 and 32, $RUNS runs)"
    bench_on cnn_cuda "$PROVIDER" 1,32 "$RUNS" --data models/cifar10_test_sample.npz -- "${CNN_MODELS[@]}"
    [ "$PROVIDER" = cuda ] && in_time && bench_on cnn_cuda_graph cuda 1,32 "$RUNS" --cuda-graph -- "${CNN_MODELS[@]}"
    in_time && bench_on cnn_cuda_fp16 "$PROVIDER" 1,32 "$RUNS" --fp16 --data models/cifar10_test_sample.npz -- "${CNN_MODELS[@]}"
    if [ "$HAVE_TRT" = 1 ]; then
        in_time && bench_on cnn_tensorrt_fp16 tensorrt 1,32 100 --fp16 -- "${CNN_MODELS[@]}"
    else
        say "TensorRT EP not offered: not benchmarked"
    fi
else
    say "CUDA EP not available: the GPU measurements are skipped (reason above)"
fi

if [ "$HAVE_CUDA" = 1 ] && [ "$BIG" = 1 ] && in_time; then
    section "ResNet50 and VGG16 (224 px, random weights): export"
    step 90 "$PY" tools/zoo_models.py resnet50 "$TMP/resnet50.onnx"
    step 90 "$PY" tools/zoo_models.py vgg16 "$TMP/vgg16.onnx"
    step 30 "$PY" tools/zoo_models.py noise "$TMP/noise224.npz" --shape 64,3,224,224
    for model in vgg16 resnet50; do
        [ -f "$TMP/$model.onnx" ] || continue
        layers=kxk; [ "$model" = resnet50 ] && layers=kxk,1x1
        section "$model: --latency-aware --provider cuda --layers $layers at batch 1 and 32"
        MODELS=("$TMP/$model.onnx")
        for b in 1 32; do
            in_time || break
            step 150 "$PY" -m onnx_tucker "$TMP/$model.onnx" "$TMP/${model}_la_b$b.onnx" --ratio 0.5 --layers "$layers" --latency-aware \
                --provider "$PROVIDER" --latency-batch "$b" --no-check --report "$TMP/json/compress_${model}_la_b$b.json"
            [ -f "$TMP/${model}_la_b$b.onnx" ] && MODELS+=("$TMP/${model}_la_b$b.onnx")
        done
        section "$model: --target-latency 0.6 --latency-batch 32 (calibrated on 64 noise images: a latency figure only)"
        if in_time; then
            step 180 "$PY" -m onnx_tucker "$TMP/$model.onnx" "$TMP/${model}_tl.onnx" --target-latency 0.6 --latency-batch 32 --provider "$PROVIDER" \
                --layers "$layers" --calibrate "$TMP/noise224.npz" --calib-size 64 --no-check --report "$TMP/json/compress_${model}_tl.json"
            [ -f "$TMP/${model}_tl.onnx" ] && MODELS+=("$TMP/${model}_tl.onnx")
        fi
        section "bench $model on CUDA (batch 1 and 32, $BIG_RUNS runs)"
        in_time && bench_on "${model}_cuda" "$PROVIDER" 1,32 "$BIG_RUNS" -- "${MODELS[@]}"
    done
fi


section "CIFAR-10 CNN on the CPU EP: batch 1 and 32, $CPU_THREADS threads, $CPU_RUNS runs, per-layer profile"
in_time && step 240 "$PY" -m onnx_tucker bench "$CNN" "$TMP/cnn_r05.onnx" --providers cpu --batch 1,32 --threads "$CPU_THREADS" \
    --runs "$CPU_RUNS" --warmup 3 --per-layer --data models/cifar10_test_sample.npz --json "$TMP/json/cnn_cpu.json" --no-progress
fi

section "merge JSON into $JSON"
"$PY" - "$TMP/json" "$JSON" <<'EOF' 2>&1 | tee -a "$OUT"
import json, pathlib, sys
folder, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
out.write_text(json.dumps({"schema": "onnx-tucker.gpu_check/2", "runs": runs}, indent=2))
print(f"wrote {out} with runs: {', '.join(runs) or 'none'}")
for name, run in runs.items():  # one line per speedup: what the issue's targets are read from
    for r in run.get("results") or []:
        if r.get("speedup"):
            s = r["speedup"]
            print(f"  {name}: {r['provider']} batch {r['batch']} {r['model']}: {s['median']:.2f}x [{s['p10']:.2f}-{s['p90']:.2f}]")
EOF
section "done in $(elapsed)s; report: $OUT"
