#!/usr/bin/env bash
# A SLURM cluster of several nodes on this one machine, for the multi-node launcher tests.
#
#   tests/start_cluster.sh up [NODES]   # default 2 nodes; prints the SLURM_CONF to use
#   tests/start_cluster.sh node N       # (re)starts node N's slurmd, e.g. after the node was killed
#   tests/start_cluster.sh down         # removes everything `up` made
#
# Each node is a network namespace (dsv3n1, dsv3n2, ...) with its own hostname (a UTS namespace)
# and address (10.217.0.11, .12, ...), joined by veth pairs to a bridge in a controller namespace
# (dsv3ctl, 10.217.0.1) that runs slurmctld and is where jobs are submitted from (the login node).
# Every node runs its own slurmd; munge is shared. Nothing is added to the machine's own network:
# the bridge, its addresses and every daemon live in namespaces this script made, and all traffic
# stays between them. Node names resolve through /etc/netns/<namespace>/hosts, which `ip netns exec`
# mounts over /etc/hosts inside the namespace. The cluster's files are under $DSV3_CLUSTER_DIR
# (default /run/dsv3-cluster): slurm.conf, state, logs. Ports do not clash with a SLURM already
# running on the machine (tests/start_slurm.sh), which is left alone.
#
# `up` needs root; it installs Debian's slurm-wlm and munge if they are missing (apt-get), starts
# munged only if none runs, and is idempotent. `down` kills only the processes inside the cluster's
# namespaces (and the munged `up` started), deletes the namespaces (their veths and bridge go with
# them), /etc/netns entries and the state directory. Exits non-zero with a sentence on stderr when
# the cluster cannot be set up here.
set -euo pipefail

DIR=${DSV3_CLUSTER_DIR:-/run/dsv3-cluster}
NET=10.217.0
CTL=dsv3ctl
CONF=$DIR/slurm.conf
action=${1:-up}
nodes=${2:-2}

namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^(${CTL}|dsv3n[0-9]+)$" || true; }

down() {
  local ns pids pid
  for ns in $(namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then kill -TERM $pids 2>/dev/null || true; fi
  done
  for _ in $(seq 50); do
    pids=""
    for ns in $(namespaces); do pids="$pids $(ip netns pids "$ns" 2>/dev/null || true)"; done
    [ -z "${pids// /}" ] && break
    sleep 0.1
  done
  for ns in $(namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
    ip netns del "$ns"
    rm -rf "/etc/netns/$ns"
  done
  if [ -f "$DIR/created-etc-netns" ]; then rmdir /etc/netns 2>/dev/null || true; fi
  # The munged and key `up` made, unless the machine's own SLURM (tests/start_slurm.sh) now uses them.
  if ! { [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; }; then
    if [ -f "$DIR/munged.pid" ]; then
      pid=$(cat "$DIR/munged.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    if [ -f "$DIR/created-munge-key" ]; then rm -f /etc/munge/munge.key; fi
  fi
  rm -rf "$DIR"
}

# A daemon in namespace $1 with hostname $1 and that namespace's /etc/hosts. (Not `ip netns exec`,
# which mounts a fresh /sys and so hides the cgroup hierarchy slurmd reads.)
daemon() {
  local ns=$1
  shift
  nsenter --net="/run/netns/$ns" unshare --mount --uts sh -c \
    "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $ns && exec $*"
}
start_node() { daemon "dsv3n$1" /usr/sbin/slurmd -f "'$CONF'"; }

if [ "$action" = down ]; then
  down
  exit 0
fi
if [ "$action" = node ]; then
  start_node "$nodes"
  exit 0
fi
if [ "$action" != up ] || ! [[ "$nodes" =~ ^[0-9]+$ ]] || [ "$nodes" -lt 2 ] || [ "$nodes" -gt 8 ]; then
  echo "usage: tests/start_cluster.sh up [NODES: 2..8] | down" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "A namespaced SLURM cluster needs root (network and UTS namespaces)." >&2
  exit 1
fi
if [ -f "$CONF" ] && [ "$(ip netns exec "$CTL" env SLURM_CONF="$CONF" sinfo -h -o %D -t idle,mix,alloc 2>/dev/null)" = "$nodes" ]; then
  echo "$CONF"
  exit 0
fi
down  # whatever a previous run left behind
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "SLURM is not installed and cannot be (needs apt-get)." >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

mkdir -p "$DIR/ctld"
[ -d /etc/netns ] || { mkdir /etc/netns; touch "$DIR/created-etc-netns"; }
hosts="127.0.0.1 localhost
${NET}.1 ${CTL}"
node_lines=""
for i in $(seq "$nodes"); do
  hosts="$hosts
${NET}.$((10 + i)) dsv3n$i"
  node_lines="$node_lines
NodeName=dsv3n$i NodeHostname=dsv3n$i NodeAddr=${NET}.$((10 + i)) CPUs=$(nproc) RealMemory=2048 State=UNKNOWN"
  mkdir -p "$DIR/dsv3n$i/spool"
done

# The network: a bridge in the controller's namespace, one veth pair per node.
ip netns add "$CTL"
ip -n "$CTL" link set lo up
ip -n "$CTL" link add br0 type bridge
ip -n "$CTL" addr add "${NET}.1/24" dev br0
ip -n "$CTL" link set br0 up
for i in $(seq "$nodes"); do
  ns=dsv3n$i
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add eth0 netns "$ns" type veth peer name "$ns" netns "$CTL"
  ip -n "$ns" addr add "${NET}.$((10 + i))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$CTL" link set "$ns" master br0 up
done
for ns in "$CTL" $(seq -f 'dsv3n%g' "$nodes"); do
  mkdir -p "/etc/netns/$ns"
  echo "$hosts" > "/etc/netns/$ns/hosts"
  echo "$ns" > "/etc/netns/$ns/hostname"
done

# Settings both test clusters share, then this one's own.
{ printf '%s\n' "ClusterName=dsv3nodes" "SlurmctldHost=${CTL}(${NET}.1)"; cat "$(dirname "$0")/slurm_common.conf"; cat <<CONF
SlurmdTimeout=30
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/%n/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/%n/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/%n/slurmd.log
${node_lines}
PartitionName=debug Nodes=dsv3n[1-${nodes}] Default=YES MaxTime=INFINITE State=UP
CONF
} > "$CONF"

# munge: one key and one munged for every node (its socket is a file, seen from every namespace).
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  touch "$DIR/created-munge-key"
fi
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$DIR/munged.pid"
fi

# Daemons: each in its node's namespaces, with that node's hostname.
daemon "$CTL" /usr/sbin/slurmctld -f "'$CONF'"
for i in $(seq "$nodes"); do start_node "$i"; done
for _ in $(seq 60); do
  if [ "$(ip netns exec "$CTL" env SLURM_CONF="$CONF" sinfo -h -o %D -t idle 2>/dev/null)" = "$nodes" ]; then
    echo "$CONF"
    exit 0
  fi
  sleep 0.5
done
echo "SLURM started but not all ${nodes} nodes became idle: $(ip netns exec "$CTL" env SLURM_CONF="$CONF" sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ';')" >&2
exit 1
