#!/usr/bin/env bash
# contrib/bench.sh — `make bench`: dipus measured side by side with socat,
# ssh -L and a direct connection, every figure from this one run.
#
# Usage: contrib/bench.sh          (from anywhere; `make bench` runs it)
#
# Environment (defaults in brackets):
#   BENCH_BYTES         bytes per bulk run, K/M/G suffixes [2G]; 256M is a quick run
#   BENCH_RUNS          runs per case; the median is reported [3]
#   BENCH_BULK_ROUNDS   rounds of each bulk comparison (cases in turn) [7]
#   BENCH_SECONDS       seconds per request/response or connect run [2]
#   BENCH_LATENCY_RUNS  whole-process dcat/socat runs per latency sample [200]
#   BENCH_SERVICES      services for dls and the import mirror [10000]
#   BENCH_STREAMS       concurrent streams through one exporter [1000]
#   BENCH_IDLE_SECONDS  how long idle dipusd is watched for wakeups [60]
#   BENCH_SKIP_STATIC   1: do not build the static binary (its size is n/a)
#
# The ends are dipus's own (`dipus bench sink|source|echo` servers and
# `dipus bench send|rr|connect` clients), so no row measures cat or socat
# instead of the path. The service sockets live in exported/ of a tree
# "alpha"; every path reaches the same sockets:
#   direct       the client connects to the service socket
#   dipus 1 hop  dipus-local-proxy: UNIX -> relay -> UNIX, one process
#   socat 1 hop  socat UNIX-LISTEN,fork,backlog=512 UNIX-CONNECT
#   dipus 2 hop  dipus-import (tree "beta") of dipus-exporter on 127.0.0.1:
#                UNIX -> importer -> TCP -> exporter -> UNIX
#   socat 2 hop  socat UNIX-LISTEN -> TCP:127.0.0.1 and TCP-LISTEN -> UNIX-CONNECT
#   ssh import   dipus-import ssh://: the shared connection's ssh master
#                forwards each imported socket (ssh -O forward) -> sshd -> UNIX
#   ssh -L       ssh -L local.sock:service.sock on the same sshd and cipher
#
# Needs cargo and socat; the SSH rows need root, /usr/sbin/sshd, ssh and
# ssh-keygen (skipped with a note otherwise); perf and unshare are optional.
# All traffic stays on loopback. Every process started is stopped at the end
# and the temporary directory removed. Prints the tables to stdout and
# writes them to target/bench/latest.md.

set -u -o pipefail
export LC_ALL=C

BENCH_BYTES=${BENCH_BYTES:-2G}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_BULK_ROUNDS=${BENCH_BULK_ROUNDS:-7}
BENCH_SECONDS=${BENCH_SECONDS:-2}
BENCH_LATENCY_RUNS=${BENCH_LATENCY_RUNS:-200}
BENCH_SERVICES=${BENCH_SERVICES:-10000}
BENCH_STREAMS=${BENCH_STREAMS:-1000}
BENCH_IDLE_SECONDS=${BENCH_IDLE_SECONDS:-60}
BENCH_SKIP_STATIC=${BENCH_SKIP_STATIC:-0}

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1

log() { printf '==> [%3d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() {
    printf 'bench: %s\n' "$*" >&2
    exit 1
}

to_bytes() {
    local value=${1^^}
    case $value in
    *[0-9]) ;;
    *K) value=$((${value%K} << 10)) ;;
    *M) value=$((${value%M} << 20)) ;;
    *G) value=$((${value%G} << 30)) ;;
    *) die "BENCH_BYTES=$1: give bytes, or a number with K, M or G" ;;
    esac
    [[ $value =~ ^[0-9]+$ ]] || die "BENCH_BYTES=$1: give bytes, or a number with K, M or G"
    echo "$value"
}

BYTES=$(to_bytes "$BENCH_BYTES") || exit 1
command -v socat >/dev/null || die "socat is needed (apt-get install socat)"
command -v cargo >/dev/null || die "cargo is needed"

log "building the release binary"
cargo build --release --quiet || die "cargo build --release failed"
BIN=$REPO/target/release/dipus

# 1,000 streams and 10,000 listeners need descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
note "descriptor limit: $(ulimit -n)"

TMP=$(mktemp -d /tmp/dipus-bench.XXXXXX) || die "cannot make a temporary directory"
chmod 755 "$TMP"
mkdir "$TMP/logs"
PIDS=()
SSH_READY=0

# Stops the process group `$1` leads (socat's forked children, sshd's
# sessions), politely first.
stop_group() {
    local pid=$1 i
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

# Stops a process that is not our child (a daemonized importer).
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    return 0
}

