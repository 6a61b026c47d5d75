#!/usr/bin/env bash
# Multi-process training on one or more nodes with torchrun.
# Usage: tools/dist_train.sh CONFIG NPROC [train.py options]
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host tools/dist_train.sh ...
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: tools/dist_train.sh CONFIG NPROC [train.py options]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
python -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" --master_port="$PORT" \
    "$TOOLS/train.py" "$CONFIG" --launcher pytorch "$@"
