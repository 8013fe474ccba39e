#!/usr/bin/env bash
# fishmerge production-like stack on one machine (loopback): `deployments/stack.sh up|down|status`.
#
#   up      start what is not running, wait (bounded) until each part is healthy, print the URLs as
#           `# ...` comment lines and the `export` lines a client needs on stdout (progress goes to
#           stderr), so `eval "$(deployments/stack.sh up)"` configures the current shell. Idempotent.
#   down    stop everything: SIGINT to the Prefect workers (they ignore SIGTERM), SIGTERM to the rest,
#           each by process group; SIGKILL after FISHMERGE_STACK_STOP_TIMEOUT seconds; then any
#           process left that carries this stack's marker (flow runs in their own sessions, orphans).
#           Data (Prefect DB, MLflow DB and artifacts) stays in the state dir for the next `up`.
#   status  one line per part (running/stopped, pid, address, log) and the export lines;
#           exit 0 when everything runs, 1 otherwise.
#
# Parts (each in its own process group; pid file and log under the state dir):
#   prefect-server        prefect server start (SQLite under $STATE/prefect, analytics off)
#   mlflow                mlflow server (SQLite backend, proxied artifacts under $STATE/mlflow)
#   dask-scheduler        dask scheduler (dashboard off unless FISHMERGE_DASK_DASHBOARD_PORT is set)
#   dask-worker-1..N      dask worker, 1 thread each, PREFECT_API_URL = this stack's server
#                         (without it every Dask worker would start a Prefect server of its own)
#   prefect-worker-cpu    prefect worker start --pool cpu (type process; runs flow runs as subprocesses)
#   prefect-worker-gpu    only with FISHMERGE_STACK_GPU_WORKER=1 (auto: when nvidia-smi sees a GPU)
# Work pools `cpu` and `gpu` (type process) are created if missing.
#
# Environment (all optional):
#   FISHMERGE_STACK_DIR            state dir (default <repo>/.fishmerge/stack)
#   FISHMERGE_STACK_HOST           bind/advertise address (default 127.0.0.1)
#   FISHMERGE_PREFECT_PORT         Prefect server port (default 4200)
#   FISHMERGE_MLFLOW_PORT          MLflow server port (default 5000)
#   FISHMERGE_MLFLOW_WORKERS       MLflow server worker processes (default 1)
#   FISHMERGE_MLFLOW_BACKEND_URI   MLflow backend store (default sqlite:///$STATE/mlflow/mlflow.db)
#   FISHMERGE_MLFLOW_ARTIFACTS     MLflow artifacts destination (default $STATE/mlflow/artifacts)
#   FISHMERGE_DASK_PORT            Dask scheduler port (default 8786)
#   FISHMERGE_DASK_DASHBOARD_PORT  Dask dashboard port (default: dashboard off)
#   FISHMERGE_DASK_WORKERS         number of Dask workers (default 2)
#   FISHMERGE_STACK_GPU_WORKER     0 | 1 | auto (default auto): also run a Prefect worker on pool gpu here
#   FISHMERGE_HOME                 repo checkout the flow runs work in (default: this repo); prefect.yaml's
#                                  pull step changes into it
#   FISHMERGE_STACK_TIMEOUT        seconds `up` waits for all parts to be healthy (default 120)
#   FISHMERGE_STACK_STOP_TIMEOUT   seconds `down` waits before SIGKILL (default 15)
#   Any PREFECT_* / MLFLOW_* setting passes through (e.g. PREFECT_SERVER_DATABASE_CONNECTION_URL for
#   Postgres, PREFECT_WORKER_QUERY_SECONDS for the workers' polling interval).
# Executables come from <repo>/.venv/bin when present, else from PATH. Linux (uses /proc, setsid, flock).
#
# Multi-machine mapping (the same commands, one part per host; see deployments/README.md):
#   * Prefect server: one host, `prefect server start --host 0.0.0.0` with
#     PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://... ; clients and workers set
#     PREFECT_API_URL=http://<prefect-host>:4200/api. Register deployments with `prefect deploy --all`.
#   * CPU hosts: `prefect worker start --pool cpu`; GPU hosts: `prefect worker start --pool gpu`
#     (PREFECT_API_URL set, a checkout of this repo at FISHMERGE_HOME, the same venv).
#     `prefect concurrency-limit create fisher-gpu N` caps concurrent GPU shard tasks.
#   * Dask: `dask scheduler` on one host, `dask worker tcp://<scheduler>:8786 --nthreads 1` on each
#     compute host with PREFECT_API_URL set; flows get FISHMERGE_DASK_ADDRESS=tcp://<scheduler>:8786.
#   * MLflow: `mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://bucket/mlflow`
#     (FISHMERGE_MLFLOW_BACKEND_URI / FISHMERGE_MLFLOW_ARTIFACTS here); clients set MLFLOW_TRACKING_URI.
#   * Fisher store: `--store-root s3://bucket/fishers` (store_root parameter) with AWS_ACCESS_KEY_ID,
#     AWS_SECRET_ACCESS_KEY (and FISHMERGE_S3_ENDPOINT_URL for MinIO) on every worker host.
set -euo pipefail

