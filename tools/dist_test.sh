#!/usr/bin/env bash
# Multi-GPU evaluation with torchrun:
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS [test.py options]
# CPU processes (no GPU, or CUDA_VISIBLE_DEVICES= to hide them), gloo instead of NCCL:
#   MM_SPECTRAL_DIST_BACKEND=gloo bash tools/dist_test.sh CONFIG CHECKPOINT 2
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
$PYTHON -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    "$(dirname "$0")/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "${@:4}"
