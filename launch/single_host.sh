#!/usr/bin/env bash
# One host, all of its accelerators (or CPU cores): the plain sora-train command.
#   launch/single_host.sh configs/kinetics_sounds.py runs/ks [--config.KEY=VALUE ...]
# On a GPU host install a CUDA build of JAX into the venv first:
#   .venv/bin/pip install "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/single_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
workdir=${2:?usage: launch/single_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 2
exec "${VENV:-.venv}/bin/sora-train" --config "$config" --workdir "$workdir" "$@"