case "${1:-}" in
up | down | status) ;;
*)
	echo "usage: $0 up|down|status   (environment: see the comment block at the top of this script)" >&2
	exit 2
	;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
mkdir -p "${FISHMERGE_STACK_DIR:-$ROOT/.fishmerge/stack}"
STATE="$(cd "${FISHMERGE_STACK_DIR:-$ROOT/.fishmerge/stack}" && pwd -P)"
MARKER="FISHMERGE_STACK_MEMBER=$STATE" # every stack process carries it (inherited by its children)
RUN="$STATE/run"
LOGS="$STATE/logs"
SAVED="$STATE/stack.env"

HOST="${FISHMERGE_STACK_HOST:-127.0.0.1}"
PREFECT_PORT="${FISHMERGE_PREFECT_PORT:-4200}"
MLFLOW_PORT="${FISHMERGE_MLFLOW_PORT:-5000}"
DASK_PORT="${FISHMERGE_DASK_PORT:-8786}"
DASK_DASHBOARD_PORT="${FISHMERGE_DASK_DASHBOARD_PORT:-}"
DASK_WORKERS="${FISHMERGE_DASK_WORKERS:-2}"
GPU_WORKER="${FISHMERGE_STACK_GPU_WORKER:-auto}"
TIMEOUT="${FISHMERGE_STACK_TIMEOUT:-120}"
STOP_TIMEOUT="${FISHMERGE_STACK_STOP_TIMEOUT:-15}"

say() { echo "stack: [${SECONDS}s] $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

bin() { # the venv's executable, else PATH's
	if [[ -x "$ROOT/.venv/bin/$1" ]]; then echo "$ROOT/.venv/bin/$1"; else command -v "$1" || die "$1 not found (make install)"; fi
}

load_saved() { # a running stack keeps the ports it was started with
	[[ -f "$SAVED" ]] || return 0
	# shellcheck disable=SC1090
	source "$SAVED"
}

urls() {
	PREFECT_URL="http://$HOST:$PREFECT_PORT"
	API_URL="$PREFECT_URL/api"
	MLFLOW_URL="http://$HOST:$MLFLOW_PORT"
	DASK_ADDRESS="tcp://$HOST:$DASK_PORT"
}

services() { # every part, in start order
	echo prefect-server mlflow dask-scheduler
	for ((i = 1; i <= DASK_WORKERS; i++)); do echo "dask-worker-$i"; done
	echo prefect-worker-cpu
	[[ -f "$RUN/prefect-worker-gpu.pid" ]] || gpu_wanted && echo prefect-worker-gpu
	return 0
}

gpu_wanted() {
	case "$GPU_WORKER" in
	1 | true | yes) return 0 ;;
	auto) command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 ;;
	*) return 1 ;;
	esac
}

pgid_of() { [[ -f "$RUN/$1.pid" ]] && cat "$RUN/$1.pid"; }

is_member() { grep -qzxF "$MARKER" "/proc/$1/environ" 2>/dev/null; }

