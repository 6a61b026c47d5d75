#!/usr/bin/env bash
# Multi-process testing on one or more nodes with torchrun.
# Usage: tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py options]
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host tools/dist_test.sh ...
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
python -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" --master_port="$PORT" \
    "$TOOLS/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
