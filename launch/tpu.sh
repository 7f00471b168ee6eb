#!/usr/bin/env bash
# Trains radar_jax on a Cloud TPU VM (one host or a pod slice) and restarts it after preemptions.
#
#   launch/tpu.sh up --name=radar-xl --zone=us-east5-a --type=v5p-64 --spot \
#       --workdir=gs://BUCKET/radar_xl -- --config=configs/xl.py --config.train.num_steps=1000
#
# Commands (default: up):
#   up      create (or reuse) the TPU, setup, run, then watch; safe to run again: a TPU that is
#           READY is reused and workers where the run is alive are left alone
#   create  create the TPU, or reuse it when it exists; a PREEMPTED one (queued resource
#           SUSPENDED / FAILED) is deleted and created again; waits until it is READY
#   setup   copy this checkout to every worker; install it with jax[tpu] into a Python 3.11
#           venv (~/radar_jax_venv) made by uv, which pip installs from PyPI into ~/.local
#           (the TPU images ship Python 3.10; uv fetches a 3.11 build without sudo or a PPA)
#   run     start the run on every worker under nohup; worker W logs to
#           ~/radar_jax_logs/worker-W.log and writes its exit status to worker-W.exit
#   watch   poll every --poll s until the run ends: after a preemption (TPU PREEMPTED or queued
#           resource SUSPENDED / FAILED), or when the run exits with the preemption status
#           (RADAR_PREEMPTED_STATUS, default 143) or vanishes, recreate / setup / run again; the
#           run resumes from the last checkpoint in the gs:// workdir. Ctrl-C stops watching only.
#   status  the TPU's state and each worker's run: running, exit=N or none
#   logs    follow the log of --worker (default 0, the process that logs progress; or all)
#   stop    send SIGTERM to the run on every worker (it saves a checkpoint) and wait for it
#   delete  delete the TPU (with --queued / --spot: its queued resource)
#
# Options (give the same ones to every command; NAME=VALUE or NAME VALUE):
#   --name=N          TPU and queued-resource name (default radar-jax)
#   --zone=Z          --project=P: passed to gcloud (default: gcloud's configuration)
#   --type=T          accelerator type, needed to create: v5p-8, v5p-64, v5litepod-16, v6e-8 ...
#   --version=V       TPU runtime (default from --type: v5p v2-alpha-tpuv5, v5litepod
#                     v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v2/v3/v4 tpu-ubuntu2204-base)
#   --queued          create through a queued resource (waits for capacity instead of failing)
#   --spot            spot capacity: cheaper, preemptible (implies --queued)
#   --workdir=gs://B/D  checkpoints and outputs; must be gs:// so every worker, and every
#                     re-created TPU, sees the same files
#   --python=3.11     --jax='jax[tpu]' (pip requirement)   --poll=60 (s)   --max-restarts=20
#   --worker=W        worker for logs (0..N-1 or all)
# Everything after -- goes to `python -m radar_jax.main` unchanged: each word is quoted for the
# remote shell (printf %q), so --config.sample.labels='(3,5,8)' arrives as typed. On a slice of
# more than one worker, --multihost is added (main.py then runs jax.distributed.initialize()).
# GCLOUD names the gcloud binary (default gcloud).
# shellcheck disable=SC2016  # the remote scripts are single-quoted: they expand on the worker
set -euo pipefail

GCLOUD=${GCLOUD:-gcloud}
PREEMPTED_STATUS=${RADAR_PREEMPTED_STATUS:-143}
NAME=radar-jax ZONE='' PROJECT='' TYPE='' VERSION='' QUEUED=0 SPOT=0 WORKDIR=''
PYVER=3.11 JAX_REQ='jax[tpu]' POLL=60 MAX_RESTARTS=20 WORKER=0
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
NEED_ARGS="pass the radar_jax flags after --, e.g. -- --config=configs/xl.py"

usage() { sed -n '2,/^set -euo/p' "$0" | grep -v '^set\|shellcheck' | sed 's/^# \{0,1\}//'; }
die() { echo "launch/tpu.sh: $*" >&2; exit 2; }
say() { echo "[$(date +%H:%M:%S)] $*" >&2; }

CMD=up
case ${1:-} in
  up|create|setup|run|watch|status|logs|stop|delete) CMD=$1; shift ;;
  -h|--help|help) usage; exit 0 ;;
