#!/usr/bin/env bash
# Run `mmh-jax score` on every worker of a Cloud TPU pod slice (v4-32, v5e-16, ...).
#
# Usage (from your workstation, with gcloud logged in):
#   TPU_NAME=my-v4 ZONE=us-central2-b CONFIG=tpu_configs/v4-32_sd_laion.toml \
#     PACKAGE="git+https://github.com/ORG/mmh-jax.git@COMMIT" DRY_RUN=1 tpu_configs/launch_tpu_pod.sh
#   ... same line without DRY_RUN and with INSTALL=0: the run, detached on every worker
#   ... tpu_configs/launch_tpu_pod.sh status   # alive or not, last log lines, per worker
#   ... tpu_configs/launch_tpu_pod.sh stop     # end the run on every worker (by its PID)
#
# What it does, on all workers at once (--worker=all):
#   1. copies CONFIG, and the files named in FILES, into ~/$REMOTE_DIR;
#   2. unless INSTALL=0: makes a Python venv and installs mmh-jax[$EXTRAS] from PACKAGE, a
#      pip requirement (a git URL) or a local .whl file (copied over first);
#   3. runs `mmh-jax score --config ~/$REMOTE_DIR/<config>`: with DRY_RUN=1 in the
#      foreground (the plan and a time estimate); otherwise detached with nohup, so the run
#      survives the end of this ssh session; the output goes to ~/$REMOTE_DIR/score.log.
# Every worker must start the same command at about the same time: jax.distributed waits
# 5 minutes for all of them, then fails. Resume after a failure by running it again.
set -euo pipefail

ACTION="${1:-run}"                    # run, status or stop
TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM name}"
ZONE="${ZONE:-us-central2-b}"         # v4 lives in us-central2-b; use your v5e zone for v5e
PROJECT="${PROJECT:-}"                # empty: gcloud's default project
CONFIG="${CONFIG:-tpu_configs/v4-32_sd_laion.toml}"
FILES="${FILES:-}"                    # extra local files to copy beside the config (spaces)
PACKAGE="${PACKAGE:-}"                # git+https://...@COMMIT, or path/to/mmh_jax-*.whl
EXTRAS="${EXTRAS:-tpu,sd}"            # jax[tpu]; sd for Stable Diffusion's tokenizer
INSTALL="${INSTALL:-1}"               # 0: skip step 2 (already installed)
PYTHON="${PYTHON:-python3.11}"        # mmh-jax needs Python >= 3.11; Ubuntu 22.04 has 3.10
VENV="${VENV:-mmh-venv}"              # on the workers, relative to the home folder
REMOTE_DIR="${REMOTE_DIR:-mmh-jax-run}"  # on the workers, relative to the home folder
DRY_RUN="${DRY_RUN:-0}"               # 1: plan and time estimate only; writes nothing

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  where+=(--project="$PROJECT")
fi

# Run one shell command on every worker (in its home folder).
on_all() {
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

# Copy local files into ~/$REMOTE_DIR on every worker.
copy_all() {
  "${gcloud_tpu[@]}" scp "$@" "$TPU_NAME:$REMOTE_DIR/" "${where[@]}" --worker=all
}

pid_file="$REMOTE_DIR/score.pid"
log_file="$REMOTE_DIR/score.log"

case "$ACTION" in
  status)
    on_all "echo \"== \$(hostname)\"; if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; \
then echo running, PID \$(cat $pid_file); else echo not running; fi; tail -n 5 $log_file 2>/dev/null || true"
    exit 0
    ;;
  stop)
    on_all "if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; then \
kill \$(cat $pid_file) && echo \"\$(hostname): stopped PID \$(cat $pid_file)\"; else echo \"\$(hostname): not running\"; fi"
    exit 0
    ;;
  run) ;;
  *)
    echo "usage: $0 [run|status|stop]" >&2
    exit 2
    ;;
esac

if [[ ! -f "$CONFIG" ]]; then
  echo "no config file $CONFIG" >&2
  exit 2
fi
config_name="$(basename "$CONFIG")"
if [[ "$INSTALL" == 1 && -z "$PACKAGE" ]]; then
  echo "set PACKAGE to a git URL (git+https://...@COMMIT) or a wheel file, or INSTALL=0" >&2
  exit 2
fi

# 1. The config (and any extra files) on every worker.
on_all "mkdir -p $REMOTE_DIR"
# shellcheck disable=SC2086  # FILES is a space-separated list on purpose
copy_all "$CONFIG" $FILES

# 2. The package on every worker.
if [[ "$INSTALL" == 1 ]]; then
  if [[ -f "$PACKAGE" ]]; then   # a local wheel: copy it, then install the copy
    copy_all "$PACKAGE"
    requirement="./$REMOTE_DIR/$(basename "$PACKAGE")[$EXTRAS]"
  else
    requirement="mmh-jax[$EXTRAS] @ $PACKAGE"
  fi
  on_all "set -e
if ! command -v $PYTHON >/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv
fi
[ -d $VENV ] || $PYTHON -m venv $VENV
$VENV/bin/pip install -q --upgrade pip
$VENV/bin/pip install -q '$requirement'
$VENV/bin/python -c 'import jax, mmh_jax; print(\"jax\", jax.__version__, \"installed\")'"
fi
# (That check only imports JAX: starting the TPU runtime on a pod needs all workers at once.)

# 3. The run.
command="$VENV/bin/mmh-jax score --config $REMOTE_DIR/$config_name"
if [[ "$DRY_RUN" == 1 ]]; then
  on_all "$command --dry-run"
  exit 0
fi
# Refuse to start while a run is alive on any worker (it holds the TPU): all start or none.
on_all "if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; then
  echo \"\$(hostname): a run is still going (PID \$(cat $pid_file)); use '$0 stop' first\" >&2
  exit 1
fi"
on_all "setsid nohup $command --quiet >> $log_file 2>&1 < /dev/null &
echo \$! > $pid_file
echo \"\$(hostname): started PID \$!, log ~/$log_file\""
echo "started; check with: TPU_NAME=$TPU_NAME ZONE=$ZONE $0 status"
