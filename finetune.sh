#!/usr/bin/env bash
# Launch main_finetuning.py with torchrun.
#   ./finetune.sh CONFIG [NPROC_PER_NODE] [--resume|--eval] [section.key=value ...]
# NPROC_PER_NODE defaults to 1 (a single process: CPU or one GPU). Multi-node: set the
# rendezvous through TORCHRUN_ARGS, e.g.
#   TORCHRUN_ARGS="--nnodes 4 --node_rank $NODE_RANK --rdzv_backend c10d \
#                  --rdzv_endpoint $MASTER:29500 --rdzv_id job42" ./finetune.sh CONFIG 8
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [NPROC_PER_NODE] [--resume|--eval] [section.key=value ...]" >&2
  exit 2
fi
config=$1; shift
nproc=1
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
# Bad input: one error line (exit 2) from one process, not one per worker from torchrun.
"$python" "$here/main_finetuning.py" --check --fname "$config" "$@" || exit $?
# One process and no rendezvous flags: a standalone group on a free local port.
default_args="--standalone"
exec "$python" -m torch.distributed.run ${TORCHRUN_ARGS:-$default_args} \
  --nproc_per_node "$nproc" "$here/main_finetuning.py" --fname "$config" "$@"