esac
RUN_ARGS=()
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --) RUN_ARGS=("$@"); break ;;
    --queued) QUEUED=1; continue ;;
    --spot) SPOT=1; QUEUED=1; continue ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --*) key=$arg; [ $# -gt 0 ] || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected '$arg': radar_jax flags go after --, e.g. -- --config=configs/xl.py" ;;
  esac
  case $key in
    --name) NAME=$val ;; --zone) ZONE=$val ;; --project) PROJECT=$val ;;
    --type) TYPE=$val ;; --version) VERSION=$val ;; --workdir) WORKDIR=$val ;;
    --python) PYVER=$val ;; --jax) JAX_REQ=$val ;; --poll) POLL=$val ;;
    --max-restarts) MAX_RESTARTS=$val ;; --worker) WORKER=$val ;;
    *) die "unknown option $key (see launch/tpu.sh --help)" ;;
  esac
done

GFLAGS=()
[ -n "$ZONE" ] && GFLAGS+=("--zone=$ZONE")
[ -n "$PROJECT" ] && GFLAGS+=("--project=$PROJECT")
g() { "$GCLOUD" "$@" ${GFLAGS[@]+"${GFLAGS[@]}"}; }
# Runs a bash script on the TPU's workers (gcloud runs it with the login shell, bash on TPU VMs).
remote() { local worker=$1 script=$2; g compute tpus tpu-vm ssh "$NAME" --worker="$worker" \
  --command="$script"; }

# The remote side learns its worker index from the metadata server (TPU_WORKER_ID overrides).
REMOTE_PRELUDE='w=${TPU_WORKER_ID:-$(curl -sf -m 10 -H "Metadata-Flavor: Google" '\
'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number'\
' || hostname)}; d=$HOME/radar_jax_logs; mkdir -p "$d"
alive() { [ -f "$d/worker-$w.pid" ] && kill -0 "$(cat "$d/worker-$w.pid")" 2>/dev/null; }'

# Prints the field; on failure prints NOT_FOUND (gcloud says so) or UNKNOWN (network, auth:
# watch waits and asks again rather than re-creating a TPU that may exist) and fails.
describe() {
  local out err; err=$(mktemp)
  if out=$(g compute tpus "$1" describe "$NAME" --format="$2" 2>"$err"); then
    rm -f "$err"; echo "$out"; return 0
  fi
  if grep -qi 'not.found' "$err"; then echo NOT_FOUND
  else echo UNKNOWN; sed 's/^/  /' "$err" >&2; fi
  rm -f "$err"; return 1
}

# --- TPU state ------------------------------------------------------------------------------
# One word: READY, a transitional state (CREATING, WAITING_FOR_RESOURCES, ...), NOT_FOUND, or
# PREEMPTED (also for a queued resource that is SUSPENDED / FAILED: both need a new TPU).
tpu_state() {
  local s
  if [ "$QUEUED" = 1 ]; then
    s=$(describe queued-resources 'value(state.state)') || { echo "$s"; return 0; }
    case $s in
      SUSPENDING|SUSPENDED|FAILED) echo PREEMPTED; return ;;
      ACTIVE) ;;
      *) echo "${s:-UNKNOWN}"; return ;;
    esac
  fi
  s=$(describe tpu-vm 'value(state)') || { echo "$s"; return 0; }
  case $s in TERMINATED) echo PREEMPTED ;; *) echo "${s:-UNKNOWN}" ;; esac
}

delete_tpu() {
  say "deleting $NAME"
  if [ "$QUEUED" = 1 ]; then
    g compute tpus queued-resources delete "$NAME" --force --quiet
  else
    g compute tpus tpu-vm delete "$NAME" --quiet
  fi
}

create_tpu() {
  [ -n "$TYPE" ] || die "--type is needed to create $NAME, e.g. --type=v5p-64"
  if [ -z "$VERSION" ]; then
    case $TYPE in
      v5p-*) VERSION=v2-alpha-tpuv5 ;; v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;; v2-*|v3-*|v4-*) VERSION=tpu-ubuntu2204-base ;;
      *) die "no default runtime for --type=$TYPE: pass --version (gcloud compute tpus" \
        "tpu-vm versions list)" ;;
    esac
  fi
  say "creating $NAME ($TYPE, $VERSION$([ "$SPOT" = 1 ] && echo ', spot'))"
  if [ "$QUEUED" = 1 ]; then
    local extra=(); [ "$SPOT" = 1 ] && extra=(--spot)
    g compute tpus queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$TYPE" \
      --runtime-version="$VERSION" ${extra[@]+"${extra[@]}"}
  else
    g compute tpus tpu-vm create "$NAME" --accelerator-type="$TYPE" --version="$VERSION"
  fi
}

