#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the launcher tests: installs Debian's slurm-wlm and
# munge if missing (needs root and apt), writes a minimal slurm.conf (partition `debug` holding this
# host) and starts munged, slurmctld and slurmd. Idempotent: a running cluster is left as it is.
# Exits non-zero with a sentence on stderr when SLURM cannot be set up here.
# `tests/start_slurm.sh down` stops the daemons this script started (their ids are kept in
# /run/dsv3-slurm/pids), and nothing else.
set -euo pipefail

RECORD=/run/dsv3-slurm/pids
if [ "${1:-}" = down ]; then
  if [ -f "$RECORD" ]; then
    for pid in $(cat "$RECORD"); do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $(cat "$RECORD"); do
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
  fi
  rm -rf "$(dirname "$RECORD")"
  exit 0
fi
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # a daemon by its pid file

export SLURM_CONF=/etc/slurm/slurm.conf  # not a cluster another SLURM_CONF names
if sinfo -h >/dev/null 2>&1 && [ -n "$(sinfo -h -o %T 2>/dev/null | grep -E 'idle|mix|alloc')" ]; then
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "SLURM is not installed and cannot be (needs root and apt-get)." >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
# Settings both test clusters share, then this one's own.
{ printf '%s\n' "ClusterName=dsv3" "SlurmctldHost=${host}"; cat "$(dirname "$0")/slurm_common.conf"; cat <<CONF
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${host} CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
} > /etc/slurm/slurm.conf

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p "$(dirname "$RECORD")"
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
  cat /run/munge/munged.pid >> "$RECORD"
fi
# Checked by pid file (tests/start_cluster.sh runs slurmctld and slurmd daemons of its own); run in
# the foreground of a detached session, so that the id recorded is the daemon's.
if ! running /run/slurmctld.pid; then
  setsid /usr/sbin/slurmctld -D </dev/null >/dev/null 2>&1 &
  echo $! >> "$RECORD"
fi
if ! running /run/slurmd.pid; then
  setsid /usr/sbin/slurmd -D </dev/null >/dev/null 2>&1 &
  echo $! >> "$RECORD"
fi
for _ in $(seq 30); do
  if [ -n "$(sinfo -h -o %T 2>/dev/null | grep -E 'idle|mix|alloc')" ]; then
    exit 0
  fi
  scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "SLURM started but node ${host} did not become idle: $(sinfo -h -o '%T %E' 2>&1)" >&2
exit 1
