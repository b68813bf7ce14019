#!/usr/bin/env bash
# A three-node RabbitMQ cluster on loopback, for tests of enclave replicas and broker faults.
#
#   deploy/cluster.sh start          # start (or leave running) and print the AMQP URLs
#   deploy/cluster.sh status         # each node: running or not, and the cluster it sees
#   deploy/cluster.sh urls           # the comma-separated URLs (SEALEDSUM_CLUSTER_URLS)
#   deploy/cluster.sh stop [--wipe]  # stop the three nodes; --wipe also deletes their data
#   deploy/cluster.sh stop-node N    # stop node N (1..3), the others keep running
#   deploy/cluster.sh start-node N   # start node N again: it rejoins the cluster it was in
#   deploy/cluster.sh running N      # exit 0 if node N's rabbit application runs
#   deploy/cluster.sh name N         # node N's Erlang node name
#   deploy/cluster.sh ctl N ARGS...  # rabbitmqctl ARGS against node N, with the cluster's cookie
#
# The nodes are separate from the machine's default RabbitMQ node (rabbit@localhost on
# 5672), which this script never talks to: their own node names (sealedsum-N@localhost),
# AMQP ports (5681-5683 on 127.0.0.1), Erlang distribution ports (25681-25683), data, log
# and config directories under $SEALEDSUM_CLUSTER_DIR (default /tmp/sealedsum-cluster),
# their own enabled_plugins file (rabbitmq_consistent_hash_exchange; no management
# listener) and their own Erlang cookie. The cookie is kept in $SEALEDSUM_CLUSTER_DIR/cookie
# and handed to the nodes and to rabbitmqctl as `-setcookie` (RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS,
# RABBITMQ_CTL_ERL_ARGS), and as the .erlang.cookie of the private HOME they run with
# ($SEALEDSUM_CLUSTER_DIR/home): the caller's ~/.erlang.cookie, which rabbitmqctl may use for
# the default node, is neither read nor written. /etc/rabbitmq/rabbitmq-env.conf is not read either (each node
# has its own RABBITMQ_CONF_ENV_FILE). guest/guest may log in from loopback (the default).
#
# Environment overrides:
#   SEALEDSUM_CLUSTER_DIR        base directory (default /tmp/sealedsum-cluster)
#   SEALEDSUM_CLUSTER_AMQP_PORTS three AMQP ports (default "5681 5682 5683")
#   SEALEDSUM_CLUSTER_DIST_PORTS three Erlang distribution ports (default "25681 25682 25683")
#   SEALEDSUM_CLUSTER_NODE_PREFIX node names are PREFIX-N@HOST (default sealedsum)
#   SEALEDSUM_CLUSTER_HOST       the node names' host part (default localhost)
#   SEALEDSUM_CLUSTER_TIMEOUT    seconds a node may take to boot (default 90)
#   RABBITMQ_BIN_DIR             where rabbitmq-server and rabbitmqctl are (default: the
#                                package's /usr/lib/rabbitmq/bin, else $PATH; Debian's
#                                /usr/sbin wrappers would run them as the rabbitmq user)
#
# start is idempotent: a running three-node cluster is left alone; a node that is down is
# started; a node that is up but outside node 1's cluster is reset and joined to it; and if
# the three still do not form one cluster, their data is wiped and they start afresh.
set -euo pipefail

BASE="${SEALEDSUM_CLUSTER_DIR:-/tmp/sealedsum-cluster}"
read -r -a AMQP_PORTS <<<"${SEALEDSUM_CLUSTER_AMQP_PORTS:-5681 5682 5683}"
read -r -a DIST_PORTS <<<"${SEALEDSUM_CLUSTER_DIST_PORTS:-25681 25682 25683}"
PREFIX="${SEALEDSUM_CLUSTER_NODE_PREFIX:-sealedsum}"
HOST="${SEALEDSUM_CLUSTER_HOST:-localhost}"
BOOT_TIMEOUT="${SEALEDSUM_CLUSTER_TIMEOUT:-90}"
NODES=(1 2 3)
# rabbitmqctl's own distribution ports, away from the range the default node's CLI uses (35672-35682).
CTL_PORT_MIN="${SEALEDSUM_CLUSTER_CTL_PORT_MIN:-35700}"

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