# Creates, reuses or re-creates the TPU, then waits until it is READY.
ensure_tpu() {
  local s last=''
  while :; do
    s=$(tpu_state)
    [ "$s" != "$last" ] && say "$NAME: $s"; last=$s
    case $s in
      READY) return 0 ;;
      NOT_FOUND) create_tpu ;;
      PREEMPTED) delete_tpu; create_tpu ;;
      STOPPED) g compute tpus tpu-vm start "$NAME" ;;
      *) sleep "$POLL" ;;
    esac
  done
}

# --- the run on the workers -----------------------------------------------------------------
setup() {
  local tmp; tmp=$(mktemp -d)
  # The working tree as it is (uncommitted edits included), without VCS data, venvs and outputs.
  tar -C "$REPO_DIR" --exclude=.git --exclude='.*venv' --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=./workdirs --exclude=./tmp \
    -czf "$tmp/radar_jax.tgz" .
  say "copying the repository to every worker of $NAME"
  g compute tpus tpu-vm scp "$tmp/radar_jax.tgz" "$NAME:/tmp/radar_jax.tgz" --worker=all
  rm -rf "$tmp"
  say "installing Python $PYVER, radar_jax and $JAX_REQ on every worker"
  remote all "set -e
rm -rf ~/radar_jax.new && mkdir -p ~/radar_jax.new && tar -C ~/radar_jax.new -xzf /tmp/radar_jax.tgz
rm -rf ~/radar_jax && mv ~/radar_jax.new ~/radar_jax && cd ~/radar_jax
python3 -m pip install -q --user -U uv 2>/dev/null \\
  || python3 -m pip install -q --user -U --break-system-packages uv
[ -x ~/radar_jax_venv/bin/python ] \\
  || python3 -m uv venv -q --python $(printf %q "$PYVER") ~/radar_jax_venv
python3 -m uv pip install -q --python ~/radar_jax_venv/bin/python -e . $(printf %q "$JAX_REQ")
~/radar_jax_venv/bin/python -c 'import sys, radar_jax; print(\"python\", sys.version.split()[0])'"
}

# Hosts in the slice: one network endpoint per worker (1 when gcloud cannot say).
num_workers() {
  local ips
  ips=$(g compute tpus tpu-vm describe "$NAME" --format='value(networkEndpoints[].ipAddress)' \
    2>/dev/null) || ips=''
  local n; n=$(tr ';' '\n' <<<"$ips" | grep -c . || true); echo "$(( n > 0 ? n : 1 ))"
}

# The command each worker runs: prints the exact remote script (tests evaluate it with bash).
run_script() {
  local a q='' multi=()
  # A GCE TPU VM's login shell has no variable naming the slice's other workers, so main.py
  # is told (--multihost) to run jax.distributed.initialize(), which reads the TPU metadata.
  if [ "$(num_workers)" -gt 1 ] && ! printf '%s\n' "${RUN_ARGS[@]}" | grep -qx -e --multihost; then
    multi=(--multihost)
  fi
  for a in -m radar_jax.main "--workdir=$WORKDIR" ${multi[@]+"${multi[@]}"} "${RUN_ARGS[@]}"; do
    q+=" $(printf %q "$a")"
  done
  # setsid: the run gets its own process group, so `stop` signals python and its data workers;
  # the wrapper ignores SIGTERM itself (set after python starts) to record python's exit status.
  cat <<EOF
$REMOTE_PRELUDE
if alive; then echo "worker \$w: radar_jax already running"; exit 0; fi
cd ~/radar_jax && export PATH="\$HOME/radar_jax_venv/bin:\$PATH" && rm -f "\$d/worker-\$w.exit"
echo "=== \$(date -u +%FT%TZ) start on worker \$w" >> "\$d/worker-\$w.log"
setsid nohup bash -c 'python "\$@" & c=\$!; trap "" TERM; wait "\$c"; echo "\$?" > "\$0"' \\
  "\$d/worker-\$w.exit"$q >> "\$d/worker-\$w.log" 2>&1 < /dev/null &
echo \$! > "\$d/worker-\$w.pid"
echo "worker \$w: started, log \$d/worker-\$w.log"
EOF
}

