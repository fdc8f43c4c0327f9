#!/usr/bin/env bash
# Start (or stop) a single-node Slurm cluster on this machine, for the Slurm tests.
#
#   tests/slurm/local_cluster.sh [start]   install slurm-wlm + munge if missing, configure, start
#   tests/slurm/local_cluster.sh stop      shut down slurmctld/slurmd and the munged we started
#   tests/slurm/local_cluster.sh status    exit 0 when a cluster answers and its node is usable
#
# Idempotent: `start` returns at once when a cluster already answers with a usable node.
# Needs root (or password-less sudo) to install packages and write /etc/slurm/slurm.conf.
# Exit codes: 0 ready, 1 failed to start, 3 cannot install (not root / no apt / no package);
# the tests skip on 3 only.
#
# Environment:
#   FPDIFF_SLURM_STATE   state/spool/log directory (default /tmp/fpdiff-slurm)
#   FPDIFF_SLURM_CONF    slurm.conf path (default /etc/slurm/slurm.conf)
set -euo pipefail

STATE=${FPDIFF_SLURM_STATE:-/tmp/fpdiff-slurm}
CONF=${FPDIFF_SLURM_CONF:-/etc/slurm/slurm.conf}
MARKER="# written by fpdiff tests/slurm/local_cluster.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge

log() { printf 'local_cluster: %s\n' "$*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 3
    fi
}

cluster_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    local states
    states=$(sinfo -h -N -o '%T' 2>/dev/null) || return 1
    grep -Eq '^(idle|mixed|allocated|completing)' <<<"$states"
}

install_packages() {
    if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v munged >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "cannot install Slurm: no apt-get on this OS"
        return 3
    fi
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y slurm-wlm munge >&2; then
        as_root apt-get update >&2 || { log "cannot install Slurm: apt-get update failed (root needed)"; return 3; }
        as_root apt-get install -y slurm-wlm munge >&2 || { log "cannot install Slurm: apt-get install slurm-wlm munge failed"; return 3; }
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        as_root mkdir -p /etc/munge
        as_root dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    as_root chown -R munge:munge /etc/munge
    as_root chmod 700 /etc/munge
    as_root chmod 400 "$MUNGE_KEY"
    as_root mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
    as_root chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
    as_root chmod 755 "$MUNGE_RUN"
    log "starting munged"
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u munge -- /usr/sbin/munged
    else
        sudo -n -u munge /usr/sbin/munged
    fi
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    log "munged did not come up"
    return 1
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "keeping existing $CONF (not written by this script)"
        return 0
    fi
    local host node_line
    host=$(hostname -s)
    # slurmd -C prints this machine's real layout; a mismatch would drain the node
    node_line=$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1)
    if [[ -z $node_line ]]; then
        node_line="NodeName=$host CPUs=$(nproc)"
    fi
    as_root mkdir -p "$(dirname "$CONF")" "$STATE"/{state,spool,log,run}
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARKER
ClusterName=fpdiff-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# schedule every few seconds (defaults 60/30): requeued test jobs restart sooner
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    as_root cp "$tmp" "$CONF"
    as_root chmod 644 "$CONF"
    rm -f "$tmp"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    if cluster_ready; then
        log "a Slurm cluster is already running: $(sinfo -h -N -o '%N %T' | tr '\n' ' ')"
        return 0
    fi
    install_packages || return $?
    start_munge
    write_conf
    if ! pid_alive "$STATE/run/slurmctld.pid"; then
        log "starting slurmctld"
        as_root /usr/sbin/slurmctld
    fi
    if ! pid_alive "$STATE/run/slurmd.pid"; then
        log "starting slurmd"
        as_root /usr/sbin/slurmd
    fi
    local host
    host=$(hostname -s)
    for _ in $(seq 60); do
        if cluster_ready; then
            log "ready: $(sinfo -h -N -o '%N %T %c CPUs' | tr '\n' ' ')"
            return 0
        fi
        # a node left down/drained by an earlier unclean stop: bring it back
        if sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(down|drain)'; then
            scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    log "cluster did not become ready; logs in $STATE/log"
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 2>/dev/null || true
    return 1
}

stop() {
    if command -v scontrol >/dev/null 2>&1 && scontrol ping 2>/dev/null | grep -q 'is UP'; then
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    local f
    for f in "$STATE/run/slurmd.pid" "$STATE/run/slurmctld.pid"; do
        for _ in $(seq 30); do
            pid_alive "$f" || break
            sleep 0.2
        done
        if pid_alive "$f"; then
            as_root kill "$(cat "$f")" || true
        fi
    done
    if pid_alive "$MUNGE_RUN/munged.pid"; then
        as_root kill "$(cat "$MUNGE_RUN/munged.pid")" || true
    fi
    log "stopped"
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) cluster_ready ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
