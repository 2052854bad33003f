#!/usr/bin/env bash
# Starts one process of a multi-host job by hand (any cluster without SLURM or a TPU pod's metadata).
#
#   launch/multihost.sh COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID --config=configs/X.py --workdir=DIR [...]
#
# Run it once per host with PROCESS_ID 0..NUM_PROCESSES-1 (process 0's host is the coordinator).
# Every process must see the same --workdir (a shared filesystem or a gs:// path for checkpoints)
# and its own share of the data: the jobs split shards by jax.process_index().
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
export JAX_COORDINATOR_ADDRESS=$1 JAX_NUM_PROCESSES=$2 JAX_PROCESS_ID=$3
shift 3
exec python -m efficientsam_jax.main --distributed "$@"
