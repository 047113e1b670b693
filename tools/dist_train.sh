#!/usr/bin/env bash
# Multi-GPU / multi-node training with torchrun, as in OpenMMLab:
#   bash tools/dist_train.sh CONFIG NUM_GPUS [train.py options]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh CONFIG 8
# CPU processes (no GPU, or CUDA_VISIBLE_DEVICES= to hide them), gloo instead of NCCL:
#   MM_SPECTRAL_DIST_BACKEND=gloo bash tools/dist_train.sh CONFIG 2
CONFIG=$1
GPUS=$2
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
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