run() {
  [ ${#RUN_ARGS[@]} -gt 0 ] || die "$NEED_ARGS"
  case $WORKDIR in
    gs://?*) ;;
    *) die "--workdir='$WORKDIR': use --workdir=gs://BUCKET/DIR, which every worker and every" \
      "re-created TPU sees (a local folder is lost with the VM)" ;;
  esac
  say "starting the run on every worker of $NAME"
  remote all "$(run_script)"
}

STATUS_SCRIPT="$REMOTE_PRELUDE"'
if [ -f "$d/worker-$w.exit" ]; then
  echo "radar_jax_status worker=$w exit=$(cat "$d/worker-$w.exit")"
elif alive; then echo "radar_jax_status worker=$w running"
else echo "radar_jax_status worker=$w none"; fi'

# One word for the whole run: running, done, restart (preempted or gone), failed=N, unknown.
run_state() {
  local out lines
  out=$(remote all "$STATUS_SCRIPT" 2>/dev/null) || true
  lines=$(grep '^radar_jax_status ' <<<"$out" || true)
  [ -n "$lines" ] || { echo unknown; return; }
  local bad
  bad=$(grep -o 'exit=[0-9]*' <<<"$lines" | grep -vx -e exit=0 -e "exit=$PREEMPTED_STATUS" \
    | head -n1 || true)
  if [ -n "$bad" ]; then echo "failed=${bad#exit=}"
  elif grep -q " none$\| exit=$PREEMPTED_STATUS$" <<<"$lines"; then echo restart
  elif grep -q " running$" <<<"$lines"; then echo running
  else echo 'done'; fi
}

stop_run() {
  remote all "$REMOTE_PRELUDE"'
if alive; then p=$(cat "$d/worker-$w.pid"); kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p"
  echo "worker $w: SIGTERM sent, waiting for the checkpoint"
  for _ in $(seq 3000); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  echo "worker $w: exit status $(cat "$d/worker-$w.exit" 2>/dev/null || echo unknown)"
else echo "worker $w: not running"; fi'
}

watch() {
  [ ${#RUN_ARGS[@]} -gt 0 ] || die "watch restarts the run: pass its flags after --"
  local restarts=0 s r last=''
  while :; do
    s=$(tpu_state)
    if [ "$s" = PREEMPTED ] || [ "$s" = NOT_FOUND ]; then
      r=recreate
    elif [ "$s" = READY ]; then
      r=$(run_state)
    else
      r="waiting ($s)"
    fi
    [ "$r" != "$last" ] && say "$NAME $s: run $r"; last=$r
    case $r in
      done) say "the run finished; outputs are in $WORKDIR"; return 0 ;;
      failed=*) say "the run failed with status ${r#failed=}: launch/tpu.sh logs --name=$NAME" \
        "--worker=all; stopping the other workers"; stop_run || true; return "${r#failed=}" ;;
      recreate|restart)
        restarts=$((restarts + 1))
        if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
          say "gave up after $MAX_RESTARTS restarts"; return 1
        fi
        say "restart $restarts of $MAX_RESTARTS; the run resumes from $WORKDIR"
        if [ "$r" = restart ]; then stop_run || true; else ensure_tpu; setup; fi
        run; last='' ;;
    esac
    sleep "$POLL"
  done
}

case $CMD in
  create) ensure_tpu ;;
  setup) setup ;;
  run) run ;;
  up)
    [ ${#RUN_ARGS[@]} -gt 0 ] || die "$NEED_ARGS"
    ensure_tpu
    if [ "$(run_state)" = running ]; then say "the run is already going on $NAME: watching it"
    else setup; run; fi
    watch ;;
  watch) watch ;;
  status) say "$NAME: $(tpu_state)"; remote all "$STATUS_SCRIPT" | grep '^radar_jax_status ' ;;
  logs) remote "$WORKER" 'tail -n 200 -F "$HOME"/radar_jax_logs/worker-*.log' ;;
  stop) stop_run ;;
  delete) delete_tpu ;;
esac
