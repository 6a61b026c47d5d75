#!/usr/bin/env bash
# Evaluation on a Slurm cluster: GPUS tasks, GPUS_PER_NODE on each node, one GPU
# each (GRES= empty on nodes without GPUs: CPU processes joined by gloo).
# Usage: [GPUS=8 GPUS_PER_NODE=8 CPUS_PER_TASK=5 GRES=gpu:8 SRUN_ARGS=...] \
#   tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
shift 4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GRES=${GRES-gpu:$GPUS_PER_NODE}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# shellcheck disable=SC2086
PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
srun -p "$PARTITION" --job-name="$JOB_NAME" \
    ${GRES:+--gres="$GRES"} --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 $SRUN_ARGS \
    python -u "$TOOLS/test.py" "$CONFIG" "$CHECKPOINT" --launcher=slurm "$@"
