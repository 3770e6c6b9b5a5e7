#!/usr/bin/env bash
# A real single-node Slurm cluster on this (Debian) machine, for the tests and for trying the Slurm launcher.
#   sudo scripts/slurm_cluster.sh start    # munge + slurmctld + slurmd; the node idle in partition "debug"
#   sudo scripts/slurm_cluster.sh status   # exit 0 when the node takes jobs
#   sudo scripts/slurm_cluster.sh stop
# Needs root and: apt-get install -y slurm-wlm munge. Idempotent: start on a running cluster returns at once.
# No accounting database (slurmdbd): sacct answers "accounting storage is disabled"; distill-run says so once
# instead of submitit's warning on every poll.
set -euo pipefail

conf=/etc/slurm/slurm.conf
marker="# written by distill-runner scripts/slurm_cluster.sh"
host=$(hostname -s)
state=/var/spool/slurmctld

fail() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

node_ready() {  # the node answers and is idle, mixed or allocated (not down, drained or unknown)
  local s
  s=$(sinfo -h -n "$host" -o %t 2>/dev/null | head -n 1) || return 1
  [[ "$s" =~ ^(idle|mix|alloc)$ ]]
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc --all)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # slurmd drains a node that has less
  mkdir -p /etc/slurm /var/log/slurm "$state" /var/spool/slurmd
  if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
    fail "$conf exists and was not written by this script: leaving this machine's Slurm alone"
  fi
  cat >"$conf" <<EOF
$marker
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
MpiDefault=none
# no accounting database: no job accounting gathered or stored (sacct says it is disabled)
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# a cancelled or requeued job is killed 2 s after its SIGTERM (default 30 s; submitit ignores SIGTERM)
KillWait=2
# finished jobs stay known to squeue for an hour (submitit reads their states there: no sacct)
MinJobAge=3600
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
}

start() {
  [ "$(id -u)" = 0 ] || fail "needs root (it starts munged, slurmctld and slurmd)"
  command -v slurmctld >/dev/null && command -v munged >/dev/null \
    || fail "Slurm is not installed: apt-get install -y slurm-wlm munge"
  if node_ready; then echo "slurm: running (node $host, partition debug)"; return; fi
  write_conf
  start_munge
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 1 60); do
    if node_ready; then echo "slurm: running (node $host, partition debug)"; return; fi
    # a node left down or drained by an earlier run (e.g. a killed slurmd) is taken back
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  fail "the node did not come up within 60 s; see /var/log/slurm/slurmctld.log and slurmd.log"
}

stop() {
  scancel --full --quiet --user=root >/dev/null 2>&1 || true
  for daemon in slurmd slurmctld; do
    if [ -f "/run/$daemon.pid" ]; then kill "$(cat "/run/$daemon.pid")" 2>/dev/null || true; fi
  done
  echo "slurm: stopped (munged left running)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if node_ready; then sinfo; else echo "slurm: not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