cleanup() {
    set +e
    trap - EXIT INT TERM
    local pidfile i
    for pidfile in "$TMP"/*.pid; do
        [[ -s $pidfile ]] && stop_pid "$(cat "$pidfile")"
    done
    if ((SSH_READY)); then
        $SSH -O exit -o ControlPath="$ROOT_S/root/.ssh-%C" -p "$SSH_PORT" root@127.0.0.1 2>/dev/null
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_group "${PIDS[i]}"
    done
    [[ ${PAYLOAD_DIR:-$TMP} != "$TMP" ]] && rm -rf "$PAYLOAD_DIR"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD… — runs CMD in a process group of its own, logging to
# $TMP/logs/NAME.log; its pid is in STARTED.
start() {
    local name=$1
    shift
    setsid "$@" >"$TMP/logs/$name.log" 2>&1 </dev/null &
    STARTED=$!
    PIDS+=("$STARTED")
}

# stop PID — stops one started process group and forgets it.
stop() {
    local pid=$1 i
    stop_group "$pid"
    for i in "${!PIDS[@]}"; do
        [[ ${PIDS[i]} == "$pid" ]] && unset 'PIDS[i]'
    done
    PIDS=("${PIDS[@]}")
}

# wait_for TEST… — until the test holds (10 s at most).
wait_for() {
    local i
    for ((i = 0; i < 1000; i++)); do
        "$@" && return 0
        sleep 0.01
    done
    return 1
}

is_socket() { [[ -S $1 ]]; }
listening_tcp() { ss -Hltn "sport = :$1" | grep -q .; }

# A socket file exists from bind() on, before listen(): socat's may refuse
# for an instant. Ready once a connection is accepted.
accepts() { [[ -S $1 ]] && socat -u /dev/null "UNIX-CONNECT:$1" 2>/dev/null; }

free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        listening_tcp "$port" || {
            echo "$port"
            return
        }
    done
}

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }

# field KEY — the value of KEY= in each line of stdin.
field() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p"; }
# The median of the numbers on stdin ("n/a" without any).
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else print v[int((NR + 1) / 2)] }'; }
total() { awk '{ s += $1 } END { print s + 0 }'; }
max_of() { sort -g | tail -1; }
isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
ratio() { if isnum "$1" && isnum "$2" && awk -v b="$2" 'BEGIN { exit !(b > 0) }'; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; else echo "n/a"; fi; }
round() { if isnum "$1"; then awk -v a="$1" 'BEGIN { printf "%.0f", a }'; else echo "$1"; fi; }
mib() { if isnum "$1"; then awk -v a="$1" 'BEGIN { printf "%.1f", a / 1024 }'; else echo "n/a"; fi; }
# verdict VALUE OP LIMIT — met, MISSED, or n/a.
verdict() {
    isnum "$1" || {
        echo "n/a"
        return
    }
    awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN {
        ok = (op == ">=") ? a >= b : (op == "<=") ? a <= b : (op == "<") ? a < b : (op == "==") ? a == b : 0
        print ok ? "met" : "MISSED" }'
}

BULK=()
SMALL=()
TARGETS=()
# target WHAT VALUE OP LIMIT SHOWN — records a target; its verdict in VERDICT.
# (Not for $(…): the record would stay in the subshell.)
target() {
    local what=$1 value=$2 op=$3 limit=$4 shown=$5
    VERDICT=$(verdict "$value" "$op" "$limit")
    TARGETS+=("| $what | $shown | $VERDICT |")
}

# bulk_row SECTION CASE RESULT REFERENCE RATIO TARGET VERDICT
bulk_row() { BULK+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"); }

# ------------------------------------------------------------------ clients

# runs NAME CMD… — runs CMD BENCH_RUNS times, its result lines to stdout.
# A run without a result line (nothing got through) ends the repetitions:
# the case is reported as failed, and the others need not wait for it.
runs() {
    local name=$1 i line
    shift
    for ((i = 0; i < BENCH_RUNS; i++)); do
        line=$(timeout 600 "$@" 2>>"$TMP/logs/$name.log" | tail -1)
        [[ -n $line ]] || break
        echo "$line"
    done
}

# throughputs NAME TARGET [NAME TARGET…] — `dipus bench send` to each
# TARGET, the cases taken in turn, BENCH_BULK_ROUNDS rounds: a slow spell of the
# shared machine then falls on every case of a comparison, not on one of
# them (run back to back, a case and its reference drifted apart by up
# to 20% between runs of the bench). Odd rounds take the cases in the
# reverse order, so that going first or last favours none of them. TPUTS[NAME]: the median MB/s;
# TPUT_ERRORS[NAME]: errors over all runs (a run that printed nothing is
# one); SAMPLES[NAME]: each round's MB/s ("-" for none), for `paired`.
# SEND_PREFIX: what the client runs under (taskset, to pin it).
declare -A TPUTS TPUT_ERRORS SAMPLES
SEND_PREFIX=()
throughputs() {
    local cases=("$@") i k name line sample
    local -A lines=()
    for ((i = 0; i < BENCH_BULK_ROUNDS; i++)); do
        for k in $(case_order "${#cases[@]}" "$i"); do
            name=${cases[k]}
            quiesce
            line=$(timeout 600 "${SEND_PREFIX[@]}" "$BIN" bench send --connect "${cases[k + 1]}" --bytes "$BYTES" 2>>"$TMP/logs/$name.log" | tail -1)
            [[ -n $line ]] && lines[$name]+="$line"$'\n'
            sample=$(field mbps <<<"$line")
            SAMPLES[$name]+="${sample:--} "
        done
    done
    for ((k = 0; k < ${#cases[@]}; k += 2)); do
        name=${cases[k]}
        line=${lines[$name]-}
        TPUT_ERRORS[$name]=$(($(field errors <<<"$line" | total) + BENCH_BULK_ROUNDS - $(field mbps <<<"$line" | total_lines)))
        TPUTS[$name]=$(field mbps <<<"$line" | median)
    done
}
total_lines() { grep -c . || true; }
# case_order COUNT ROUND — the even indexes below COUNT (each a NAME of a
# NAME TARGET list), ascending in even rounds and descending in odd ones.
case_order() {
    if (($2 % 2 == 0)); then seq 0 2 $(($1 - 2)); else seq $(($1 - 2)) -2 0; fi
}

# paired NAME REFERENCE — NAME's MB/s over REFERENCE's, round by round
# (see throughputs): PAIRED, their median; PAIRED_RANGE, "lowest–highest".
# Each ratio compares two runs made moments apart.
paired() {
    local -a subject=(${SAMPLES[$1]-}) reference=(${SAMPLES[$2]-})
    local i ratios=""
    for ((i = 0; i < ${#subject[@]}; i++)); do
        if isnum "${subject[i]}" && isnum "${reference[i]-}"; then
            ratios+=$(ratio "${subject[i]}" "${reference[i]}")$'\n'
        fi
    done
    PAIRED=$(grep . <<<"$ratios" | median)
    PAIRED_RANGE=$(grep . <<<"$ratios" | sort -g | awk 'NR == 1 { low = $1 } { high = $1 } END { if (NR) printf "%s–%s", low, high }')
}
# samples_median NAME — the median of NAME's SAMPLES, rounds without one left out.
samples_median() { tr ' ' '\n' <<<"${SAMPLES[$1]-}" | grep '^[0-9]' | median; }
# with_range RATIO — "RATIO×", with the rounds' range when there is one.
with_range() { if [[ -n $PAIRED_RANGE ]]; then echo "$1× ($PAIRED_RANGE)"; else echo "$1×"; fi; }

# whole_sample NAME INPUT OUTPUT CMD… — MB/s of BYTES through one whole
# process (startup included) reading INPUT, writing OUTPUT; nothing if it
# failed or the sink counted something else.
whole_sample() {
    local name=$1 input=$2 output=$3 start end
    shift 3
    start=$(now)
    timeout 600 "$@" <"$input" >"$output" 2>>"$TMP/logs/$name.log" || return 0
    end=$(now)
    if [[ $output == /dev/null ]] || [[ $(tr -d '\n' <"$output") == "$BYTES" ]]; then
        awk -v b="$BYTES" -v s="$(elapsed "$start" "$end")" 'BEGIN { printf "%.1f\n", b / s / 1e6 }'
    fi
}

# empty_seconds NAME CMD… — seconds CMD takes with nothing to send: a
# call's fixed cost. Nothing if it failed.
empty_seconds() {
    local name=$1 start end
    shift
    start=$(now)
    timeout 60 "$@" </dev/null >/dev/null 2>>"$TMP/logs/$name.log" || return 0
    end=$(now)
    elapsed "$start" "$end"
}

# transfer_mbps MBPS EMPTY_SECONDS — MB/s of BYTES over the time a whole
# process took (at MBPS) less a call's fixed cost; "-" when either is
# missing.
transfer_mbps() {
    if isnum "${1:-}" && isnum "${2:-}"; then
        awk -v b="$BYTES" -v r="$1" -v e="$2" 'BEGIN { t = b / (r * 1e6) - e; if (t > 0) printf "%.1f\n", b / t / 1e6; else print "-" }'
    else
        echo -
    fi
}
milliseconds() { if isnum "${1:-}"; then awk -v s="$1" 'BEGIN { printf "%.1f", s * 1000 }'; else echo n/a; fi; }

# whole_mbps NAME INPUT OUTPUT CMD… — the median of BENCH_RUNS whole_samples.
whole_mbps() {
    local i
    quiesce
    for ((i = 0; i < BENCH_RUNS; i++)); do
        whole_sample "$@"
    done | median
}

# per_run_us NAME CMD… — median µs per run of CMD (one byte in, one back),
# BENCH_LATENCY_RUNS runs in a row, process start and exit included.
per_run_us() {
    local name=$1 i j start end samples=() failed
    shift
    quiesce
    for ((i = 0; i < BENCH_RUNS; i++)); do
        failed=0
        start=$(now)
        for ((j = 0; j < BENCH_LATENCY_RUNS; j++)); do
            [[ $("$@" <"$ONE_BYTE" 2>>"$TMP/logs/$name.log") == x ]] || failed=1
        done
        end=$(now)
        ((failed)) || samples+=("$(awk -v s="$(elapsed "$start" "$end")" -v n="$BENCH_LATENCY_RUNS" 'BEGIN { printf "%.0f", s / n * 1e6 }')")
    done
    printf '%s\n' "${samples[@]}" | grep . | median
}

# quiesce — waits (30 s at most) until the machine is idle again, at least
# 90% over 0.2 s: what one case leaves winding down (socat children, ssh
# sessions) must not slow the next.
quiesce() {
    local i before after
    for ((i = 0; i < 150; i++)); do
        before=$(head -1 /proc/stat)
        sleep 0.2
        after=$(head -1 /proc/stat)
        awk -v a="$before" -v b="$after" 'BEGIN {
            n = split(a, x); split(b, y); total = 0
            for (k = 2; k <= n; k++) total += y[k] - x[k]
            idle = (y[5] - x[5]) + (y[6] - x[6])
            exit !(total > 0 && idle / total >= 0.9) }' && return 0
    done
    note "the machine did not settle; measuring anyway"
}

rss_kib() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status" 2>/dev/null; }
peak_kib() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status" 2>/dev/null; }
# Resets VmHWM to the current RSS, so the next peak is this case's.
reset_peak() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null; }
fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }

# ------------------------------------------------------------------ setup

ROOT_A=$TMP/a   # the "remote" host alpha: services and exporter
ROOT_B=$TMP/b   # host beta: the LAN import
ROOT_S=$TMP/s   # the ssh import (in <root>/root/)
SERVICES=$ROOT_A/exported/bench
install -d -m 1777 "$ROOT_A" "$ROOT_A/exported" "$SERVICES" "$ROOT_A/exported/many"
SINK=$SERVICES/sink.alpha..0
SOURCE=$SERVICES/source.alpha..0
ECHO=$SERVICES/echo.alpha..0
ONE_BYTE=$TMP/one-byte
printf x >"$ONE_BYTE"
# A real file in memory (tmpfs), not a sparse one: reading holes would be
# faster than any real data.
PAYLOAD_DIR=$TMP
if [[ -d /dev/shm ]] && (($(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') * 1024 > 2 * BYTES)); then
    PAYLOAD_DIR=$(mktemp -d /dev/shm/dipus-bench.XXXXXX) || PAYLOAD_DIR=$TMP
fi
PAYLOAD=$PAYLOAD_DIR/payload
head -c "$BYTES" /dev/zero >"$PAYLOAD" || die "cannot write $BYTES bytes to $PAYLOAD"
REQUEST=$TMP/request
echo "$BYTES" >"$REQUEST"

export DIPUS_HOSTNAME=alpha DIPUS_ROOT=$ROOT_A RUST_LOG=${RUST_LOG:-warn}

log "starting the services (dipus bench sink, source, echo) in $SERVICES"
# umask 0: the exporter offers only sockets that "other" may connect to.
for role in sink source echo; do
    start "$role" sh -c 'umask 000; exec "$@"' sh "$BIN" bench "$role" --listen "$SERVICES/$role.alpha..0"
    [[ $role == echo ]] && ECHO_PID=$STARTED
    [[ $role == sink ]] && SINK_PID=$STARTED
done
wait_for is_socket "$SINK" && wait_for is_socket "$SOURCE" && wait_for is_socket "$ECHO" || die "the bench servers did not start"

log "starting the one-hop proxies (dipus-local-proxy, socat)"
start hop-sink "$BIN" local-proxy "$SINK" hopsink/bench
start hop-echo "$BIN" local-proxy "$ECHO" hopecho/bench
HOP_ECHO_PID=$STARTED
HOP_SINK=$ROOT_A/local/bench/hopsink.alpha..0
HOP_ECHO=$ROOT_A/local/bench/hopecho.alpha..0
SOCAT1_SINK=$TMP/socat1-sink.sock
SOCAT1B_SINK=$TMP/socat1b-sink.sock
SOCAT1_ECHO=$TMP/socat1-echo.sock
start socat1-sink socat "UNIX-LISTEN:$SOCAT1_SINK,fork,backlog=512" "UNIX-CONNECT:$SINK"
start socat1b-sink socat -b 65536 "UNIX-LISTEN:$SOCAT1B_SINK,fork,backlog=512" "UNIX-CONNECT:$SINK"
start socat1-echo socat "UNIX-LISTEN:$SOCAT1_ECHO,fork,backlog=512" "UNIX-CONNECT:$ECHO"
for path in "$HOP_SINK" "$HOP_ECHO"; do wait_for is_socket "$path" || die "dipus-local-proxy did not start"; done
for path in "$SOCAT1_SINK" "$SOCAT1B_SINK" "$SOCAT1_ECHO"; do wait_for accepts "$path" || die "socat did not start"; done

log "starting the two-hop paths (dipus-exporter + dipus-import, socat over TCP)"
for attempt in 1 2 3; do
    SEP_PORT=$(free_port)
    start exporter "$BIN" exporter --port "$SEP_PORT" --bind 127.0.0.1 --allow 127.0.0.0/8
    EXPORTER=$STARTED
    wait_for listening_tcp "$SEP_PORT" && break
    stop "$EXPORTER"
    ((attempt < 3)) || die "dipus-exporter did not start: $(tail -3 "$TMP/logs/exporter.log")"
done
start import env DIPUS_ROOT="$ROOT_B" DIPUS_HOSTNAME=beta "$BIN" import -f --pidfile "$TMP/import.pid" \
    "sep://127.0.0.1:$SEP_PORT"
IMPORTER=$STARTED
IMP_SINK=$ROOT_B/imported/bench/sink.alpha..0
IMP_ECHO=$ROOT_B/imported/bench/echo.alpha..0
wait_for is_socket "$IMP_SINK" && wait_for is_socket "$IMP_ECHO" || die "dipus-import did not mirror the services"
SOCAT2_SINK=$TMP/socat2-sink.sock
SOCAT2_ECHO=$TMP/socat2-echo.sock
for role in sink echo; do
    # A free port may be taken before socat binds it: try another.
    for attempt in 1 2 3; do
        port=$(free_port)
        start "socat2-$role-tcp" socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr,backlog=512" \
            "UNIX-CONNECT:$SERVICES/$role.alpha..0"
        [[ $role == sink ]] && SOCAT2_TCP_PID=$STARTED
        wait_for listening_tcp "$port" && break
        stop "$STARTED"
        ((attempt < 3)) || die "socat TCP-LISTEN did not start: $(tail -3 "$TMP/logs/socat2-$role-tcp.log")"
    done
    start "socat2-$role-unix" socat "UNIX-LISTEN:$TMP/socat2-$role.sock,fork,backlog=512" "TCP:127.0.0.1:$port"
    [[ $role == sink ]] && SOCAT2_UNIX_PID=$STARTED
    wait_for accepts "$TMP/socat2-$role.sock" || die "socat UNIX-LISTEN did not start"
done

SSH_NOTE=""
if [[ $(id -u) -ne 0 ]]; then
    SSH_NOTE="skipped: needs root (sshd must switch users)"
elif ! [[ -x /usr/sbin/sshd ]] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
    SSH_NOTE="skipped: needs /usr/sbin/sshd, ssh and ssh-keygen"
fi
SSH_CIPHER=aes128-gcm@openssh.com
if [[ -z $SSH_NOTE ]]; then
    log "starting a throwaway sshd on 127.0.0.1 and the ssh paths (cipher $SSH_CIPHER)"
    mkdir -p "$TMP/ssh" /run/sshd
    ssh-keygen -q -N '' -t ed25519 -f "$TMP/ssh/host_key"
    ssh-keygen -q -N '' -t ed25519 -f "$TMP/ssh/client_key"
    cp "$TMP/ssh/client_key.pub" "$TMP/ssh/authorized_keys"
    SSH_PORT=$(free_port)
    cat >"$TMP/ssh/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $TMP/ssh/host_key
PidFile $TMP/ssh/sshd.pid
AuthorizedKeysFile $TMP/ssh/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowStreamLocalForwarding yes
PrintMotd no
UseDNS no
MaxStartups 1000
MaxSessions 1000
LogLevel ERROR
EOF
    start sshd /usr/sbin/sshd -D -e -f "$TMP/ssh/sshd_config"
    SSH="ssh -F /dev/null -i $TMP/ssh/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    SSH="$SSH -o LogLevel=ERROR -o BatchMode=yes -o IdentitiesOnly=yes -c $SSH_CIPHER"
    if ! wait_for listening_tcp "$SSH_PORT" || ! $SSH -p "$SSH_PORT" root@127.0.0.1 true 2>>"$TMP/logs/sshd.log"; then
        SSH_NOTE="skipped: the throwaway sshd did not let us in (see its log)"
    fi
fi
if [[ -z $SSH_NOTE ]]; then
    export DIPUS_SSH=$SSH
    # The remote side is host alpha's tree, reached through ssh.
    export DIPUS_REMOTE="env DIPUS_ROOT=$ROOT_A DIPUS_HOSTNAME=alpha $BIN"
    start ssh-import env DIPUS_ROOT="$ROOT_S" DIPUS_HOSTNAME=beta "$BIN" import -f --pidfile "$TMP/ssh-import.pid" \
        "ssh://root@127.0.0.1:$SSH_PORT"
    SSH_IMPORTER=$STARTED
    SSH_READY=1
    SSHI_SINK=$ROOT_S/root/bench/sink.alpha..0
    SSHI_ECHO=$ROOT_S/root/bench/echo.alpha..0
    L_SINK=$TMP/ssh-L-sink.sock
    L_ECHO=$TMP/ssh-L-echo.sock
    start ssh-L $SSH -p "$SSH_PORT" -N -o ExitOnForwardFailure=yes -L "$L_SINK:$SINK" -L "$L_ECHO:$ECHO" root@127.0.0.1
    SSH_FORWARD=$STARTED
    if ! { wait_for is_socket "$SSHI_SINK" && wait_for is_socket "$SSHI_ECHO"; }; then
        SSH_NOTE="skipped: the ssh import did not mirror the services (see its log)"
    elif ! { wait_for is_socket "$L_SINK" && wait_for is_socket "$L_ECHO"; }; then
        SSH_NOTE="skipped: ssh -L did not forward (see its log)"
    fi
fi
[[ -n $SSH_NOTE ]] && note "SSH rows $SSH_NOTE"

# Pinning, for the rows that place processes on CPUs of their own: CPUS,
# the CPUs this bench may use; ALL_CPUS, the same as a taskset list.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null; }
# cpu_list LIST — a taskset CPU list ("0-3,6") one CPU per line.
cpu_list() { tr ',' '\n' <<<"$1" | awk -F- '{ if (NF == 2) for (c = $1; c <= $2; c++) print c; else print $1 }'; }
CPUS=() ALL_CPUS=""
if command -v taskset >/dev/null; then
    ALL_CPUS=$(taskset -cp $$ | sed 's/.*: //')
    mapfile -t CPUS < <(cpu_list "$ALL_CPUS")
fi
# pin CPU PID… — every thread of each PID onto CPU (or back onto
# ALL_CPUS); fails if any could not be moved.
pin() {
    local cpu=$1 pid status=0
    shift
    for pid in "$@"; do
        taskset -a -p -c "$cpu" "$pid" >/dev/null || status=1
    done
    return $status
}

# ------------------------------------------------------------------ bulk

log "1. one hop, $BENCH_BYTES per run, $BENCH_BULK_ROUNDS rounds, cases in turn"
throughputs direct "$SINK" hop "$HOP_SINK" socat1 "$SOCAT1_SINK" socat1b "$SOCAT1B_SINK"
DIRECT=${TPUTS[direct]} DIRECT_ERR=${TPUT_ERRORS[direct]}
HOP=${TPUTS[hop]} HOP_ERR=${TPUT_ERRORS[hop]}
SOCAT1=${TPUTS[socat1]} SOCAT1_ERR=${TPUT_ERRORS[socat1]}
SOCAT1B=${TPUTS[socat1b]} SOCAT1B_ERR=${TPUT_ERRORS[socat1b]}

# with_errors FIGURE ERRORS — "FIGURE", or "FIGURE (N errors)".
with_errors() { if [[ $2 == 0 ]]; then echo "$1"; else echo "$1 ($2 errors)"; fi; }

bulk_row 1 "direct UNIX connection (no relay)" "$(with_errors "$(round "$DIRECT") MB/s" "$DIRECT_ERR")" "—" "—" "—" ""
paired hop direct
r=$PAIRED
target "bulk, one hop vs direct" "$r" ">=" 0.8 "$(with_range "$r") (≥ 0.8×)"
bulk_row 1 "**dipus one hop** (dipus-local-proxy: UNIX → relay → UNIX)" "$(with_errors "$(round "$HOP") MB/s" "$HOP_ERR")" "direct" "$(with_range "$r")" "≥ 0.8×" "$VERDICT"
paired hop socat1
r=$PAIRED
target "bulk, one hop vs socat default" "$r" ">=" 2 "$(with_range "$r") (≥ 2×)"
bulk_row 1 "″" "" "socat default" "$(with_range "$r")" "≥ 2×" "$VERDICT"
bulk_row 1 "socat UNIX-LISTEN,fork,backlog=512 UNIX-CONNECT (default 8 KiB buffer)" "$(with_errors "$(round "$SOCAT1") MB/s" "$SOCAT1_ERR")" "direct" "$(ratio "$SOCAT1" "$DIRECT")×" "" ""
bulk_row 1 "socat -b 65536, same" "$(with_errors "$(round "$SOCAT1B") MB/s" "$SOCAT1B_ERR")" "direct" "$(ratio "$SOCAT1B" "$DIRECT")×" "" ""
paired hop socat1b
bulk_row 1 "dipus one hop vs socat -b 65536" "" "socat -b 65536" "$(with_range "$PAIRED")" "" ""

log "2. TCP two-hop"
# The TCP leg alone, the bench client sending straight into the exporter
# (no importer): what two hops could reach if the importer cost nothing.
throughputs import "$IMP_SINK" socat2 "$SOCAT2_SINK" tcp-leg "sep://127.0.0.1:$SEP_PORT/bench/sink"
TWO=${TPUTS[import]} TWO_ERR=${TPUT_ERRORS[import]}
SOCAT2=${TPUTS[socat2]} SOCAT2_ERR=${TPUT_ERRORS[socat2]}
TCP_LEG=${TPUTS[tcp-leg]} TCP_LEG_ERR=${TPUT_ERRORS[tcp-leg]}
paired import socat2
r=$PAIRED
target "bulk, TCP two-hop vs socat two-hop, placed by the scheduler" "$r" ">=" 5 "$(with_range "$r") (≥ 5×)"
bulk_row 2 "**dipus two hops** (dipus-import of dipus-exporter on 127.0.0.1: UNIX → TCP → UNIX; placed by the scheduler)" "$(with_errors "$(round "$TWO") MB/s" "$TWO_ERR")" "socat two hops" "$(with_range "$r")" "≥ 5×" "$VERDICT"
bulk_row 2 "″" "" "direct" "$(ratio "$TWO" "$DIRECT")×" "" ""
bulk_row 2 "socat two hops (UNIX-LISTEN → TCP → TCP-LISTEN → UNIX-CONNECT)" "$(with_errors "$(round "$SOCAT2") MB/s" "$SOCAT2_ERR")" "direct" "$(ratio "$SOCAT2" "$DIRECT")×" "" ""
paired tcp-leg socat2
bulk_row 2 "the TCP leg alone: dipus bench send straight into dipus-exporter (no importer; what two hops would reach if the importer cost nothing)" "$(with_errors "$(round "$TCP_LEG") MB/s" "$TCP_LEG_ERR")" "socat two hops" "$(with_range "$PAIRED")" "" ""
paired import tcp-leg
bulk_row 2 "dipus two hops vs the TCP leg alone" "" "TCP leg alone" "$(with_range "$PAIRED")" "" ""

# Two hosts of one CPU each: the client and the importing side (importer,
# socat UNIX-LISTEN) on one CPU, the exporting side (exporter, socat
# TCP-LISTEN, the sink) on the other, as the path is deployed. Left to
# the scheduler, four busy processes on two CPUs land either way from run
# to run, and where the importer lands alone every byte is copied cold on
# both sides of it: the same binary took 0.44 s or 0.88 s for 2 GiB.
TWO_HOSTS="not measured: needs taskset and two CPUs"
if ((${#CPUS[@]} >= 2)); then
    log "2. TCP two-hop, as two hosts of one CPU each"
    if pin "${CPUS[0]}" "$IMPORTER" "$SOCAT2_UNIX_PID" && pin "${CPUS[1]}" "$EXPORTER" "$SOCAT2_TCP_PID" "$SINK_PID"; then
        SEND_PREFIX=(taskset -c "${CPUS[0]}")
        throughputs import-2h "$IMP_SINK" socat2-2h "$SOCAT2_SINK"
        SEND_PREFIX=()
        TWO_HOSTS=""
    else
        TWO_HOSTS="not measured: taskset could not pin the two sides"
    fi
    pin "$ALL_CPUS" "$IMPORTER" "$SOCAT2_UNIX_PID" "$EXPORTER" "$SOCAT2_TCP_PID" "$SINK_PID" || true
fi
if [[ -z $TWO_HOSTS ]]; then
    paired import-2h socat2-2h
    r=$PAIRED
    target "bulk, TCP two-hop vs socat two-hop, as two hosts of one CPU each" "$r" ">=" 5 "$(with_range "$r") (≥ 5×)"
    bulk_row 2 "**dipus two hops, as two hosts of one CPU each** (taskset: client and importer on one CPU, exporter and sink on the other)" "$(with_errors "$(round "${TPUTS[import-2h]}") MB/s" "${TPUT_ERRORS[import-2h]}")" "socat two hops, placed the same" "$(with_range "$r")" "≥ 5×" "$VERDICT"
    bulk_row 2 "socat two hops, as two hosts of one CPU each (client and socat UNIX-LISTEN on one CPU, socat TCP-LISTEN and sink on the other)" "$(with_errors "$(round "${TPUTS[socat2-2h]}") MB/s" "${TPUT_ERRORS[socat2-2h]}")" "socat two hops, unplaced" "$(ratio "${TPUTS[socat2-2h]}" "$SOCAT2")×" "" ""
else
    bulk_row 2 "dipus two hops, as two hosts of one CPU each" "$TWO_HOSTS" "" "" "" ""
fi

if [[ -z $SSH_NOTE ]]; then
    log "3. over SSH ($SSH_CIPHER)"
    throughputs ssh-L "$L_SINK" ssh-import "$SSHI_SINK"
    SSH_L=${TPUTS[ssh-L]} SSH_L_ERR=${TPUT_ERRORS[ssh-L]}
    SSH_IMP=${TPUTS[ssh-import]} SSH_IMP_ERR=${TPUT_ERRORS[ssh-import]}
    # In turn and in alternating order, as throughputs does. Each round
    # also times an empty call of each (nothing to send: the fixed cost of
    # a call) and so the transfer alone, the whole process's time less
    # that.
    dcat_sample() {
        local name=$1 root=$2 target=$3 sample empty
        quiesce
        sample=$(DIPUS_ROOT=$root whole_sample "$name" "$PAYLOAD" "$TMP/out" "$BIN" cat "$target")
        SAMPLES[$name]+="${sample:--} "
        empty=$(DIPUS_ROOT=$root empty_seconds "$name" "$BIN" cat "$target")
        SAMPLES[$name-empty]+="${empty:--} "
        SAMPLES[$name-transfer]+="$(transfer_mbps "$sample" "$empty") "
    }
    dcat_cases=(dcat-ssh "$ROOT_S" "ssh://root@127.0.0.1:$SSH_PORT/bench/sink" dcat-L "$ROOT_A" "$L_SINK")
    for ((i = 0; i < BENCH_BULK_ROUNDS; i++)); do
        if ((i % 2 == 0)); then order=(0 3); else order=(3 0); fi
        for k in "${order[@]}"; do
            dcat_sample "${dcat_cases[@]:k:3}"
        done
    done
    DCAT_SSH=$(samples_median dcat-ssh)
    DCAT_L=$(samples_median dcat-L)
    bulk_row 3 "ssh -L local.sock:service.sock (dipus bench send)" "$(with_errors "$(round "$SSH_L") MB/s" "$SSH_L_ERR")" "direct" "$(ratio "$SSH_L" "$DIRECT")×" "" ""
    paired ssh-import ssh-L
    r=$PAIRED
    target "bulk, ssh import vs ssh -L" "$r" ">=" 0.9 "$(with_range "$r") (≥ 0.9×)"
    bulk_row 3 "**dipus ssh import** (dipus bench send)" "$(with_errors "$(round "$SSH_IMP") MB/s" "$SSH_IMP_ERR")" "ssh -L" "$(with_range "$r")" "≥ 0.9×" "$VERDICT"
    # What one more session on the shared ssh connection costs: dcat
    # ssh:// opens one per request (an ssh import only where sshd refuses
    # to forward), and each runs the remote user's login shell.
    quiesce
    start_time=$(now)
    for ((i = 0; i < 20; i++)); do
        $SSH -o ControlPath="$ROOT_S/root/.ssh-%C" -p "$SSH_PORT" root@127.0.0.1 true 2>>"$TMP/logs/ssh-session.log"
    done
    SESSION_MS=$(awk -v s="$(elapsed "$start_time" "$(now)")" 'BEGIN { printf "%.1f", s / 20 * 1000 }')
    bulk_row 3 "one more ssh session on the shared connection (ssh … true: what dcat ssh:// pays per request, remote shell start-up included)" "$SESSION_MS ms" "" "" "" ""
    bulk_row 3 "dcat into ssh -L's socket (whole process)" "$(round "$DCAT_L") MB/s" "ssh -L" "$(ratio "$DCAT_L" "$SSH_L")×" "" ""
    paired dcat-ssh dcat-L
    r=$PAIRED
    target "bulk, dcat ssh:// vs dcat via ssh -L" "$r" ">=" 0.9 "$(with_range "$r") (≥ 0.9×)"
    bulk_row 3 "**dcat ssh://…/sink** (whole process)" "$(round "$DCAT_SSH") MB/s" "dcat via ssh -L" "$(with_range "$r")" "≥ 0.9×" "$VERDICT"
    empty_ssh=$(samples_median dcat-ssh-empty)
    empty_l=$(samples_median dcat-L-empty)
    bulk_row 3 "″ its fixed cost: an empty call (one ssh session for FORWARD, ssh -G beside it, then forward, cancel and check asked of the master)" "$(milliseconds "$empty_ssh") ms" "dcat via ssh -L, empty" "$(milliseconds "$empty_l") ms" "" ""
    paired dcat-ssh-transfer dcat-L-transfer
    transfer_ssh=$(samples_median dcat-ssh-transfer)
    bulk_row 3 "″ the transfer alone (whole process less an empty call)" "$(round "$transfer_ssh") MB/s" "dcat via ssh -L, likewise" "$(with_range "$PAIRED")" "" ""
else
    bulk_row 3 "over SSH" "$SSH_NOTE" "" "" "" ""
fi

log "4. dcat vs socat as the client"
DCAT_TX=$(whole_mbps dcat-tx "$PAYLOAD" "$TMP/out" "$BIN" cat "$SINK")
SOCAT_TX=$(whole_mbps socat-tx "$PAYLOAD" "$TMP/out" socat -t 60 - "UNIX-CONNECT:$SINK")
DCAT_RX=$(whole_mbps dcat-rx "$REQUEST" /dev/null "$BIN" cat "$SOURCE")
SOCAT_RX=$(whole_mbps socat-rx "$REQUEST" /dev/null socat -t 60 - "UNIX-CONNECT:$SOURCE")
r=$(ratio "$DCAT_TX" "$SOCAT_TX")
target "dcat client sending vs socat" "$r" ">=" 1 "${r}× (≥ 1×)"
bulk_row 4 "**dcat SINK < file** (sendfile; whole process)" "$(round "$DCAT_TX") MB/s" "socat - UNIX-CONNECT < file" "${r}×" "≥ 1×" "$VERDICT"
bulk_row 4 "socat - UNIX-CONNECT:SINK < file" "$(round "$SOCAT_TX") MB/s" "" "" "" ""
r=$(ratio "$DCAT_RX" "$SOCAT_RX")
target "dcat client receiving vs socat" "$r" ">=" 1 "${r}× (≥ 1×)"
bulk_row 4 "**dcat SOURCE > /dev/null** (whole process)" "$(round "$DCAT_RX") MB/s" "socat - UNIX-CONNECT > /dev/null" "${r}×" "≥ 1×" "$VERDICT"
bulk_row 4 "socat - UNIX-CONNECT:SOURCE > /dev/null" "$(round "$SOCAT_RX") MB/s" "" "" "" ""

log "5. latency: $BENCH_LATENCY_RUNS whole-process runs of connect + one byte each way + close"
DCAT_US=$(per_run_us dcat-latency "$BIN" cat "$ECHO")
SOCAT_US=$(per_run_us socat-latency socat - "UNIX-CONNECT:$ECHO")
r=$(ratio "$DCAT_US" "$SOCAT_US")
target "dcat whole-process latency vs socat" "$r" "<=" 1 "${r}× (≤ 1×)"
bulk_row 5 "**dcat ECHO < 1 byte** (fork + exec + connect + 1 byte each way + exit)" "$DCAT_US µs/run" "socat" "${r}×" "≤ 1×" "$VERDICT"
bulk_row 5 "socat - UNIX-CONNECT:ECHO < 1 byte" "$SOCAT_US µs/run" "" "" "" ""
# The proxies' added latency per connection comes from the connect rows of
# the small-exchange table below (same run), filled in after it.

# ------------------------------------------------------------------ scale, part 1

# Before the small exchanges: 500 ssh sessions take a while to wind down.
log "6. $BENCH_STREAMS concurrent streams through one exporter (via the import), $BENCH_BYTES in all"
stream_lines=""
stream_import_peak=0
stream_export_peak=0
for ((i = 0; i < BENCH_RUNS; i++)); do
    quiesce
    reset_peak "$IMPORTER"
    reset_peak "$EXPORTER"
    stream_lines+=$(timeout 600 "$BIN" bench send --connect "$IMP_SINK" --connections "$BENCH_STREAMS" --bytes "$BYTES" 2>>"$TMP/logs/streams.log" | tail -1)$'\n'
    peak=$(peak_kib "$IMPORTER")
    ((${peak:-0} > stream_import_peak)) && stream_import_peak=$peak
    peak=$(peak_kib "$EXPORTER")
    ((${peak:-0} > stream_export_peak)) && stream_export_peak=$peak
done
STREAMS_MBPS=$(field mbps <<<"$stream_lines" | median)
STREAMS_ERR=$(field errors <<<"$stream_lines" | total)
bulk_row 6 "$BENCH_STREAMS concurrent streams, import → exporter → sink, total" "$(with_errors "$(round "$STREAMS_MBPS") MB/s" "$STREAMS_ERR")" "one stream, same path" "$(ratio "$STREAMS_MBPS" "$TWO")×" "" ""
r=$(mib "$stream_export_peak")
target "$BENCH_STREAMS streams: exporter RSS" "$r" "<" 64 "$r MiB (< 64 MiB)"
bulk_row 6 "″ exporter peak RSS" "$r MiB" "" "" "< 64 MiB" "$VERDICT"
r=$(mib "$stream_import_peak")
target "$BENCH_STREAMS streams: importer RSS" "$r" "<" 64 "$r MiB (< 64 MiB)"
bulk_row 6 "″ importer peak RSS" "$r MiB" "" "" "< 64 MiB" "$VERDICT"

# ------------------------------------------------------------------ small exchanges

declare -A RPS P50 P99 RERR CPS CP50 CP99 CERR
PATHS=(direct hop socat1 import socat2)
declare -A LABEL=(
    [direct]="direct"
    [hop]="**dipus one hop** (local-proxy)"
    [socat1]="socat one hop (backlog=512)"
    [import]="**dipus two hops** (import ← exporter, TCP)"
    [socat2]="socat two hops (TCP)"
    [ssh-import]="**dipus ssh import**"
    [ssh-L]="ssh -L"
)
declare -A ECHO_OF=([direct]=$ECHO [hop]=$HOP_ECHO [socat1]=$SOCAT1_ECHO [import]=$IMP_ECHO [socat2]=$SOCAT2_ECHO)
if [[ -z $SSH_NOTE ]]; then
    # ssh -L first: what 500 ssh sessions leave behind must not weigh on it.
    PATHS+=(ssh-L ssh-import)
    ECHO_OF[ssh-import]=$SSHI_ECHO
    ECHO_OF[ssh-L]=$L_ECHO
fi
IMPORT_FDS=n/a IMPORT_PEAK=n/a EXPORT_FDS=n/a EXPORT_PEAK=n/a

# watch_fds FILE PID… — the most descriptors each PID held while this runs
# (every 0.1 s), written to FILE at the end.
watch_fds() {
    local file=$1 pid count
    shift
    declare -A most
    trap 'for pid in "${!most[@]}"; do echo "$pid ${most[$pid]}"; done >"$file"; exit 0' TERM
    while :; do
        for pid in "$@"; do
            count=$(fds "$pid")
            ((count > ${most[$pid]:-0})) && most[$pid]=$count
        done
        sleep 0.1
    done
}

for path in "${PATHS[@]}"; do
    for n in 1 50 500; do
        log "small exchanges: ${path} at N=$n (rr ${BENCH_SECONDS}s, connect ${BENCH_SECONDS}s, $BENCH_RUNS runs each)"
        watcher=""
        if [[ $path == import && $n == 500 ]]; then
            reset_peak "$IMPORTER"
            reset_peak "$EXPORTER"
            watch_fds "$TMP/fds" "$IMPORTER" "$EXPORTER" &
            watcher=$!
        fi
        quiesce
        lines=$(runs "rr-$path-$n" "$BIN" bench rr --connect "${ECHO_OF[$path]}" --connections "$n" --seconds "$BENCH_SECONDS")
        if [[ -n $watcher ]]; then
            kill -TERM "$watcher"
            wait "$watcher"
            IMPORT_PEAK=$(peak_kib "$IMPORTER")
            EXPORT_PEAK=$(peak_kib "$EXPORTER")
            IMPORT_FDS=$(awk -v p="$IMPORTER" '$1 == p { print $2 }' "$TMP/fds")
            EXPORT_FDS=$(awk -v p="$EXPORTER" '$1 == p { print $2 }' "$TMP/fds")
            IMPORT_IDLE_FDS=$(fds "$IMPORTER")
            EXPORT_IDLE_FDS=$(fds "$EXPORTER")
        fi
        RPS[$path,$n]=$(field rps <<<"$lines" | median)
        P50[$path,$n]=$(field p50_us <<<"$lines" | median)
        P99[$path,$n]=$(field p99_us <<<"$lines" | median)
        RERR[$path,$n]=$(field errors <<<"$lines" | total)
        [[ $(field rps <<<"$lines" | wc -l) -eq $BENCH_RUNS ]] || RERR[$path,$n]="${RERR[$path,$n]} + a run failed"
        quiesce
        lines=$(runs "connect-$path-$n" "$BIN" bench connect --connect "${ECHO_OF[$path]}" --connections "$n" --seconds "$BENCH_SECONDS")
        CPS[$path,$n]=$(field cps <<<"$lines" | median)
        CP50[$path,$n]=$(field p50_us <<<"$lines" | median)
        CP99[$path,$n]=$(field p99_us <<<"$lines" | median)
        CERR[$path,$n]=$(field errors <<<"$lines" | total)
        [[ $(field cps <<<"$lines" | wc -l) -eq $BENCH_RUNS ]] || CERR[$path,$n]="${CERR[$path,$n]} + a run failed"
    done
done

# The one-hop ceiling: the relay on a core of its own and the client and
# echo server on another, so that only the relay's own work limits it,
# and what each exchange costs the relay and the echo server in CPU time.
CEILING="not measured: needs taskset and two cores"
if ((${#CPUS[@]} >= 2)); then
    log "small exchanges: one hop at N=50, the relay on a core of its own"
    line="" pinned=0
    if pin "${CPUS[1]}" "$HOP_ECHO_PID" && pin "${CPUS[0]}" "$ECHO_PID"; then
        pinned=1
        quiesce
        relay_before=$(cpu_ticks "$HOP_ECHO_PID") echo_before=$(cpu_ticks "$ECHO_PID") start_time=$(now)
        line=$(timeout 600 taskset -c "${CPUS[0]}" "$BIN" bench rr --connect "$HOP_ECHO" --connections 50 --seconds "$BENCH_SECONDS" 2>>"$TMP/logs/rr-ceiling.log" | tail -1)
        relay_after=$(cpu_ticks "$HOP_ECHO_PID") echo_after=$(cpu_ticks "$ECHO_PID") wall=$(elapsed "$start_time" "$(now)")
    fi
    pin "$ALL_CPUS" "$HOP_ECHO_PID" "$ECHO_PID"
    requests=$(field requests <<<"$line")
    if isnum "${requests:-}" && ((requests > 0)); then
        CEILING=$(awk -v rps="$(field rps <<<"$line")" -v direct="${RPS[direct,50]}" -v hop="${RPS[hop,50]}" \
            -v n="$requests" -v wall="$wall" -v hz="$(getconf CLK_TCK)" \
            -v relay="$((relay_after - relay_before))" -v echo_="$((echo_after - echo_before))" 'BEGIN {
            printf "%d req/s, %s× direct (%s× the one hop above), errors %s; ", rps, of(rps, direct), of(rps, hop), "ERRORS"
            printf "the relay busy %d%% of its core, %.1f µs of CPU per exchange (two receives and two sends); ", 100 * relay / hz / wall, relay / hz * 1e6 / n
            printf "the echo server %.1f µs (one of each)", echo_ / hz * 1e6 / n }
            function of(a, b) { return (b + 0 > 0) ? sprintf("%.2f", a / b) : "n/a" }')
        CEILING=${CEILING/ERRORS/$(field errors <<<"$line")}
    elif ((pinned)); then
        CEILING="the run failed (see rr-ceiling.log)"
    else
        CEILING="not measured: taskset could not pin the relay and the echo server"
    fi
fi

declare -A REFERENCE=([hop]=socat1 [import]=socat2 [ssh-import]=ssh-L)
for path in "${PATHS[@]}"; do
    for n in 1 50 500; do
        key=$path,$n
        reference=${REFERENCE[$path]:-}
        rr_direct=$(ratio "${RPS[$key]}" "${RPS[direct,$n]}")
        cps_direct=$(ratio "${CPS[$key]}" "${CPS[direct,$n]}")
        rr_ref="" cps_ref="" targets=()
        if [[ -n $reference ]]; then
            rr_ref="$(ratio "${RPS[$key]}" "${RPS[$reference,$n]}")× ${LABEL[$reference]}"
            cps_ref="$(ratio "${CPS[$key]}" "${CPS[$reference,$n]}")× ${LABEL[$reference]}"
        fi
        if [[ $path == hop && $n == 50 ]]; then
            r=$(ratio "${RPS[$key]}" "${RPS[direct,$n]}")
            target "small, one hop N=50 vs direct" "$r" ">=" 0.5 "${r}× (≥ 0.5×)"
            targets+=("rr ≥ 0.5× direct: $VERDICT")
            r=$(ratio "${RPS[$key]}" "${RPS[socat1,$n]}")
            target "small, one hop N=50 vs socat one hop" "$r" ">=" 1.5 "${r}× (≥ 1.5×)"
            targets+=("rr ≥ 1.5× socat: $VERDICT")
        fi
        if [[ $path == import ]]; then
            if [[ $n == 50 ]]; then
                r=$(ratio "${RPS[$key]}" "${RPS[socat2,$n]}")
                target "small, two-hop N=50 vs socat two-hop" "$r" ">=" 2 "${r}× (≥ 2×)"
                targets+=("rr ≥ 2× socat: $VERDICT")
            fi
            r=$(ratio "${CPS[$key]}" "${CPS[socat2,$n]}")
            target "connection setup through an import, N=$n, vs socat two-hop" "$r" ">=" 2 "${r}× (≥ 2×)"
            targets+=("setup ≥ 2× socat: $VERDICT")
            if [[ $n == 500 ]]; then
                errors=$(awk -v a="${RERR[$key]}" 'BEGIN { print (a ~ /^[0-9]+$/) ? a : "n/a" }')
                target "N=500 through an import: errors" "$errors" "==" 0 "$errors errors (0)"
                targets+=("0 errors: $VERDICT")
                p99_ms=$(awk -v a="${P99[$key]}" 'BEGIN { if (a ~ /^[0-9]+$/) printf "%.1f", a / 1000; else print "n/a" }')
                target "N=500 through an import: p99" "$p99_ms" "<" 50 "$p99_ms ms (< 50 ms)"
                targets+=("p99 < 50 ms: $VERDICT")
            fi
        fi
        target_text=$(
            IFS=';'
            echo "${targets[*]:-}"
        )
        SMALL+=("| ${LABEL[$path]} | $n | $(round "${RPS[$key]}") | ${P50[$key]} | ${P99[$key]} | ${RERR[$key]} | ${rr_direct}× | $rr_ref | $(round "${CPS[$key]}") | ${CP99[$key]} | ${CERR[$key]} | ${cps_direct}× | $cps_ref | ${target_text//;/; } |")
    done
done
SMALL+=("")
r=$(mib "$IMPORT_PEAK")
target "N=500: importer RSS" "$r" "<" 32 "$r MiB (< 32 MiB)"
SMALL+=("Importer at N=500 (rr through the import): peak RSS $r MiB (< 32 MiB: $VERDICT); most descriptors $IMPORT_FDS, ${IMPORT_IDLE_FDS:-n/a} just after.  ")
r=$(mib "$EXPORT_PEAK")
target "N=500: exporter RSS" "$r" "<" 32 "$r MiB (< 32 MiB)"
SMALL+=("Exporter at N=500: peak RSS $r MiB (< 32 MiB: $VERDICT); most descriptors $EXPORT_FDS, ${EXPORT_IDLE_FDS:-n/a} just after.  ")
SMALL+=("One hop at N=50 with the relay on a core of its own (taskset: the relay on one CPU, client and echo server on another): $CEILING.")

# Section 5, continued: what each proxy adds to one connection's setup.
for path in hop import socat1 socat2 ssh-import ssh-L; do
    [[ -n ${CP50[$path,1]:-} ]] || continue
    added=$(awk -v a="${CP50[$path,1]}" -v b="${CP50[direct,1]}" 'BEGIN { if (a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/) print a - b; else print "n/a" }')
    bulk_row 5 "added per connection by ${LABEL[$path]} (dipus bench connect, N=1, p50)" "+$added µs" "direct ${CP50[direct,1]} µs" "$(ratio "${CP50[$path,1]}" "${CP50[direct,1]}")×" "" ""
done

# ------------------------------------------------------------------ scale

# The rest measures the exporter's tree and dipusd alone, on a quiet machine.
stop "$IMPORTER"
if [[ -z $SSH_NOTE ]]; then
    stop "$SSH_IMPORTER"
    stop "$SSH_FORWARD"
fi
quiesce

log "6. $BENCH_SERVICES services: dls, and an import mirroring them"
start many sh -c 'umask 000; exec "$@"' sh "$BIN" bench echo --count "$BENCH_SERVICES" \
    --listen "$ROOT_A/exported/many/s{}.alpha..0"
MANY=$STARTED
wait_for is_socket "$ROOT_A/exported/many/s$((BENCH_SERVICES - 1)).alpha..0" ||
    wait_for is_socket "$ROOT_A/exported/many/s$((BENCH_SERVICES - 1)).alpha..0" ||
    die "$BENCH_SERVICES listeners did not appear"
quiesce
listed=$("$BIN" ls -1 | wc -l)
samples=()
for ((i = 0; i < BENCH_RUNS; i++)); do
    start_time=$(now)
    "$BIN" ls >/dev/null 2>>"$TMP/logs/dls.log"
    samples+=("$(awk -v s="$(elapsed "$start_time" "$(now)")" 'BEGIN { printf "%.1f", s * 1000 }')")
done
DLS_MS=$(printf '%s\n' "${samples[@]}" | median)
target "dls on $listed services" "$DLS_MS" "<" 100 "$DLS_MS ms (< 100 ms)"
bulk_row 6 "dls with $listed services (whole process)" "$DLS_MS ms" "" "" "< 100 ms" "$VERDICT"
samples=()
mirrored=n/a
for ((i = 0; i < BENCH_RUNS; i++)); do
    root=$TMP/mirror$i
    quiesce
    start_time=$(now)
    if DIPUS_ROOT=$root DIPUS_HOSTNAME=gamma timeout 300 "$BIN" import --pidfile "$TMP/mirror$i.pid" \
        "sep://127.0.0.1:$SEP_PORT" 2>>"$TMP/logs/mirror.log"; then
        end_time=$(now)
        mirrored=$(find "$root/imported" -type s | wc -l)
        ((mirrored >= BENCH_SERVICES)) && samples+=("$(elapsed "$start_time" "$end_time")")
    fi
    [[ -s $TMP/mirror$i.pid ]] && stop_pid "$(cat "$TMP/mirror$i.pid")"
    rm -f "$TMP/mirror$i.pid"
done
MIRROR_S=$(printf '%s\n' "${samples[@]}" | grep . | median)
bulk_row 6 "dipus-import mirroring $mirrored services (until it returns, synced)" "$(awk -v a="$MIRROR_S" 'BEGIN { if (a ~ /^[0-9.]+$/) printf "%.2f s", a; else print a }')" "" "" "" ""
stop "$MANY"

# ------------------------------------------------------------------ footprint

log "7. footprint"
if [[ $BENCH_SKIP_STATIC == 1 ]]; then
    STATIC_SIZE=n/a
    STATIC_TEXT="n/a (BENCH_SKIP_STATIC=1)"
else
    static_out=$(make -s static 2>&1)
    STATIC_SIZE=$(sed -n 's/^[^ ]*: \([0-9][0-9]*\) bytes.*/\1/p' <<<"$static_out" | head -1)
    [[ -n $STATIC_SIZE ]] || STATIC_SIZE=n/a
    STATIC_TEXT="$STATIC_SIZE bytes"
    [[ $STATIC_SIZE == n/a ]] && { STATIC_TEXT="n/a (make static failed; see below)"; note "$static_out"; }
fi
target "static binary size" "$STATIC_SIZE" "<" 1048576 "$STATIC_TEXT (< 1048576)"
bulk_row 7 "static binary (make static)" "$STATIC_TEXT" "" "" "< 1 MiB" "$VERDICT"

: >"$TMP/services"
ANNOUNCE_PER_MINUTE=12 # the default ttl of 15 s: an announcement every 5 s
# idle_daemon BINARY — starts dipusd from BINARY with an empty tree and no
# services; its pid in DAEMON, where it runs in WHERE.
idle_daemon() {
    rm -rf "$TMP/d"
    if command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
        # A network namespace of its own with only loopback: the advertiser's
        # broadcasts stay off the machine's network.
        start dipusd env DIPUS_ROOT="$TMP/d" DIPUS_HOSTNAME=idle unshare -n sh -c 'ip link set lo up && exec "$@"' sh \
            "$1" daemon --services "$TMP/services"
        WHERE="in a namespace with only loopback"
    else
        start dipusd env DIPUS_ROOT="$TMP/d" DIPUS_HOSTNAME=idle "$1" daemon --no-discovery --services "$TMP/services" \
            --bind 127.0.0.1 --port "$(free_port)"
        WHERE="--no-discovery (no unshare here)"
    fi
    DAEMON=$STARTED
    sleep 3
}
# The deployed binary is the static one; the release build (glibc, shared
# libraries mapped) is shown beside it.
STATIC_BIN=$(sed -n 's/^\([^ ]*\): [0-9][0-9]* bytes.*/\1/p' <<<"${static_out:-}" | head -1)
[[ -z $STATIC_BIN || $STATIC_BIN == /* ]] || STATIC_BIN=$REPO/$STATIC_BIN
if [[ -n $STATIC_BIN && -x $STATIC_BIN ]]; then
    idle_daemon "$BIN"
    RELEASE_RSS=$(mib "$(rss_kib "$DAEMON")")
    stop "$DAEMON"
    idle_daemon "$STATIC_BIN"
    which="static binary; the release build: $RELEASE_RSS MiB"
else
    idle_daemon "$BIN"
    which="release build; no static binary"
fi
r=$(mib "$(rss_kib "$DAEMON")")
target "idle dipusd RSS" "$r" "<" 2 "$r MiB (< 2 MiB)"
bulk_row 7 "idle dipusd RSS, after 3 s ($which; $WHERE)" "$r MiB" "" "" "< 2 MiB" "$VERDICT"
switches() { awk '/^voluntary_ctxt_switches/ { v = $2 } /^nonvoluntary_ctxt_switches/ { n = $2 } END { print v + n }' "/proc/$1/status"; }
before=$(switches "$DAEMON")
WAKEUPS=n/a
how="context switches"
if command -v perf >/dev/null && perf stat -e 'syscalls:sys_enter_epoll_wait' -x, -- true >/dev/null 2>&1; then
    counts=$(perf stat -x, -e 'syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait' -p "$DAEMON" \
        -- sleep "$BENCH_IDLE_SECONDS" 2>&1 >/dev/null | awk -F, '$1 ~ /^[0-9]+$/ { s += $1 } END { print s + 0 }')
    WAKEUPS=$(awk -v c="$counts" -v s="$BENCH_IDLE_SECONDS" 'BEGIN { printf "%.1f", c * 60 / s }')
    how="epoll_wait calls (perf)"
else
    sleep "$BENCH_IDLE_SECONDS"
fi
after=$(switches "$DAEMON")
CTX=$(awk -v a="$before" -v b="$after" -v s="$BENCH_IDLE_SECONDS" 'BEGIN { printf "%.1f", (b - a) * 60 / s }')
[[ $WAKEUPS == n/a ]] && WAKEUPS=$CTX
# One more than the timer's rate: a window may hold one announcement more.
target "idle dipusd wakeups/min vs its announce timer ($ANNOUNCE_PER_MINUTE/min)" "$WAKEUPS" "<=" "$((ANNOUNCE_PER_MINUTE + 1))" "$WAKEUPS/min (≤ $ANNOUNCE_PER_MINUTE/min, +1 for the window's edges)"
bulk_row 7 "idle dipusd wakeups per minute ($how over ${BENCH_IDLE_SECONDS} s; context switches: $CTX/min)" "$WAKEUPS /min" "announce timer" "$ANNOUNCE_PER_MINUTE /min" "≤ announce timer (+1)" "$VERDICT"
stop "$DAEMON"

# ------------------------------------------------------------------ the tables

mkdir -p target/bench
{
    echo "## dipus bench — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), Linux $(uname -r), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?');"
    echo "$(socat -V 2>/dev/null | sed -n 's/^socat version \([^ ]*\).*/socat \1/p'), $(ssh -V 2>&1 | cut -d, -f1) (cipher $SSH_CIPHER)."
    echo "BENCH_BYTES=$BENCH_BYTES ($BYTES bytes) per bulk run; bulk comparisons in $BENCH_BULK_ROUNDS rounds, their cases in turn, each figure the median of its rounds and each ratio the median of the rounds' ratios (lowest–highest in brackets); other figures medians of $BENCH_RUNS runs; request/response and connect runs of ${BENCH_SECONDS} s;"
    echo "latency over $BENCH_LATENCY_RUNS whole-process runs. MB/s = 10^6 bytes/s. Client, proxies and servers share the cores; all on loopback."
    echo
    echo "### Bulk, latency, scale, footprint (issue 6)"
    echo
    echo "| # | case | result | reference | ratio | target | verdict |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${BULK[@]}" | sort -t"|" -k2,2n -s
    echo
    echo "### Small exchanges (issue 9): dipus bench rr (64-byte requests) and dipus bench connect, N concurrent connections"
    echo
    echo "| path | N | req/s | p50 µs | p99 µs | errors | × direct | × same path | conn/s | p99 µs | errors | × direct | × same path | targets |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${SMALL[@]}"
    echo
    echo "### Targets"
    echo
    echo "| target | measured | verdict |"
    echo "|---|---|---|"
    printf '%s\n' "${TARGETS[@]}"
    if [[ -n $SSH_NOTE ]]; then
        echo
        echo "SSH rows $SSH_NOTE."
    fi
} >target/bench/latest.md
cat target/bench/latest.md
log "written to target/bench/latest.md"
