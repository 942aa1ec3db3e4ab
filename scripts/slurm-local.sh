#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the SLURM backend of
# experiments/batch_job_submit.py and for its tests.
#
#   scripts/slurm-local.sh start    # munged + slurmctld + slurmd; waits until the node is idle
#   scripts/slurm-local.sh status   # exit 0 when the cluster answers, 3 when it is not running
#   scripts/slurm-local.sh stop     # stops the daemons this script started
#
# Needs root and Debian's slurm-wlm + munge (apt-get install -y slurm-wlm munge).
# Everything SLURM writes (slurm.conf, state, spool, logs, PID files) lives under
# one directory: $FASTCLIP_SLURM_DIR, default /tmp/fastclip-slurm. Client commands
# (sbatch, squeue, ...) find the cluster through SLURM_CONF=$DIR/slurm.conf; the
# tests read that same well-known path, and fastclip's submit scripts use it when neither
# SLURM_CONF nor /etc/slurm/slurm.conf is set (fastclip.pipeline.jobs.slurm.use_slurm_config).
set -euo pipefail

DIR=${FASTCLIP_SLURM_DIR:-/tmp/fastclip-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

# A PID file names a live process of the expected program.
alive() {  # alive PIDFILE NAME
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$2"* ]]
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return; fi
    command -v munged >/dev/null || die "munged not found: apt-get install -y munge"
    # munged refuses to run as root and wants its directories owned by the munge user.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
    # Remember that munged is ours, so `stop` ends it and nothing else.
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
}

write_conf() {
    local host node cpus mem defmem
    host=$(hostname -s)
    # `slurmd -C` prints this machine's real NodeName/CPUs/sockets/memory line;
    # a node configured with more than it has is drained.
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    # Without DefMemPerCPU a job gets the whole node's memory and jobs run one at a time.
    defmem=$(( mem / cpus < 2048 ? mem / cpus : 2048 ))
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster on $host.
ClusterName=fastclip
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s); a local cluster has no slow nodes to wait for.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
KillWait=10
# Finished jobs stay visible to squeue/scontrol this long; sacct -c reads them after.
MinJobAge=300
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Keep the conf (and so the state) when nothing changed; grep skips comment lines.
    if [[ -f $CONF ]] && cmp -s <(grep -v '^#' "$CONF") <(grep -v '^#' "$CONF.tmp"); then
        rm -f "$CONF.tmp"
    else
        mv "$CONF.tmp" "$CONF"
    fi
}

node_name() { sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF"; }

node_state() { sinfo -h -N -n "$(node_name)" -o %T 2>/dev/null || true; }

wait_idle() {
    local state=""
    for i in $(seq 150); do
        state=$(node_state)
        case $state in
            idle|mixed|allocated|completing) return 0 ;;
            down|drained|draining)  # not responding is "down*"; plain down needs a resume
                scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    die "node is '$state' after 30 s, expected idle (see $DIR/log/slurmd.log and slurmctld.log)"
}

hints() {
    echo "export SLURM_CONF=$CONF"
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (slurmd and munged need it)"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        || die "slurmctld/slurmd not found: apt-get install -y slurm-wlm munge"
    mkdir -p "$DIR"/{state,spool,log,run}
    start_munge
    if ! alive "$DIR/run/slurmctld.pid" slurmctld || ! alive "$DIR/run/slurmd.pid" slurmd; then
        write_conf
        alive "$DIR/run/slurmctld.pid" slurmctld || slurmctld -f "$CONF"
        alive "$DIR/run/slurmd.pid" slurmd || slurmd -f "$CONF"
    fi
    wait_idle
    log "cluster up: node $(node_name) is $(node_state); conf $CONF"
    hints
}

stop_pid() {  # stop_pid PIDFILE NAME
    local pid
    alive "$1" "$2" || { rm -f "$1"; return 0; }
    pid=$(<"$1")
    kill "$pid"
    for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    [[ -d /proc/$pid ]] && kill -9 "$pid"
    rm -f "$1"
}

stop() {
    stop_pid "$DIR/run/slurmd.pid" slurmd
    stop_pid "$DIR/run/slurmctld.pid" slurmctld
    stop_pid "$DIR/run/munged.pid" munged
    log "stopped"
}

status() {
    local ok=0
    alive "$DIR/run/slurmctld.pid" slurmctld && log "slurmctld pid $(<"$DIR/run/slurmctld.pid")" || { log "slurmctld not running"; ok=3; }
    alive "$DIR/run/slurmd.pid" slurmd && log "slurmd pid $(<"$DIR/run/slurmd.pid")" || { log "slurmd not running"; ok=3; }
    munge_ok && log "munge answers" || { log "munge not answering"; ok=3; }
    if [[ $ok == 0 ]]; then
        sinfo -N
        hints
    fi
    return $ok
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (directory: \$FASTCLIP_SLURM_DIR, default /tmp/fastclip-slurm)" >&2; exit 2 ;;
esac
