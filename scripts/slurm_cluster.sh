#!/usr/bin/env bash
# Start and stop a real SLURM cluster of two nodes, n1 and n2, (with
# accounting) on this one machine, for the project's tests and CI. Each node is
# its own slurmd (`slurmd -N n1`, `slurmd -N n2`) on its own port; both offer
# the machine's CPUs, and split ~90 % of its memory. Debian 12, root, no systemd.
#
#   scripts/slurm_cluster.sh install   install the Debian packages (no-op when present)
#   scripts/slurm_cluster.sh start     install if needed, configure, start, smoke-test
#   scripts/slurm_cluster.sh stop      stop every daemon this script started
#   scripts/slurm_cluster.sh status    exit 0 when the cluster accepts jobs, 1 when a
#                                      daemon is not running, 4 when all run but a
#                                      node is not usable (yet)
#
# `start` also adds `127.0.0.1 n1 n2` to /etc/hosts when the node names do not
# resolve (torch's DDP uses the first node's name as its master address).
#
# Env: EVIT_SLURM_DIR   the one directory for state, spool, pid and log files
#                       (default /tmp/evit-slurm)
#      EVIT_SLURM_START_TIMEOUT   seconds to wait for each daemon (default 60)
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 impossible here (not root, or no
# apt-get/dpkg), so that tests can skip with that reason.
#
# Layout under $EVIT_SLURM_DIR:
#   log/  run/    logs and pid files of slurmdbd, slurmctld and each node's
#                 slurmd (slurmd-n1.pid, slurmd-n1.log, ...)
#   state/        slurmctld StateSaveLocation      spool/n1/ spool/n2/  SlurmdSpoolDir
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
# The nodes, each one slurmd on this machine, listening on its own port.
NODES=(n1 n2)
FIRST_PORT=17001
# Daemons in start order; stop goes in reverse. slurmd-NODE is `slurmd -N NODE`.
DAEMONS=(munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}")
# The single-node version of this script ran one slurmd, with pid file
# run/slurmd.pid, as a node named after the host: stopped when found.
LEGACY_SLURMD=slurmd

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

# The process name (comm) of daemon $1: every slurmd-NODE is a `slurmd`.
comm_of() {
    case $1 in
        slurmd-*) echo slurmd ;;
        *) echo "$1" ;;
    esac
}

# Prints the pid of daemon $1 if its pid file names a running process that is
# really that daemon (guards against a stale pid file and pid reuse).
live_pid() {
    local pid
    pid=$(tr -dc '0-9' 2>/dev/null <"$(pidfile_of "$1")") || return 1
    [[ -n $pid ]] && running "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(comm_of "$1")" ]] || return 1
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

# Writes $1 from stdin with mode $2, only if its content changes; returns 0
# when it changed, 1 when it was already so.
install_if_changed() {
    local new
    new=$(mktemp)
    cat >"$new"
    if [[ -f $1 ]] && cmp -s "$new" "$1"; then
        rm -f "$new"
        return 1
    fi
    install -m "$2" "$new" "$1"
    rm -f "$new"
}

