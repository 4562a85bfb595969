#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what benchmarks/gpu.sh installs on a GPU machine that has torch,
# transformers and accelerate but neither diffusers nor pydantic, and no package index: the
# diffusers pin (and importlib_metadata, the one dependency such an image lacks), pydantic with its
# compiled core for that machine's Python. ipa itself runs from the tree (PYTHONPATH).
# Run it here, then carry `.whl` with the tree to the GPU machine.
# usage: bash benchmarks/gpu_wheels.sh [PYTHON_VERSION, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
pip=(.venv/bin/python -m pip)
mkdir -p .whl
"${pip[@]}" download -q --no-deps -d .whl "diffusers==0.42.1" importlib_metadata zipp
"${pip[@]}" download -q -d .whl --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
  "pydantic>=2.7"
ls -la .whl
