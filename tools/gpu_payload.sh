#!/usr/bin/env bash
# Carry onnxruntime-gpu (and, optionally, CIFAR-10 training images) to a lent GPU machine whose calls take at
# most 64 MiB of working tree each (/work/.library/device/README.md). onnxruntime-gpu 1.31 for CUDA 13 is a
# 256 MB wheel (xz: 204 MB), so it travels in parts, one short call per part, with the checkout hidden from
# git so that a call sends only the part it carries. How it went the first time: a 6 s call per 66 MB part.
#
#   tools/gpu_payload.sh pack [IMAGES]   here: onnxruntime-gpu + onnx-graphsurgeon + tensorly (+ IMAGES seeded
#                                        CIFAR-10 training images, default 0) -> .gpu1 ... .gpuN (N-1 parts of
#                                        66 MB; the last holds the rest, the wheels, HEAD's code and this script)
#   tools/gpu_payload.sh hide            here: save .git/index, empty it, ignore everything: a call now sends
#                                        only the paths it carries (nothing in the work tree changes)
#   tools/gpu_payload.sh restore         here: the saved index and .git/info/exclude back (run it after the calls)
#
# Then, with calls less than 30 s apart (a machine goes back after 30 s idle):
#   K = 1 .. N-1:  run(command="mkdir -p /tmp/p && cp .gpuK/part* /tmp/p/", carry=[".gpuK"], timeout_s=60)
#   last:          run(command="bash .gpuN/repo/tools/gpu_payload.sh unpack && . /tmp/gpu_env.sh && cd .gpuN/repo && \
#                               SCALE=1 tools/gpu_check.sh $OUT/gpu_check.txt", carry=[".gpuN"])
#   tools/gpu_payload.sh unpack          device: join the parts, check the sha256, unpack onnxruntime-gpu into
#                                        /tmp/site (images: /tmp/cdata/cifar10_train.npz), write /tmp/gpu_env.sh
#                                        (PYTHONPATH, LD_LIBRARY_PATH to the CUDA libraries of the torch there)
# Never use `wait` with no argument in a script whose output goes through `> >(tee ...)`: it waits for tee.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PART=66000000
ORT=${ORT_GPU:-onnxruntime-gpu==1.31.1}

