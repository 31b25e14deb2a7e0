#!/usr/bin/env bash
# disttrain under torchrun (torch's elastic launcher). Every argument is a Hydra override.
#
#   launch/torchrun.sh strategy=ddp trainer.max_steps=1000            # one node
#   NPROC_PER_NODE=4 MAX_RESTARTS=3 launch/torchrun.sh strategy=ddp    # restart failed workers
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 launch/torchrun.sh  # on each node (NODE_RANK 0, 1)
#   NNODES=1:2 MAX_RESTARTS=3 RDZV_ENDPOINT=node0:29400 launch/torchrun.sh trainer.global_batch_size=256
#       # elastic: a node that dies is left out at the next rendezvous; the rest resume from the
#       # newest checkpoint on fewer ranks (resharded) with the same global batch and sample order
#
# Variables: NPROC_PER_NODE (default "auto": one per GPU, else one per CPU), NNODES (1),
# RDZV_ENDPOINT (host:port of the rendezvous, needed when NNODES > 1), RDZV_ID (job name),
# MAX_RESTARTS (0), RDZV_CONF (torchrun's --rdzv-conf, e.g. last_call_timeout=5), PYTHON (python). Rank/world/master come to disttrain through torchrun's
# own variables (disttrain/distributed/env.py); nothing else is set here. A restarted worker group
# resumes from the newest complete checkpoint of the same run dir: to resume across two
# separate invocations, give the same hydra.run.dir (with --standalone every invocation is
# a new run id, hence a new default run dir).
set -euo pipefail

args=(--nproc-per-node="${NPROC_PER_NODE:-auto}" --max-restarts="${MAX_RESTARTS:-0}")
if [ "${NNODES:-1}" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    args+=(--standalone)          # a free port on this host: never a fixed 29500 on shared machines
else
    args+=(--nnodes="${NNODES:-1}" --rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
           --rdzv-id="${RDZV_ID:-disttrain}")
    if [ -n "${RDZV_CONF:-}" ]; then args+=(--rdzv-conf="$RDZV_CONF"); fi
fi
exec "${PYTHON:-python}" -m torch.distributed.run "${args[@]}" -m disttrain "$@"
