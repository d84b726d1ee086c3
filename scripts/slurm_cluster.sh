#!/usr/bin/env bash
# Start and stop a real single-node SLURM cluster (with accounting) on this
# machine, for the project's tests and CI. Debian 12, root, no systemd.
#
#   scripts/slurm_cluster.sh install   install the Debian packages (no-op when present)
#   scripts/slurm_cluster.sh start     install if needed, configure, start, smoke-test
#   scripts/slurm_cluster.sh stop      stop every daemon this script started
#   scripts/slurm_cluster.sh status    exit 0 when the cluster accepts jobs, 1 when a
#                                      daemon is not running, 4 when all run but the
#                                      node is not usable (yet)
#
# Env: EVIT_SLURM_DIR   the one directory for state, spool, pid and log files
#                       (default /tmp/evit-slurm)
#      EVIT_SLURM_START_TIMEOUT   seconds to wait for each daemon (default 60)
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 impossible here (not root, or no
# apt-get/dpkg), so that tests can skip with that reason.
#
# Layout under $EVIT_SLURM_DIR:
#   log/  run/    logs and pid files of slurmdbd, slurmctld, slurmd
#   state/        slurmctld StateSaveLocation      spool/  slurmd SlurmdSpoolDir
#   munge/        munged's pid, log and seed (owned by munge)
#   mysql/        MariaDB data dir, pid and log (owned by mysql)
# The config files go to /etc/slurm, where the daemons and clients look.
# Sockets stay at the packages' defaults (/run/munge, /run/mysqld) because
# slurm's auth/munge and the MariaDB client library find them there.
set -euo pipefail

DIR=${EVIT_SLURM_DIR:-/tmp/evit-slurm}
TIMEOUT=${EVIT_SLURM_START_TIMEOUT:-60}
CLUSTER=evit
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# Daemons in start order; stop goes in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { echo "slurm_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
impossible() { log "CANNOT RUN HERE: $*"; exit 3; }

pidfile_of() {
    case $1 in
        munged) echo "$DIR/munge/munged.pid" ;;
        mariadbd) echo "$DIR/mysql/mariadbd.pid" ;;
        *) echo "$DIR/run/$1.pid" ;;
    esac
}

logfile_of() {
    case $1 in
        munged) echo "$DIR/munge/munged.log" ;;
        mariadbd) echo "$DIR/mysql/mariadb.log" ;;
        *) echo "$DIR/log/$1.log" ;;
    esac
}

# Whether process $1 runs. A dead daemon is a zombie until PID 1 reaps it,
# which here takes a second or two: count a zombie as gone.
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}

# Prints the pid of daemon $1 if its pid file names a running process that is
# really that daemon (guards against a stale pid file and pid reuse).
live_pid() {
    local pid
    pid=$(tr -dc '0-9' 2>/dev/null <"$(pidfile_of "$1")") || return 1
    [[ -n $pid ]] && running "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
    echo "$pid"
}

tail_log() {
    local f
    f=$(logfile_of "$1")
    log "--- last lines of $f ---"
    tail -n 30 "$f" >&2 2>/dev/null || log "(no log file)"
}

# wait_for "DAEMON..." DESCRIPTION CMD...: retry CMD every 0.5 s until it
# succeeds; on timeout, fail with the tail of each DAEMON's log.
wait_for() {
    local daemons=$1 what=$2 deadline=$((SECONDS + TIMEOUT)) d
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            for d in $daemons; do tail_log "$d"; done
            die "timed out after ${TIMEOUT}s waiting for $what"
        fi
        sleep 0.5
    done
}

need_root() {
    ((EUID == 0)) || impossible "must run as root to ${1} the SLURM daemons (uid $EUID)"
}

packages_installed() {
    dpkg-query -W -f='${Status}\n' "${PACKAGES[@]}" 2>/dev/null \
        | grep -c '^install ok installed$' | grep -qx "${#PACKAGES[@]}"
}

cmd_install() {
    command -v dpkg-query >/dev/null && command -v apt-get >/dev/null \
        || impossible "apt-get/dpkg not available (not a Debian system); install SLURM by hand"
    if packages_installed; then
        return 0
    fi
    need_root install
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y --no-install-recommends "${PACKAGES[@]}")
    log "installing ${PACKAGES[*]}"
    # Try with the package lists already present; update them only if that fails.
    if ! "${apt[@]}" >"/tmp/evit-slurm-apt.log" 2>&1; then
        apt-get update >>"/tmp/evit-slurm-apt.log" 2>&1 || true
        "${apt[@]}" >>"/tmp/evit-slurm-apt.log" 2>&1 || {
            tail -n 20 /tmp/evit-slurm-apt.log >&2
            die "apt-get install failed (full log: /tmp/evit-slurm-apt.log)"
        }
    fi
}

