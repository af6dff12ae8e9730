#!/usr/bin/env bash
# `mmh-jax score` on one node with several GPUs: one process that drives all of them.
#
#   DRY_RUN=1 tpu_configs/multi_gpu_node.sh    # the plan and a time estimate
#   tpu_configs/multi_gpu_node.sh              # the run (inside tmux or screen: it is long)
#   CONFIG=my.toml VENV=~/venvs/mmh tpu_configs/multi_gpu_node.sh
#
# No jax.distributed here: the config has [distributed] initialize = false, and the one
# process sees every GPU that CUDA_VISIBLE_DEVICES lets through (all of them when unset).
# Stopped or crashed? Run the same line again: finished chunks are skipped.
set -euo pipefail

CONFIG="${CONFIG:-tpu_configs/multi_gpu_node.toml}"
VENV="${VENV:-.venv}"          # a venv with mmh-jax[cuda] installed
DRY_RUN="${DRY_RUN:-0}"        # 1: plan and time estimate only; writes nothing

# JAX reserves this fraction of each GPU's memory when it starts (its default is 0.75).
# The GPUs are ours alone, so take more room for the batch; lower it, or set
# XLA_PYTHON_CLIENT_PREALLOCATE=false, if other programs share the GPUs. An out-of-memory
# error in the dry run calls for a smaller [run] batch_size rather than a fraction near 1.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

# To use only some GPUs, e.g. four: CUDA_VISIBLE_DEVICES=0,1,2,3 (then batch_size must be a
# multiple of 4).
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  echo "using GPUs $CUDA_VISIBLE_DEVICES"
fi

# The venv's activate script reads unset variables; relax -u while it runs.
set +u
# shellcheck disable=SC1091
source "$VENV/bin/activate"
set -u

args=(score --config "$CONFIG")
if [[ "$DRY_RUN" == 1 ]]; then
  args+=(--dry-run)
fi
exec mmh-jax "${args[@]}"
