#!/usr/bin/env bash
# What benchmarks/gpu_checks.sh needs on an offline GPU machine that has PyTorch, Lightning and
# transformers but not this project's other training extras nor the 84 MB MiniLM wheel:
#   .gpu/whl/     the extras as wheels for that machine's Python (PYVER, default 3.12), at the versions used here
#   .gpu/minilm/  the packed text encoder (benchmarks/pack_minilm.py pack), about 22 MB
# Then, there, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD OUT=<out> TEXT_PACK=.gpu/minilm benchmarks/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# PY: the interpreter whose installed versions are pinned (default: the project's .venv, as `make` builds it)
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PYVER=${PYVER:-3.12}
mkdir -p .gpu/whl
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for pkg in hydra-core omegaconf webdataset braceexpand; do pins+=("$pkg==$(version "$pkg")"); done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_17_x86_64 -d .gpu/whl "${pins[@]}"
# antlr4-python3-runtime (hydra's parser) is published as a source archive only: build its pure-Python wheel
$PY -m pip wheel -q --no-deps -w .gpu/whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
$PY benchmarks/pack_minilm.py pack .gpu/minilm
du -sh .gpu/whl .gpu/minilm