# Writes slurm.conf and slurmdbd.conf. Sets CHANGED_slurm / CHANGED_slurmdbd
# to 1 when that file changed, so that `start` restarts the daemons reading it.
CHANGED_slurm=0
CHANGED_slurmdbd=0
write_configs() {
    local mem_kb real_mem topology i nodes=""
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # ~90 % of the memory, split between the nodes (a node reporting less
    # memory than configured is drained; each slurmd reports all of it).
    real_mem=$((mem_kb * 9 / 10 / 1024 / ${#NODES[@]}))
    # Every node offers the whole machine's CPUs: its topology is the first
    # line of `slurmd -C` without the name and memory. With CR_Core_Memory
    # slurmctld then runs as many 1-CPU jobs at once as the nodes have CPUs in
    # total, which oversubscribes the machine by the number of nodes; but a
    # job may ask for all the CPUs of a node, as the tests do.
    topology=$(slurmd -C | head -n 1 | sed -E 's/(^| )(NodeName|RealMemory)=[^ ]*//g; s/^ +//')
    for i in "${!NODES[@]}"; do
        nodes+="NodeName=${NODES[i]} NodeHostname=$(hostname -s) NodeAddr=127.0.0.1"
        nodes+=" Port=$((FIRST_PORT + i)) $topology RealMemory=$real_mem State=UNKNOWN"$'\n'
    done
    mkdir -p /etc/slurm
    install_if_changed /etc/slurm/slurm.conf 644 <<EOF && CHANGED_slurm=1
# Written by scripts/slurm_cluster.sh on start (when its content changes).
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

# One slurmd per node on this machine: per-node paths (%n is the node name).
# config_overrides: each slurmd reports its node line's resources (the
# machine's CPUs, a share of its memory) rather than what it detects, so no
# node is drained for a mismatch, however many nodes share the machine.
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(pidfile_of slurmctld)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$(logfile_of slurmctld)
SlurmdLogFile=$DIR/log/slurmd-%n.log

${nodes}PartitionName=debug Nodes=n[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd talks to MariaDB over its unix socket as root (no password).
    install_if_changed /etc/slurm/slurmdbd.conf 600 <<EOF && CHANGED_slurmdbd=1
# Written by scripts/slurm_cluster.sh on start (when its content changes).
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
PidFile=$(pidfile_of slurmdbd)
LogFile=$(logfile_of slurmdbd)
EOF
    return 0
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
    install -d -m 755 "$DIR/spool/$1"
    slurmd -N "$1"
}

start_daemon() {
    case $1 in
        slurmd-*) start_slurmd "${1#slurmd-}" ;;
        *) "start_$1" ;;
    esac
}

# Stops daemon $1 if it runs: SIGTERM, then SIGKILL after $TIMEOUT s.
stop_daemon() {
    local pid
    pid=$(live_pid "$1") || return 0
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 "$((TIMEOUT * 5))"); do
        running "$pid" || return 0
        sleep 0.2
    done
    log "$1 did not exit after ${TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# Every node is usable: listed by sinfo, and idle, or running or finishing
# jobs (mix/alloc/comp: a cancelled job stays comp until it exits). A suffix
# such as `*` (not responding) or a drain/down state is not usable. sinfo
# prints one line per node.
node_ready() {
    local out n
    out=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do
        grep -qxE "$n (idle|mix|alloc|comp)" <<<"$out" || return 1
    done
}

# The node names resolve to this machine: add `127.0.0.1 n1 n2` to /etc/hosts
# if one of them does not (appended in place: /etc/hosts may be a bind mount).
ensure_hosts() {
    local n
    for n in "${NODES[@]}"; do
        if [[ $(getent ahostsv4 "$n" 2>/dev/null | awk 'NR == 1 {print $1}') != 127.0.0.1 ]]; then
            log "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
            # Start a new line if the file does not end with one.
            if [[ -s /etc/hosts && $(tail -c 1 /etc/hosts | od -An -c | tr -d ' ') != '\n' ]]; then
                echo >>/etc/hosts
            fi
            echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
            return
        fi
    done
}

# `srun -N2` runs one task on each node, n1 as rank 0 and n2 as rank 1.
smoke_test_nodes() {
    local out want i
    want=$(for i in "${!NODES[@]}"; do echo "${NODES[i]} $i"; done)
    # shellcheck disable=SC2016  # expanded by the job's shell
    out=$(timeout "$TIMEOUT" srun -N "${#NODES[@]}" -t 1 bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID' | sort) \
        || { tail_log slurmd-"${NODES[0]}"; die "smoke test 'srun -N${#NODES[@]}' failed"; }
    [[ $out == "$want" ]] || die "smoke test 'srun -N${#NODES[@]}' printed '${out//$'\n'/; }', not '${want//$'\n'/; }'"
}

all_daemons_alive() {
    local d
    for d in "${DAEMONS[@]}"; do live_pid "$d" >/dev/null || return 1; done
}

cmd_start() {
    need_root start
    cmd_install
    ensure_hosts
    mkdir -p -m 755 "$DIR" # daemons running as munge and mysql must traverse it
    install -d -m 755 "$DIR/log" "$DIR/run" "$DIR/state" "$DIR/spool"
    write_configs
    if ((CHANGED_slurm + CHANGED_slurmdbd == 0)) && all_daemons_alive && node_ready; then
        log "already running (dir $DIR)"
        return 0
    fi
    local t0=$SECONDS d
    # A cluster of the single-node script: its slurmd is a node that no longer
    # exists. Stop it; slurmctld then must read the new config (below).
    if live_pid "$LEGACY_SLURMD" >/dev/null; then
        log "found the single-node cluster's slurmd: stopping it"
        stop_daemon "$LEGACY_SLURMD"
        CHANGED_slurm=1
    fi
    rm -f "$(pidfile_of "$LEGACY_SLURMD")"
    # A changed config takes effect only on a restart of the daemons that read
    # it (slurmctld keeps the old node list, a slurmd its old node line).
    if ((CHANGED_slurmdbd)) && live_pid slurmdbd >/dev/null; then
        log "slurmdbd.conf changed: restarting slurmdbd"
        stop_daemon slurmdbd
    fi
    if ((CHANGED_slurm)); then
        for d in "${NODES[@]/#/slurmd-}" slurmctld; do
            if live_pid "$d" >/dev/null; then
                log "slurm.conf changed: restarting $d"
                stop_daemon "$d"
            fi
        done
    fi
    # Start what is not running yet, in dependency order.
    for d in "${DAEMONS[@]}"; do
        if live_pid "$d" >/dev/null; then
            log "$d already running"
        else
            log "starting $d"
            start_daemon "$d"
        fi
    done
    wait_for "slurmctld ${NODES[*]/#/slurmd-}" "nodes ${NODES[*]} to be idle (sinfo -N)" node_ready
    timeout "$TIMEOUT" srun -t 1 true || { tail_log slurmd-"${NODES[0]}"; die "smoke test 'srun -t 1 true' failed"; }
    smoke_test_nodes
    log "up in $((SECONDS - t0))s: $(sinfo -h -o '%D nodes %N %T') (dir $DIR)"
}

cmd_stop() {
    need_root stop
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        # The single-node script's slurmd, if any, goes with the nodes.
        [[ ${DAEMONS[i]} == slurmctld ]] && stop_daemon "$LEGACY_SLURMD"
        stop_daemon "${DAEMONS[i]}"
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
        echo "nodes: unknown"
    elif node_ready; then
        echo "nodes: $(sinfo -h -N -o '%N %t' | paste -sd, | sed 's/,/, /g')"
    else
        echo "nodes: not ready ($(sinfo -h -N -o '%N %t' 2>&1 | paste -sd, | sed 's/,/, /g'); want ${NODES[*]} usable)"
        rc=4
    fi
    case $rc in
        0) echo "cluster: up (dir $DIR)" ;;
        1) echo "cluster: down (dir $DIR)" ;;
        *) echo "cluster: daemons running, a node not usable (dir $DIR)" ;;
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
