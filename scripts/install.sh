#!/usr/bin/env bash
# Creates .venv in the repository root and installs the full OpenMMLab stack into it:
# torch 2.14.1 + torchvision 0.29.1, mmcv 2.1.0 built with its ops (scripts/build_mmcv.sh,
# ~8 min the first time on 2 cores, then from its wheel cache), mmdet, mmseg, mmrotate, timm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
V=.venv/bin/python
$V -m pip install -q --upgrade pip
$V -m pip install -q "setuptools<80" wheel ninja
$V -m pip install -q torch==2.14.1 torchvision==0.29.1 "setuptools<80"
if ! $V -c "import mmcv.ops" 2>/dev/null; then
  PY=$V bash scripts/build_mmcv.sh
fi
$V -m pip install -q -e ".[openmmlab,dev]"
$V -c "import torch, mmcv.ops, mmdet, mmseg, mmrotate, timm, mm_spectral; print('[install] ok: torch', torch.__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| mmrotate', mmrotate.__version__, '| timm', timm.__version__)"
touch .venv/.installed