pack() {
    local images=${1:-0} work
    work=$(mktemp -d /tmp/gpu-payload.XXXXXX)
    cd "$ROOT"
    rm -rf .gpu[0-9]*
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$work/whl" "$ORT" onnx-graphsurgeon==0.6.1 tensorly==0.10.0
    mkdir -p "$work/ort" "$work/blob"
    unzip -q "$work"/whl/onnxruntime_gpu-*.whl -d "$work/ort" -x '*/libonnxruntime_providers_tensorrt.so'
    mv "$work"/ort/onnxruntime/capi/libonnxruntime_providers_cuda.so "$work/cuda.so"
    xz -T0 -6 -c "$work/cuda.so" > "$work/blob/cuda.so.xz"
    (cd "$work/ort" && tar -cf - .) | xz -T0 -6 > "$work/blob/rest.tar.xz"
    if [ "$images" -gt 0 ]; then
        python3 - "$images" "$work/blob/cifar10_train.npz" "${CIFAR10:-$ROOT/../shared/data/cifar10}" <<'EOF'
import sys, numpy as np
from pathlib import Path
n, out, data = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
d = np.load(data / "cifar10_train.npz")
idx = np.sort(np.random.default_rng(2026).permutation(len(d["x_train"]))[:n])  # the file is grouped by class
np.savez(out, x_train=d["x_train"][idx], y_train=d["y_train"][idx])
EOF
        xz -T0 -6 "$work/blob/cifar10_train.npz"
    fi
    (cd "$work/blob" && tar -cf "$work/blob.tar" *)
    (cd "$work" && split -b "$PART" -d -a 2 blob.tar part)
    local parts=("$work"/part*) n k
    n=${#parts[@]}
    for k in $(seq 1 "$n"); do mkdir -p ".gpu$k" && mv "${parts[$((k - 1))]}" ".gpu$k/"; done
    mkdir -p ".gpu$n/whl" ".gpu$n/repo"
    mv "$work"/whl/onnx_graphsurgeon-*.whl "$work"/whl/tensorly-*.whl ".gpu$n/whl/"
    sha256sum "$work/blob.tar" | cut -c1-64 > ".gpu$n/blob.sha256"
    git archive HEAD onnx_tucker tools tests pyproject.toml models/cifar10_cnn.onnx models/cifar10_test_sample.npz | tar -x -C ".gpu$n/repo"
    git rev-parse --short HEAD > ".gpu$n/repo/COMMIT"  # the code's commit: the device's copy has another git HEAD
    rm -rf "$work"
    grep -qx '/.gpu\*/' .git/info/exclude 2>/dev/null || echo '/.gpu*/' >> .git/info/exclude
    du -sh .gpu[0-9]*
    echo "next: tools/gpu_payload.sh hide; then $n device calls (carry .gpu1 .. .gpu$n); then tools/gpu_payload.sh restore"
}

hide() {
    cd "$ROOT"
    [ -f .git/index.gpu-payload ] && { echo "already hidden (restore first)" >&2; exit 2; }
    cp .git/index .git/index.gpu-payload
    cp .git/info/exclude .git/info/exclude.gpu-payload 2>/dev/null || : > .git/info/exclude.gpu-payload
    git read-tree --empty
    echo '*' > .git/info/exclude
    echo "hidden: $(git ls-files | wc -l) tracked, $(git ls-files -o --exclude-standard | wc -l) untracked files would travel"
}

restore() {
    cd "$ROOT"
    [ -f .git/index.gpu-payload ] || { echo "nothing to restore" >&2; exit 2; }
    mv .git/index.gpu-payload .git/index
    mv .git/info/exclude.gpu-payload .git/info/exclude
    git status --short | head
}

unpack() {
    local last here
    here=$(cd "$(dirname "$0")/../.." && pwd)  # .gpuN
    cp "$here"/part* /tmp/p/ 2>/dev/null || { mkdir -p /tmp/p && cp "$here"/part* /tmp/p/; }
    cat /tmp/p/part* > /tmp/blob.tar
    [ "$(sha256sum /tmp/blob.tar | cut -c1-64)" = "$(cat "$here/blob.sha256")" ] || { echo "payload checksum differs: a part is missing" >&2; exit 1; }
    mkdir -p /tmp/u /tmp/site /tmp/cdata
    tar -xf /tmp/blob.tar -C /tmp/u && rm -f /tmp/blob.tar
    python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target /tmp/site "$here"/whl/*.whl
    python3 - <<'EOF'
import lzma, os, shutil, tarfile
with lzma.open("/tmp/u/rest.tar.xz") as f:
    tarfile.open(fileobj=f, mode="r|").extractall("/tmp/site", filter="data")
pairs = [("/tmp/u/cuda.so.xz", "/tmp/site/onnxruntime/capi/libonnxruntime_providers_cuda.so"),
         ("/tmp/u/cifar10_train.npz.xz", "/tmp/cdata/cifar10_train.npz")]
for src, dst in pairs:
    if os.path.exists(src):
        with lzma.open(src) as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 24)
EOF
    rm -rf /tmp/u
    last=$(python3 -c "import glob, os, site; print(':'.join(sorted({os.path.dirname(p) for sp in site.getsitepackages() for p in glob.glob(sp + '/nvidia/**/lib*.so*', recursive=True)})))")
    printf 'export PYTHONPATH=/tmp/site%s\nexport LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "${PYTHONPATH:+:$PYTHONPATH}" "$last" > /tmp/gpu_env.sh
    # shellcheck disable=SC1091
    . /tmp/gpu_env.sh
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
}

case "${1:-}" in
    pack) shift; pack "$@" ;;
    hide) hide ;;
    restore) restore ;;
    unpack) unpack ;;
    *) sed -n '2,24p' "$0"; exit 2 ;;
esac
