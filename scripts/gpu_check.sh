#!/usr/bin/env bash
# The GPU check, one command: scripts/gpu_check.sh [--cpu] OUTDIR [more loadtest.gpucheck options]
#
# On a host with one CUDA GPU, PyTorch and no network it serves resnet and encoder with
# torch_server on cuda for fp32/bf16/fp16 x compile off/on (and tf_server where TensorFlow
# with GPU support imports; otherwise it says it skipped it), checks parity against the
# CPU fp32 reference, and measures served vs in-process throughput at 64 callers, p50/p99
# and GPU memory, into OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (about 7 minutes).
# --cpu runs the same path on the CPU with small models (CI runs it: tests/test_gpu_check.py).
#
# Python: $PYTHON, else .venv/bin/python when it exists, else python3. The check needs
# numpy, torch, grpcio, protobuf, prometheus-client, psutil, grpcio-health-checking and
# grpcio-reflection (nvidia-ml-py for GPU memory); no Locust, no TensorFlow. Missing
# wheels can be carried in .whl/ at the repository root (see README, "Precision and
# compilation"): they are installed into a temporary folder for this run, nothing else.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi

imports="import numpy, torch, grpc, google.protobuf, prometheus_client, psutil, grpc_health.v1.health, \
grpc_reflection.v1alpha.reflection; import contract.protocol.inference_pb2_grpc"
if ! PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -c "$imports" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site="$(mktemp -d)/site"
        echo "gpu_check: installing the carried wheels in .whl/ into $site" >&2
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -c "$imports"; then
        cat >&2 <<'EOF'
gpu_check: a package the servers need does not import (above). On a machine with pip access, fetch
the wheels into .whl/ at the repository root and run again, e.g. for Python 3.12 on x86-64:
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl grpcio==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 protobuf==6.33.6
EOF
        exit 2
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m loadtest.gpucheck "$@"
