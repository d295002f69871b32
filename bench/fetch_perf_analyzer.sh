#!/usr/bin/env bash
# Fetch Triton's perf_analyzer binary into $SPECREC_HOME/tools/perf_analyzer (idempotent); prints the binary's path.
# PyPI's `perf-analyzer` here resolves only to a 0.1.0 placeholder, so take the real binary that the
# tritonclient 2.48.0 wheel still ships (bin/perf_analyzer), plus the CUDA runtime library it links against
# (the nvidia-cuda-runtime-cu12 wheel; no GPU is used) and libb64 (Debian package libb64-0d).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEST=${SPECREC_HOME:-$HOME/.cache/specrec}/tools/perf_analyzer
BIN=$DEST/bin/perf_analyzer
if [ ! -x "$BIN" ]; then
    mkdir -p "$DEST/wheels" "$DEST/bin" "$DEST/lib"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/wheels" tritonclient==2.48.0 \
        nvidia-cuda-runtime-cu12 >&2
    unzip -o -q -j "$DEST"/wheels/tritonclient-2.48.0-*.whl 'tritonclient-2.48.0.data/data/bin/perf_analyzer' -d "$DEST/bin"
    unzip -o -q -j "$DEST"/wheels/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$DEST/lib"
    chmod +x "$BIN"
    rm -rf "$DEST/wheels"
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get install -y -q libb64-0d || (apt-get update -q && apt-get install -y -q libb64-0d)) >&2
    else
        echo "perf_analyzer needs libb64.so.0d: apt-get install libb64-0d" >&2; exit 1
    fi
fi
echo "$BIN"