alive() { # some process of the part's group still runs and belongs to this stack
	local g p
	g="$(pgid_of "$1")" || return 1
	[[ -n "$g" ]] || return 1
	for p in $(pgrep -g "$g" 2>/dev/null); do
		is_member "$p" && return 0
	done
	return 1
}

members() { # every process carrying this stack's marker, except this script
	grep -lzxF "$MARKER" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx -e "$$" -e "${BASHPID:-$$}" || true
}

LAUNCHER='import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
os.execvp(sys.argv[2], sys.argv[2:])'

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

launch() { # NAME PORT|- CMD...: start CMD in its own session unless the part already runs
	local name=$1 port=$2
	shift 2
	if alive "$name"; then
		say "$name already running (pid $(pgid_of "$name"))"
		return 0
	fi
	if [[ "$port" != - ]] && port_busy "$port"; then
		die "$name: port $port on $HOST is already in use by another program; pick another (see the env vars at the top of $0)"
	fi
	rm -f "$RUN/$name.pid"
	echo "=== $(date -u +%FT%TZ) $*" >>"$LOGS/$name.log"
	# setsid: a new session and process group. The launcher records its pid (= the group id) and execs
	# the part with SIGINT back at its default: bash starts background jobs with SIGINT ignored, and a
	# Prefect worker with SIGINT ignored cannot be stopped at all (it ignores SIGTERM too).
	setsid env "$MARKER" "$(bin python)" -c "$LAUNCHER" "$RUN/$name.pid" "$@" </dev/null >>"$LOGS/$name.log" 2>&1 9>&- &
	local t=0
	until [[ -s "$RUN/$name.pid" ]]; do
		((t++ < 100)) || die "$name did not start"
		sleep 0.05
	done
	say "$name started (pid $(pgid_of "$name"), log $LOGS/$name.log)"
}

wait_healthy() { # NAME CHECK...: poll CHECK until it succeeds, the part dies, or the deadline passes
	local name=$1
	shift
	until "$@" >/dev/null 2>&1; do
		if ! alive "$name"; then
			say "$name exited during start-up; last log lines:"
			tail -n 25 "$LOGS/$name.log" >&2 || true
			die "$name failed; run '$0 down' to stop the rest"
		fi
		if ((SECONDS >= DEADLINE)); then
			tail -n 25 "$LOGS/$name.log" >&2 || true
			die "$name not healthy after ${TIMEOUT}s; run '$0 down' to stop the rest"
		fi
		sleep 0.5
	done
	say "$name healthy"
}

http_ok() { curl -fsS --max-time 2 "$1"; }
logged() { # NAME TEXT: TEXT is in the part's log since its last start (no pipes: pipefail + SIGPIPE)
	awk -v t="$2" '/^=== /{f=0} index($0, t){f=1} END{exit !f}' "$LOGS/$1.log"
}
worker_online() { # POOL NAME: a Prefect worker of that name has sent a heartbeat for the pool
	local workers
	workers="$(curl -fsS --max-time 2 -X POST -H 'Content-Type: application/json' -d '{}' "$API_URL/work_pools/$1/workers/filter")"
	[[ "$workers" == *"\"name\":\"$2\""* ]]
}
worker_ready() { logged "prefect-worker-$1" "started!" && worker_online "$1" "$2"; } # POOL NAME