[ "${#AMQP_PORTS[@]}" -eq 3 ] || die "SEALEDSUM_CLUSTER_AMQP_PORTS must hold three ports"
[ "${#DIST_PORTS[@]}" -eq 3 ] || die "SEALEDSUM_CLUSTER_DIST_PORTS must hold three ports"

if [ -n "${RABBITMQ_BIN_DIR:-}" ]; then
  BIN="$RABBITMQ_BIN_DIR"
elif [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  BIN=/usr/lib/rabbitmq/bin
else
  BIN="$(dirname "$(command -v rabbitmq-server || die "rabbitmq-server is not installed")")"
fi

node_name() { echo "${PREFIX}-$1@${HOST}"; }
node_dir() { echo "$BASE/node$1"; }
amqp_port() { echo "${AMQP_PORTS[$(($1 - 1))]}"; }
dist_port() { echo "${DIST_PORTS[$(($1 - 1))]}"; }
url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2F"; }
urls() { local IFS=,; echo "$(url 1),$(url 2),$(url 3)"; }

check_n() {
  case "${1:-}" in 1|2|3) ;; *) die "node number must be 1, 2 or 3, not '${1:-}'" ;; esac
}

# The cluster's Erlang cookie, made on first use. It is also the .erlang.cookie of the
# private HOME the nodes and rabbitmqctl run with: an Erlang node reads (and, when it is
# missing, creates) $HOME/.erlang.cookie at boot even when -setcookie is given, and the
# caller's ~/.erlang.cookie is not this script's to create.
cookie() {
  if [ ! -s "$BASE/cookie" ]; then
    mkdir -p "$BASE"
    (umask 077; head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F' >"$BASE/cookie.tmp")
    mv "$BASE/cookie.tmp" "$BASE/cookie"
  fi
  if ! cmp -s "$BASE/cookie" "$BASE/home/.erlang.cookie" 2>/dev/null; then
    mkdir -p "$BASE/home"
    chmod 0700 "$BASE/home"
    rm -f "$BASE/home/.erlang.cookie"
    (umask 077; cp "$BASE/cookie" "$BASE/home/.erlang.cookie")
    chmod 0400 "$BASE/home/.erlang.cookie"
  fi
  cat "$BASE/cookie"
}

# The environment rabbitmq-server and rabbitmqctl see for node N (both read rabbitmq-env).
node_env() {
  local n="$1" dir
  dir="$(node_dir "$n")"
  export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
  export RABBITMQ_NODENAME="$(node_name "$n")"
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$(amqp_port "$n")"
  export RABBITMQ_DIST_PORT="$(dist_port "$n")"
  export RABBITMQ_MNESIA_BASE="$dir/mnesia"
  export RABBITMQ_LOG_BASE="$dir/log"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
  export RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
  local c
  c="$(cookie)"
  export HOME="$BASE/home"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-setcookie $c -kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-setcookie $c"
  export RABBITMQ_CTL_DIST_PORT_MIN="$CTL_PORT_MIN"
  export RABBITMQ_CTL_DIST_PORT_MAX="$((CTL_PORT_MIN + 30))"
  export ERL_EPMD_ADDRESS=127.0.0.1
  unset RABBITMQ_ERLANG_COOKIE ERL_FLAGS ERL_AFLAGS ERL_ZFLAGS
}

write_node_files() {
  local n="$1" dir
  dir="$(node_dir "$n")"
  mkdir -p "$dir/mnesia" "$dir/log"
  # Replaces /etc/rabbitmq/rabbitmq-env.conf (the default node's): everything is in the environment.
  echo "# sealedsum cluster node $n: settings come from deploy/cluster.sh's environment" >"$dir/rabbitmq-env.conf"
  cat >"$dir/rabbitmq.conf" <<EOF
# Written by deploy/cluster.sh for $(node_name "$n"). The AMQP listener (127.0.0.1:$(amqp_port "$n"))
# and the distribution port ($(dist_port "$n")) come from RABBITMQ_NODE_IP_ADDRESS/_PORT and RABBITMQ_DIST_PORT.
cluster_name = ${PREFIX}-cluster
loopback_users.guest = true
log.console = false
log.file.level = info
EOF
  echo "[]." >"$dir/advanced.config"
  echo "[rabbitmq_consistent_hash_exchange]." >"$dir/enabled_plugins"
}

ctl() {  # ctl N ARGS...: rabbitmqctl against node N
  local n="$1"; shift
  (node_env "$n"; cd "$(node_dir "$n")" 2>/dev/null || cd /; exec "$BIN/rabbitmqctl" -n "$(node_name "$n")" "$@")
}

# The pid of node N's Erlang VM (or, while it boots, of the rabbitmq-server script that runs
# it), if it runs: checked against the node name, so that a recycled pid, or the default
# node, is never taken for it.
node_pid() {
  local n="$1" pid file
  for file in "$(node_dir "$n")/rabbitmq.pid" "$(node_dir "$n")/launch.pid"; do
    pid="$(cat "$file" 2>/dev/null || true)"
    # 3.10 names the node at boot, not on the command line: its environment tells.
    if [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] \
        && { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "RABBITMQ_NODENAME=$(node_name "$n")"; then
      echo "$pid"; return 0
    fi
  done
  return 1
}

# The rabbit application runs on node N.
node_running() {
  node_pid "$1" >/dev/null || return 1
  ctl "$1" -q -t 10 eval 'rabbit:is_running().' 2>/dev/null | grep -qx true
}

# The running nodes node N reports, one per line.
running_nodes() {
  ctl "$1" -q -t 10 cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
try:
    doc = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
print("\n".join(sorted(doc.get("running_nodes", []))))'
}

clustered() {  # all three nodes run and each reports the same three running nodes
  local want n
  want="$(printf '%s\n' "$(node_name 1)" "$(node_name 2)" "$(node_name 3)" | sort)"
  for n in "${NODES[@]}"; do
    [ "$(running_nodes "$n" || true)" = "$want" ] || return 1
  done
}

launch() {  # start node N's VM in the background, detached from this shell
  local n="$1" dir
  dir="$(node_dir "$n")"
  write_node_files "$n"
  rm -f "$dir/rabbitmq.pid" "$dir/launch.pid"
  (
    node_env "$n"
    cd "$dir"
    # 9>&-: the node must not inherit (and so hold) the lock of the cluster.sh that started it.
    setsid nohup "$BIN/rabbitmq-server" >>"$dir/stdout.log" 2>&1 </dev/null 9>&- &
    echo $! >"$dir/launch.pid"
  )
}

await_boot() {  # wait until node N's rabbit app runs; fail if its VM exits
  local n="$1" deadline=$((SECONDS + BOOT_TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if ! node_pid "$n" >/dev/null; then
      sleep 1
      node_pid "$n" >/dev/null || { say "node $n exited while booting; its output:"; tail -n 20 "$(node_dir "$n")/stdout.log" >&2; return 1; }
    fi
    node_running "$n" && return 0
    sleep 1
  done
  say "node $n did not boot within $BOOT_TIMEOUT s; see $(node_dir "$n")/log"
  return 1
}

stop_one() {  # stop node N gracefully, then by its (checked) pid
  local n="$1" pid deadline
  pid="$(node_pid "$n")" || { rm -f "$(node_dir "$n")/rabbitmq.pid" "$(node_dir "$n")/launch.pid"; return 0; }
  ctl "$n" -q -t 30 stop >/dev/null 2>&1 || true
  deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    say "node $n did not stop; sending SIGTERM to pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    sleep 5
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid" 2>/dev/null || true; sleep 1; }
  fi
  rm -f "$(node_dir "$n")/rabbitmq.pid" "$(node_dir "$n")/launch.pid"
}

port_taken_by_other() {  # the AMQP or distribution port of node N is held by something else
  local n="$1" p
  node_pid "$n" >/dev/null && return 1
  for p in "$(amqp_port "$n")" "$(dist_port "$n")"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      say "port $p (node $n) is taken by another process"; return 0
    fi
  done
  return 1
}

join_to_first() {  # reset node N and join it to node 1's cluster
  local n="$1" out
  out="$(node_dir "$n")/join.log"
  say "joining node $n to $(node_name 1)"
  # The CLI prints the joining node's boot warnings (feature flags...): kept in join.log.
  if ! { ctl "$n" -q stop_app \
         && { ctl "$n" -q reset || ctl "$n" -q force_reset; } \
         && ctl "$n" -q join_cluster "$(node_name 1)" \
         && ctl "$n" -q start_app; } >"$out" 2>&1; then
    say "node $n did not join:"; tail -n 20 "$out" >&2
    return 1
  fi
}

in_first_cluster() {  # node 1 counts node N among its cluster's disc nodes
  ctl 1 -q -t 10 cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
doc = json.load(sys.stdin)
sys.exit(0 if sys.argv[1] in doc.get("disk_nodes", []) + doc.get("ram_nodes", []) else 1)' "$(node_name "$1")"
}

await_clustered() {
  local deadline=$((SECONDS + ${1:-30}))
  while [ $SECONDS -lt $deadline ]; do
    clustered && return 0
    sleep 1
  done
  return 1
}

form() {  # one attempt: boot what is down, join what is outside, wait for three running nodes
  local n pid ok=0 pids=()
  for n in "${NODES[@]}"; do
    if ! node_pid "$n" >/dev/null; then
      port_taken_by_other "$n" && return 1
      # Booting them together matters: a node that was not the last of its cluster to stop
      # waits at boot for the others.
      launch "$n"
    fi
  done
  for n in "${NODES[@]}"; do await_boot "$n" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || ok=1; done
  [ "$ok" -eq 0 ] || return 1
  for n in 2 3; do
    in_first_cluster "$n" || join_to_first "$n" || return 1
  done
  await_clustered 30
}

start() {
  mkdir -p "$BASE"
  if clustered; then
    say "the cluster is running already"
  elif ! form; then
    say "the nodes did not form one cluster; wiping $BASE and starting afresh"
    for n in 3 2 1; do stop_one "$n"; done
    wipe
    form || die "the cluster did not start; see $BASE/node*/stdout.log and $BASE/node*/log"
  fi
  for n in "${NODES[@]}"; do echo "$(node_name "$n") $(url "$n")"; done
  echo "SEALEDSUM_CLUSTER_URLS=$(urls)"
}

wipe() {
  local n
  for n in "${NODES[@]}"; do rm -rf "$(node_dir "$n")"; done
}

stop() {
  local n
  for n in 3 2 1; do stop_one "$n"; done  # node 1 last: it boots first next time anyway
  if [ "${1:-}" = "--wipe" ]; then
    wipe
    rm -rf "$BASE/home" "$BASE/cookie" "$BASE/.lock"
    rmdir "$BASE" 2>/dev/null || true
  elif [ -n "${1:-}" ]; then
    die "stop takes only --wipe"
  fi
}

status() {
  local n rc=0 nodes
  for n in "${NODES[@]}"; do
    if node_running "$n"; then
      nodes="$(running_nodes "$n" | tr '\n' ' ')"
      echo "node $n $(node_name "$n") $(url "$n") running; running nodes: ${nodes% }"
    else
      echo "node $n $(node_name "$n") $(url "$n") not running"; rc=1
    fi
  done
  clustered || rc=1
  return $rc
}

locked() {  # run "$@" holding the cluster's lock (one start/stop at a time)
  mkdir -p "$BASE"
  exec 9>"$BASE/.lock"
  flock -w 300 9 || die "another cluster.sh holds $BASE/.lock"
  "$@"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  start) locked start ;;
  stop) locked stop "$@" ;;
  status) status ;;
  urls) urls ;;
  stop-node) check_n "${1:-}"; locked stop_one "$1" ;;
  start-node)
    check_n "${1:-}"
    n="$1"
    start_node() {
      if ! node_running "$n"; then
        node_pid "$n" >/dev/null || { port_taken_by_other "$n" && die "node $n cannot start"; launch "$n"; }
        await_boot "$n" || die "node $n did not start"
      fi
      await_clustered 60 || die "node $n runs but is not back in the three-node cluster"
    }
    locked start_node ;;
  running) check_n "${1:-}"; node_running "$1" ;;
  name) check_n "${1:-}"; node_name "$1" ;;
  ctl) check_n "${1:-}"; n="$1"; shift; ctl "$n" "$@" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
