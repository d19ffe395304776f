#!/usr/bin/env bash
# Wheels for bench/gpu_bench.py on a lent GPU machine (INTERFACES §5): it has torch (CUDA), transformers, peft,
# pyarrow, opencv and pyyaml, but not deepspeed, diffusers or pydantic, and no package index. Run here, from the
# repository root; then on the device (the `device` tool, naming .whl in `carry`):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu_bench.py --out $OUT/gpu_results.json
#
# deepspeed is built here as a pure-Python wheel with DS_BUILD_OPS=0 (its CUDA ops JIT-compile there: nvcc and
# ninja are present); the others are the versions of constraints.txt, for CPython 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
mkdir -p "$OUT"
grep -qxF "/$OUT/" .git/info/exclude 2>/dev/null || echo "/$OUT/" >> .git/info/exclude
pin() { grep -i -E "^$1==" constraints.txt | head -1; }
PY=${PYTHON:-.venv/bin/python}
# pure-Python and binary wheels for the device's Python 3.12
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT" \
  "$(pin diffusers)" "$(pin importlib_metadata)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" \
  "$(pin typing-inspection)" "$(pin hjson)"
# deepspeed ships only as an sdist: a py3-none-any wheel without prebuilt ops
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$(pin deepspeed)"
ls -la "$OUT"
du -sh "$OUT"
