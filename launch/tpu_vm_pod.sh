#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: every worker runs the same sora-train command and
# JAX detects the pod (--config.distributed.num_processes=-1).
#
# Edit or export before running:
#   TPU_NAME, ZONE, PROJECT   the TPU VM slice
#   REPO_DIR                  where this repository is checked out on every worker
#   CONFIG, WORKDIR           the config, and a work dir all workers share (gs://...)
#
#   launch/tpu_vm_pod.sh setup                     # once: venv + jax[tpu] on every worker
#   launch/tpu_vm_pod.sh train [--config.KEY=VALUE ...]
#   DRY_RUN=1 launch/tpu_vm_pod.sh train ...       # print the gcloud command only
#
# Preemption: TPU VMs send SIGTERM; sora-train saves a checkpoint and exits, and the
# same command resumes. Data: --config.data.dir may be a gs:// path (tfds reads it).
set -euo pipefail
TPU_NAME=${TPU_NAME:-my-tpu-v5e-32}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-my-project}
REPO_DIR=${REPO_DIR:-'~/sora_jax'}  # expanded on the workers
CONFIG=${CONFIG:-configs/kinetics_sounds.py}
WORKDIR=${WORKDIR:-gs://my-bucket/runs/kinetics_sounds}

mode=${1:?usage: launch/tpu_vm_pod.sh setup|train [--config.KEY=VALUE ...]}
shift
# The remote command is a shell string: every value is quoted for that shell, so an
# argument arrives as one argument, whatever spaces, quotes or semicolons it holds.
quote() { printf '%q' "$1"; }
args=""
for arg in "$@"; do args+=" $(quote "$arg")"; done
case "$mode" in
  setup)
    remote="cd $REPO_DIR && make .venv/.installed && .venv/bin/pip install --quiet \
'jax[tpu]==\$(.venv/bin/python -c \"import jax; print(jax.__version__)\")'" ;;
  train)
    remote="cd $REPO_DIR && .venv/bin/sora-train --config $(quote "$CONFIG") \
--workdir $(quote "$WORKDIR") --config.distributed.num_processes=-1$args" ;;
  *) echo "unknown mode $mode (setup or train)" >&2; exit 2 ;;
esac
command=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT"
         --worker=all --command "$remote")
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${command[@]}"; echo
else
  "${command[@]}"
fi