create_pools() { # POOL...: those missing, in one Python process (idempotent)
	local missing=() pool
	for pool in "$@"; do
		http_ok "$API_URL/work_pools/$pool" >/dev/null 2>&1 || missing+=("$pool")
	done
	((${#missing[@]})) || return 0
	"$(bin python)" - "${missing[@]}" <<'PY'
import asyncio
import sys

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.workers.process import ProcessWorker


async def main(names: list[str]) -> None:
    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        for name in names:
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
                print(f"stack: work pool {name} created", file=sys.stderr)
            except ObjectAlreadyExists:
                pass


asyncio.run(main(sys.argv[1:]))
PY
}

print_env() {
	echo "# Prefect UI  $PREFECT_URL   (API $API_URL)"
	echo "# MLflow      $MLFLOW_URL"
	echo "# Dask        $DASK_ADDRESS   ($DASK_WORKERS workers)"
	echo "# state       $STATE   (logs in $LOGS)"
	echo "export PREFECT_API_URL=$API_URL"
	echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
	echo "export FISHMERGE_DASK_ADDRESS=$DASK_ADDRESS"
}

cmd_up() {
	mkdir -p "$RUN" "$LOGS" "$STATE/prefect" "$STATE/mlflow/artifacts" "$STATE/dask"
	local name any=0
	for name in $(services); do alive "$name" && any=1; done
	if ((any)); then
		local want="$HOST:$PREFECT_PORT:$MLFLOW_PORT:$DASK_PORT:$DASK_WORKERS"
		load_saved
		[[ "$want" == "$HOST:$PREFECT_PORT:$MLFLOW_PORT:$DASK_PORT:$DASK_WORKERS" ]] ||
			say "the stack already runs with the addresses below; '$0 down' first to change them"
	fi
	urls
	cat >"$SAVED" <<EOF
HOST=$HOST
PREFECT_PORT=$PREFECT_PORT
MLFLOW_PORT=$MLFLOW_PORT
DASK_PORT=$DASK_PORT
DASK_WORKERS=$DASK_WORKERS
EOF
	DEADLINE=$((SECONDS + TIMEOUT))

	# Settings every part shares: one Prefect API, its own PREFECT_HOME (never the user's), analytics off.
	export PREFECT_HOME="$STATE/prefect" PREFECT_API_URL="$API_URL" PREFECT_SERVER_ANALYTICS_ENABLED=false
	export MLFLOW_TRACKING_URI="$MLFLOW_URL" FISHMERGE_DASK_ADDRESS="$DASK_ADDRESS"
	export FISHMERGE_HOME="${FISHMERGE_HOME:-$ROOT}"
	cd "$FISHMERGE_HOME" || die "FISHMERGE_HOME=$FISHMERGE_HOME is not a directory"

	# A port taken by another program is an error before anything starts.
	local part_port
	for part_port in prefect-server:"$PREFECT_PORT" mlflow:"$MLFLOW_PORT" dask-scheduler:"$DASK_PORT"; do
		name="${part_port%%:*}"
		alive "$name" || ! port_busy "${part_port#*:}" ||
			die "$name: port ${part_port#*:} on $HOST is in use by another program; pick another (FISHMERGE_*_PORT, see the top of $0)"
	done

	# Everything that does not need the Prefect server starts at once.
	launch prefect-server "$PREFECT_PORT" "$(bin prefect)" server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off
	launch mlflow "$MLFLOW_PORT" env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$(bin mlflow)" server \
		--host "$HOST" --port "$MLFLOW_PORT" --workers "${FISHMERGE_MLFLOW_WORKERS:-1}" \
		--backend-store-uri "${FISHMERGE_MLFLOW_BACKEND_URI:-sqlite:///$STATE/mlflow/mlflow.db}" \
		--artifacts-destination "${FISHMERGE_MLFLOW_ARTIFACTS:-$STATE/mlflow/artifacts}"
	local dashboard=(--no-dashboard)
	[[ -n "$DASK_DASHBOARD_PORT" ]] && dashboard=(--dashboard-address "$HOST:$DASK_DASHBOARD_PORT")
	launch dask-scheduler "$DASK_PORT" "$(bin dask)" scheduler --host "$HOST" --port "$DASK_PORT" "${dashboard[@]}"
	for ((i = 1; i <= DASK_WORKERS; i++)); do
		launch "dask-worker-$i" - "$(bin dask)" worker "$DASK_ADDRESS" --host "$HOST" --nthreads 1 \
			--name "fishmerge-$i" --no-dashboard --local-directory "$STATE/dask/worker-$i"
	done

	# Work pools need the server; the Prefect workers need the pools.
	# A Prefect worker creates its own pool when missing; the other pools are created meanwhile.
	wait_healthy prefect-server http_ok "$API_URL/health"
	local pools=(cpu) others=(gpu) pool creating
	if gpu_wanted || [[ -f "$RUN/prefect-worker-gpu.pid" ]]; then pools+=(gpu) others=(); fi
	create_pools "${others[@]}" 9>&- &
	creating=$!
	for pool in "${pools[@]}"; do
		launch "prefect-worker-$pool" - "$(bin prefect)" worker start --pool "$pool" --type process \
			--name "fishmerge-$pool-$(hostname)"
	done

	wait_healthy mlflow http_ok "$MLFLOW_URL/health"
	wait_healthy dask-scheduler logged dask-scheduler "Scheduler at:"
	for ((i = 1; i <= DASK_WORKERS; i++)); do wait_healthy "dask-worker-$i" logged "dask-worker-$i" "Registered to:"; done
	for pool in "${pools[@]}"; do
		wait_healthy "prefect-worker-$pool" worker_ready "$pool" "fishmerge-$pool-$(hostname)"
	done
	wait "$creating" || die "could not create the work pools ${others[*]}"
	say "up: all parts healthy"
	print_env
}

cmd_down() {
	load_saved # the number of Dask workers it was started with
	local name g stopping=() p
	for name in $(services); do
		alive "$name" || continue
		g="$(pgid_of "$name")"
		case "$name" in
		prefect-worker-*) kill -INT -- "-$g" 2>/dev/null || true ;; # a Prefect worker ignores SIGTERM
		*) kill -TERM -- "-$g" 2>/dev/null || true ;;
		esac
		stopping+=("$name")
	done
	local deadline=$((SECONDS + STOP_TIMEOUT)) waiting
	while ((${#stopping[@]})); do
		waiting=()
		for name in "${stopping[@]}"; do
			if alive "$name"; then waiting+=("$name"); else say "$name stopped"; fi
		done
		stopping=("${waiting[@]}")
		((${#stopping[@]})) || break
		if ((SECONDS >= deadline)); then
			for name in "${stopping[@]}"; do
				say "$name did not stop within ${STOP_TIMEOUT}s: SIGKILL"
				kill -KILL -- "-$(pgid_of "$name")" 2>/dev/null || true
			done
			break
		fi
		sleep 0.2
	done
	# Whatever is left (flow runs in their own sessions, orphans): SIGTERM, a short wait, SIGKILL.
	local rest
	rest="$(members)"
	if [[ -n "$rest" ]]; then
		say "stopping leftover processes: $(echo "$rest" | tr '\n' ' ')"
		for p in $rest; do kill -TERM "$p" 2>/dev/null || true; done
		for _ in $(seq 25); do
			[[ -n "$(members)" ]] || break
			sleep 0.2
		done
		for p in $(members); do kill -KILL "$p" 2>/dev/null || true; done
		sleep 0.2
	fi
	rest="$(members)"
	[[ -z "$rest" ]] || die "processes still running: $rest"
	rm -f "$RUN"/*.pid
	say "down"
}

cmd_status() {
	load_saved
	urls
	local name all=1 where
	for name in $(services); do
		case "$name" in
		prefect-server) where="$PREFECT_URL" ;;
		mlflow) where="$MLFLOW_URL" ;;
		dask-scheduler) where="$DASK_ADDRESS" ;;
		dask-worker-*) where="-> $DASK_ADDRESS" ;;
		prefect-worker-*) where="pool ${name#prefect-worker-}" ;;
		esac
		if alive "$name"; then
			printf '# %-20s running  pid %-8s %s\n' "$name" "$(pgid_of "$name")" "$where"
		else
			printf '# %-20s stopped\n' "$name"
			all=0
		fi
	done
	((all)) && print_env
	((all))
}

# One `up` or `down` at a time per state dir (the parts never inherit the lock: fd 9 is closed for them).
if [[ "$1" != status ]]; then
	exec 9>"$STATE/.lock"
	flock -w "$((TIMEOUT + STOP_TIMEOUT))" 9 || die "another '$0 up/down' holds $STATE/.lock"
fi
case "$1" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
esac
