#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker, e.g.
#
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/sami_vitb.py --workdir=gs://bucket/runs/sami_vitb
#
# Expects the repository at ~/efficientsam-jax on every worker with its .venv set up
# (pip install -r requirements.txt "jax[tpu]==0.10.2" && pip install --no-deps -e .).
# jax.distributed.initialize() finds the pod's workers from the TPU metadata.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,8p' "$0"; exit 2
fi
tpu=$1 zone=$2; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/efficientsam-jax && . .venv/bin/activate && python -m efficientsam_jax.main --distributed$args"
