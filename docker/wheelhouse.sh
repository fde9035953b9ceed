#!/usr/bin/env bash
# Put torch's CPU wheel (the version pyproject pins) into docker/wheelhouse for the CPU torch image.
# PyPI's Linux torch is the CUDA build (several GB of CUDA libraries), so a CPU image installs
# torch from here (pip --find-links); this is also how an air-gapped site builds.
#   docker/wheelhouse.sh                   pip's own configuration first (its indexes and find-links),
#                                          then PyTorch's CPU index
#   TORCH_CPU_INDEX=URL docker/wheelhouse.sh   another index (a mirror)
# Idempotent: nothing is fetched when the wheel is there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docker/wheelhouse
VERSION=$(sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
[ -n "$VERSION" ] || { echo "wheelhouse: no torch==X pin in pyproject.toml" >&2; exit 1; }
if compgen -G "$OUT/torch-$VERSION+cpu-*.whl" >/dev/null; then
  echo "wheelhouse: $(basename "$(compgen -G "$OUT/torch-$VERSION+cpu-*.whl" | head -1)") is there" >&2
  exit 0
fi
PIP=(python3 -m pip download --no-deps --only-binary=:all: --dest "$OUT"
     --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64)
INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if ! "${PIP[@]}" "torch==$VERSION+cpu" >&2; then
  echo "wheelhouse: not found with pip's configuration; trying $INDEX" >&2
  "${PIP[@]}" --index-url "$INDEX" "torch==$VERSION+cpu" >&2
fi
ls -l "$OUT"/torch-*.whl >&2
