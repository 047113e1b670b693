#!/usr/bin/env bash
# Installs mmcv 2.1.0 with its compiled ops into the active Python ($PY, default .venv).
# mmcv 2.x is source-only on PyPI, its setup.py imports torch and pkg_resources (so no build
# isolation, setuptools<80 first), and it hard-codes -std=c++17 while torch >= 2.10's
# headers need C++20: the sdist is patched to build with -std=c++20. The wheel is kept in
# a cache keyed by the torch version, so a second install on the same machine is instant.
set -euo pipefail
PY=${PY:-.venv/bin/python}
TORCH=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
CACHE=${MMCV_WHEEL_CACHE:-$HOME/.cache/mm_spectral/wheels/torch-$TORCH}
mkdir -p "$CACHE"
if ! ls "$CACHE"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  echo "[mmcv] building mmcv 2.1.0 with ops against torch $TORCH (~8 min on 2 cores, once)"
  work=$(mktemp -d)
  $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$work"
  tar xzf "$work"/mmcv-2.1.0.tar.gz -C "$work"
  sed -i "s/'-std=c++17'/'-std=c++20'/g" "$work"/mmcv-2.1.0/setup.py
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE" "$work"/mmcv-2.1.0
  rm -rf "$work"
fi
$PY -m pip install -q --no-deps "$CACHE"/mmcv-2.1.0-*.whl
