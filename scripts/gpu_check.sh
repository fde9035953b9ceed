#!/usr/bin/env bash
# The GPU check in two steps (docs/gpu.md, "The GPU check"; the code is gpucheck/):
#
#   scripts/gpu_check.sh --prepare        # once, where pip has network: the wheels the check carries
#                                         # (gpucheck/wheels.py, about 7 MiB) into .whl/ (git-ignored)
#   scripts/gpu_check.sh [--cpu] OUTDIR [python -m gpucheck run options]
#                                         # on the GPU host (one CUDA GPU, torch, Python 3.12, no network)
#
# The run installs the wheels in .whl/ offline into a temporary folder put first on PYTHONPATH (for
# this run only), checks that the check imports, and runs it: torch_server (tf_server too where
# TensorFlow imports and sees a GPU) on cuda:0, resnet and encoder x fp32/bf16/fp16 x compile off/on:
# parity with the CPU fp32 reference, served vs in-process throughput at 64 callers, p50/p99, GPU
# memory, then the worker sweep. Results: OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (printed too).
# Its time budget (--budget-s, 420 s) bounds the whole check: under 8 minutes in all; what does not
# fit is reported as skipped. --cpu runs the same path on the CPU with small models
# (tests/integration/test_gpu_check.py). Python: $PYTHON, else .venv/bin/python when it exists, else python3.
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
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--prepare" ]]; then
    exec "$python" -m gpucheck prepare
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    if "$python" -m pip --version >/dev/null 2>&1; then
        installed() {
            "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
                --target "$scratch/site" .whl/*.whl
        }
    else  # no pip on the host: a wheel is a zip archive of what it installs
        installed() {
            local wheel
            for wheel in .whl/*.whl; do "$python" -m zipfile -e "$wheel" "$scratch/site" || return 1; done
        }
    fi
    if installed; then
        export PYTHONPATH="$scratch/site:$PYTHONPATH"
        echo "gpu_check: using the wheels in .whl/ for this run" >&2
    else
        echo "gpu_check: the wheels in .whl/ do not install for $("$python" -V 2>&1) (above); using its own packages" >&2
    fi
fi

if ! "$python" -c "import gpucheck.cli, serving.server, torch_server.framework"; then
    cat >&2 <<'EOF'
gpu_check: the check does not import here (above). On a machine where pip has network, in this
repository, run   scripts/gpu_check.sh --prepare   and bring the .whl/ folder it fills to this one.
EOF
    exit 2
fi
status=0
"$python" -m gpucheck run "$@" || status=$?
exit "$status"