write_configs() {
    local node mem_kb real_mem
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    real_mem=$((mem_kb * 9 / 10 / 1024))
    # First line of `slurmd -C` is this machine's node line; we only lower
    # RealMemory (a node reporting less memory than configured is drained).
    node=$(slurmd -C | head -n 1 | sed -E "s/RealMemory=[0-9]+/RealMemory=$real_mem/")
    mkdir -p /etc/slurm
    cat >/etc/slurm/slurm.conf <<EOF
# Written by scripts/slurm_cluster.sh; overwritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime + fast scheduler passes: a requeued job restarts
# in seconds instead of ~160 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
# submitit jobs ignore SIGTERM: a cancelled one lingers (node state comp,
# slurmd slow to stop) until SIGKILL, KillWait seconds later (default 30).
KillWait=5
ReturnToService=2
MinJobAge=300

# No cgroups (no systemd here).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none

# Several jobs at once: each gets DefMemPerCPU, not the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024

# Accounting is required for sacct, and submitit needs sacct to see job states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pidfile_of slurmctld)
SlurmdPidFile=$(pidfile_of slurmd)
SlurmctldLogFile=$(logfile_of slurmctld)
SlurmdLogFile=$(logfile_of slurmd)

$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd talks to MariaDB over its unix socket as root (no password).
    install -m 600 /dev/stdin /etc/slurm/slurmdbd.conf <<EOF
# Written by scripts/slurm_cluster.sh; overwritten on every start.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
PidFile=$(pidfile_of slurmdbd)
LogFile=$(logfile_of slurmdbd)
EOF
}

start_munged() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 755 "$DIR/munge"
    runuser -u munge -- /usr/sbin/munged \
        --pid-file="$(pidfile_of munged)" --log-file="$(logfile_of munged)" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for munged "munged" bash -c 'munge -n | unmunge'
}

start_mariadbd() {
    install -d -o mysql -g mysql -m 755 "$DIR/mysql" /run/mysqld
    if [[ ! -d $DIR/mysql/data/mysql ]]; then
        mariadb-install-db --user=mysql --datadir="$DIR/mysql/data" \
            >>"$(logfile_of mariadbd)" 2>&1 || { tail_log mariadbd; die "mariadb-install-db failed"; }
    fi
    # mariadbd does not daemonize: detach it into its own session.
    setsid -f /usr/sbin/mariadbd --user=mysql --skip-networking \
        --datadir="$DIR/mysql/data" --pid-file="$(pidfile_of mariadbd)" \
        --log-error="$(logfile_of mariadbd)" </dev/null >/dev/null 2>&1
    wait_for mariadbd "MariaDB" mariadb-admin ping
    chmod 644 "$(pidfile_of mariadbd)" # mariadbd writes it 660; let `status` read it as any user
}

start_slurmdbd() {
    slurmdbd
    wait_for slurmdbd "slurmdbd" sacctmgr -n list cluster
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    slurmctld
    wait_for slurmctld "slurmctld" scontrol ping
}

start_slurmd() {
    slurmd
}

# The node is usable: idle, or running or finishing jobs (mix/alloc/comp: a
# cancelled job stays comp until it exits). A suffix such as `*` (not
# responding) or a drain/down state is not usable.
node_ready() {
    [[ $(sinfo -h -N -o %t 2>/dev/null) =~ ^(idle|mix|alloc|comp)$ ]]
}

all_daemons_alive() {
    local d
    for d in "${DAEMONS[@]}"; do live_pid "$d" >/dev/null || return 1; done
}

cmd_start() {
    need_root start
    cmd_install
    if all_daemons_alive && node_ready; then
        log "already running (dir $DIR)"
        return 0
    fi
    local t0=$SECONDS d
    mkdir -p -m 755 "$DIR" # daemons running as munge and mysql must traverse it
    install -d -m 755 "$DIR/log" "$DIR/run" "$DIR/state" "$DIR/spool"
    write_configs
    # Start what is not running yet, in dependency order.
    for d in "${DAEMONS[@]}"; do
        if live_pid "$d" >/dev/null; then
            log "$d already running"
        else
            log "starting $d"
            "start_$d"
        fi
    done
    wait_for "slurmctld slurmd" "the node to be idle (sinfo -N)" node_ready
    timeout "$TIMEOUT" srun -t 1 true || { tail_log slurmd; die "smoke test 'srun -t 1 true' failed"; }
    log "up in $((SECONDS - t0))s (dir $DIR)"
}

cmd_stop() {
    need_root stop
    local i d pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        pid=$(live_pid "$d") || continue
        log "stopping $d (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 "$((TIMEOUT * 5))"); do
            running "$pid" || break
            sleep 0.2
        done
        if running "$pid"; then
            log "$d did not exit after ${TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    log "stopped"
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(live_pid "$d"); then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            rc=1
        fi
    done
    # Ask sinfo only when the daemons run: without munged it retries for ~20 s.
    if ((rc == 1)); then
        echo "node: unknown"
    elif node_ready; then
        echo "node: $(sinfo -h -N -o '%N %t')"
    else
        echo "node: not ready ($(sinfo -h -N -o '%N %t' 2>&1 | head -n 1))"
        rc=4
    fi
    case $rc in
        0) echo "cluster: up (dir $DIR)" ;;
        1) echo "cluster: down (dir $DIR)" ;;
        *) echo "cluster: daemons running, node not usable (dir $DIR)" ;;
    esac
    return "$rc"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
