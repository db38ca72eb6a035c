#!/usr/bin/env bash
# demo.sh — a tour of dipus that checks itself (`make demo`).
#
# Everything happens in a fresh temporary directory: DIPUS_ROOT, the
# busybox-style symlinks (dcat, dls, …) and the test data. Services are
# started as if on different hosts by giving each its own DIPUS_HOSTNAME;
# they all run on this machine, so no network and no root are needed.
# On exit (normal, failure or Ctrl-C) every process started here is
# killed and the directory removed.
#
# Exit status: 0 only if every check passed.
#
# Adding a section: write a function `section_NAME` that calls `header`,
# shows commands with `show`, and checks results with `check`; add NAME to
# SECTIONS below. `start_service HOST CMD NAME/PROTOCOL` starts a server
# in the background and waits until `dls` lists it. Run only some
# sections with `contrib/demo.sh NAME…`.

set -euo pipefail

SECTIONS=(services pipes files bulk sockets socat monitor network errors)

dipus=${DIPUS:-target/release/dipus}
if [[ ! -x $dipus ]]; then
    echo "demo: $dipus is not an executable; run make first or set DIPUS" >&2
    exit 1
fi
dipus=$(cd "$(dirname "$dipus")" && pwd)/$(basename "$dipus")

# Under /tmp itself, not $TMPDIR: socket paths must fit in 108 bytes.
work=$(mktemp -d /tmp/dipus-demo.XXXXXX)
pids=()
failures=0
checks=0

cleanup() {
    local status=$?
    # A second Ctrl-C or SIGTERM must not cut the cleanup short.
    trap '' INT TERM
    trap - EXIT
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir "$work/bin"
for name in dcat dls dipus-local-pipe dipus-export-pipe dipus-service-monitor dipus-exporter dipus-import; do
    ln -s "$dipus" "$work/bin/$name"
done
export PATH="$work/bin:$PATH"
export DIPUS_ROOT="$work/root"
unset DIPUS_HOSTNAME RUST_LOG

bold=
plain=
if [[ -t 1 ]]; then
    bold=$'\e[1m'
    plain=$'\e[0m'
fi

header() {
    printf '\n%s==== %s ====%s\n' "$bold" "$*" "$plain"
}

# show COMMAND: print it, then run it with the shell.
show() {
    printf '%s$ %s%s\n' "$bold" "$1" "$plain"
    eval "$1"
}

# check DESCRIPTION COMMAND: run COMMAND quietly and report.
check() {
    checks=$((checks + 1))
    if eval "$2" >/dev/null 2>&1; then
        echo "ok: $1"
    else
        echo "FAILED: $1   ($2)"
        failures=$((failures + 1))
    fi
}

# wait_until WHAT COMMAND: poll COMMAND (quietly) until it succeeds, for
# 5 s at most; then say that WHAT did not happen, and fail.
wait_until() {
    local tries=0
    until eval "$2" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if ((tries > 100)); then
            echo "demo: $1 did not happen within 5 s" >&2
            return 1
        fi
        sleep 0.05
    done
}

# wait_listed SELECTOR COUNT: until `dls -1 SELECTOR` lists COUNT services.
wait_listed() {
    wait_until "$1 appearing" "[[ \$(dls -1 $1 | wc -l) -ge $2 ]]"
}

# wait_alive SELECTOR: until `dls -l` says something listens there.
# Programs like socat bind in place, so their socket exists a moment
# before it accepts.
wait_alive() {
    wait_until "$1 listening" "dls -l $1 | grep -qw alive"
}

# wait_for_line FILE LINE: until FILE has LINE.
wait_for_line() {
    wait_until "'$2' in $1" "grep -qxF -- '$2' $1"
}

# start_service [APPLET] HOST CMD NAME/PROTOCOL [OPTION…]: serve CMD as if
# on HOST, with dipus-local-pipe or the APPLET given.
start_service() {
    local applet=dipus-local-pipe
    if [[ $1 == dipus-* ]]; then
        applet=$1
        shift
    fi
    local host=$1 command=$2 spec=$3
    shift 3
    local name=${spec%%/*}
    local before
    before=$(dls -1 "$name.$host" | wc -l)
    printf "%s\$ DIPUS_HOSTNAME=%s %s %s'%s' %s &%s\n" "$bold" "$host" "$applet" "${*:+$* }" "$command" "$spec" "$plain"
    DIPUS_HOSTNAME=$host "$applet" "$@" "$command" "$spec" &
    pids+=($!)
    wait_listed "$name.$host" $((before + 1))
}

# ---------------------------------------------------------------------------

section_services() {
    header "Services on three 'hosts' (DIPUS_ROOT=$DIPUS_ROOT)"
    start_service alpha 'tr a-z A-Z' upper/text/plain
    start_service beta 'tr a-z A-Z' upper/text/plain
    start_service alpha 'tr A-Za-z N-ZA-Mn-za-m' rot13/text/plain
    start_service beta sort sorter/text/plain
    start_service beta sort sorter/text/plain
    start_service gamma 'wc -c' wc/text/plain/to/text/x-count
    start_service gamma cat echo/application/octet-stream
    echo
    show 'dls'
    echo
    show 'dls -l'
    echo
    show 'dls upper'
    check "two instances of sorter on beta: sorter.beta..0 and ..1" \
        '[[ $(dls -1 sorter.beta..1) == text/plain/sorter.beta..1 ]]'
    check "dls lists 7 services" '[[ $(dls -1 | wc -l) -eq 7 ]]'
}

section_pipes() {
    header "Piping text through services with dcat"
    # Some text: /etc/services without its comments, or a few words.
    text=$work/services
    if [[ -r /etc/services ]]; then
        grep -v -e '^#' -e '^[[:space:]]*$' /etc/services >"$text"
    fi
    if [[ ! -s $text ]]; then
        printf '%s\n' pear apple quince fig banana cherry date grape lemon mango >"$text"
    fi
    show "dcat sorter.beta $text | dcat upper | head -5"
    show "echo 'which upper answers first?' | dcat -v upper"
    show "echo 'ask beta in particular' | dcat upper.beta"
    show "echo 'how many bytes is this?' | dcat wc"
    check "sorter then upper equals sort | tr" \
        "cmp <(dcat sorter.beta $text | dcat upper) <(sort $text | tr a-z A-Z)"
    check "the wc service counts bytes like wc -c" \
        "[[ \$(dcat wc $text) == \$(wc -c <$text) ]]"
    check "a selector by protocol: text/plain/to/text/x-count" \
        "[[ \$(echo 12345 | dcat text/plain/to/text/x-count) == 6 ]]"
}

section_files() {
    header "Files in, files out: rot13 twice gives the original"
    head -c 200000 "$dipus" | od -c >"$work/original"
    show "dcat rot13 $work/original | dcat rot13 > $work/twice"
    show "cmp $work/original $work/twice && echo identical"
    check "rot13 twice is the identity" "cmp $work/original $work/twice"
    dcat rot13 "$work/original" >"$work/once"
    check "rot13 once is not" "! cmp -s $work/original $work/once"
    check "several FILEs are sent in order, - is stdin" \
        "[[ \$(echo b | dcat echo <(echo a) - <(echo c) | tr -d '\n') == abc ]]"
}

section_bulk() {
    header "Bulk data: 8 MiB of random bytes through a cat service"
    dd if=/dev/urandom of="$work/random" bs=1048576 count=8 2>/dev/null
    local TIMEFORMAT="(%3R s)"
    show "time dcat echo $work/random > $work/random.back"
    check "8 MiB came back unchanged" "cmp $work/random $work/random.back"
    check "stdin works too" "dcat echo <$work/random | cmp - $work/random"
}

section_sockets() {
    header "They are only sockets: full paths for other programs"
    show 'dls -1'
    show 'dls -1 -f'
    check "dls -1 -f prints paths of sockets" "[[ -S \$(dls -1 -f sorter.beta..0) ]]"
}

section_socat() {
    header "socat as a client and as a service"
    if ! command -v socat >/dev/null; then
        echo "(socat is not installed: skipped)"
        return
    fi
    show 'printf "pear\napple\nfig\n" | socat -t 5 - UNIX-CONNECT:$(dls -1 -f sorter.beta..0)'
    check "socat talks to a dipus service" \
        '[[ $(printf "b\na\n" | socat -t 5 - UNIX-CONNECT:$(dls -1 -f sorter.beta..0) | tr -d "\n") == ab ]]'
    # A service dipus did not make: any listening socket in the tree is one.
    local socket=$DIPUS_ROOT/local/text/plain/tac.delta..0
    printf '%s$ socat UNIX-LISTEN:%s,fork EXEC:tac &%s\n' "$bold" "$socket" "$plain"
    socat "UNIX-LISTEN:$socket,fork" EXEC:tac &
    pids+=($!)
    wait_alive tac.delta
    show 'printf "made by socat\nfound by dcat\n" | dcat tac'
    check "dcat talks to a socat service" '[[ $(printf "1\n2\n" | dcat tac | tr -d "\n") == 21 ]]'
}

section_monitor() {
    header "Watching services come and go"
    local log=$work/monitor.log
    echo "$ dipus-service-monitor --initial > monitor.log &"
    dipus-service-monitor --initial >"$log" &
    pids+=($!)
    wait_for_line "$log" '= synced'
    start_service delta 'tr a-z A-Z' shout/text/plain
    local server=${pids[-1]}
    local path
    path=$(dls -1 -f shout)
    wait_for_line "$log" "+ $path"
    echo "$ kill $server"
    kill "$server"
    wait "$server" || true
    wait_for_line "$log" "- $path"
    show "tail -n 2 $log"
    check "the monitor saw shout appear" "grep -qx '+ $path' $log"
    check "the monitor saw shout vanish" "grep -qx -- '- $path' $log"
    check "the stopped server removed its socket" "[[ ! -e $path ]]"
}

section_network() {
    header "Another host: an exporter, and an import into a second tree"
    start_service dipus-export-pipe delta 'tr a-z A-Z' yell/text/plain --mode 0666
    local server=${pids[-1]}
    # A free port on loopback: try a few random ones.
    local port exporter attempt
    for attempt in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 40000))
        dipus-exporter --bind 127.0.0.1 --port "$port" --allow 127.0.0.0/8 2>>"$work/exporter.log" &
        exporter=$!
        pids+=("$exporter")
        if wait_until "the exporter on port $port" "dls -1 sep://127.0.0.1:$port || ! kill -0 $exporter"; then
            kill -0 "$exporter" 2>/dev/null && break
        fi
    done
    echo "$ dipus-exporter --bind 127.0.0.1 --port $port --allow 127.0.0.0/8 &"
    local remote=sep://127.0.0.1:$port
    show "dls $remote"
    show "echo 'across the wire' | dcat $remote/yell"
    check "dcat through the exporter" "[[ \$(echo hi | dcat $remote/yell) == HI ]]"

    # The "other machine" is simply another DIPUS_ROOT.
    local other=$work/other
    echo "$ DIPUS_ROOT=$other dipus-import -f $remote &"
    DIPUS_ROOT=$other dipus-import -f "$remote" 2>>"$work/import.log" &
    pids+=($!)
    wait_until "the import of yell" "DIPUS_ROOT=$other dls -1 yell.delta | grep -q ."
    show "DIPUS_ROOT=$other dls -l"
    show "echo 'through the proxy' | DIPUS_ROOT=$other dcat yell.delta"
    check "the import made a proxy in imported/" "DIPUS_ROOT=$other dls yell | grep -qw imported"
    check "dcat through the proxy" "[[ \$(echo hi | DIPUS_ROOT=$other dcat yell) == HI ]]"
    check "the exporter offers nothing from local/" "dls -1 $remote/upper >$work/none && [[ ! -s $work/none ]]"

    local service
    service=$(DIPUS_ROOT=$DIPUS_ROOT dls -1 -f yell.delta)
    echo "(stopping the exported service on delta)"
    kill "$server"
    wait_until "yell disappearing" "[[ ! -e $service ]]"
    wait_until "the proxy disappearing" "[[ -z \$(DIPUS_ROOT=$other dls -1 yell) ]]" || true
    show "DIPUS_ROOT=$other dls"
    check "the proxy went with the service" "[[ -z \$(DIPUS_ROOT=$other dls -1 yell) ]]"
}

section_errors() {
    header "Errors say what went wrong, exit statuses say which kind"
    local status=0
    show 'dcat nosuch </dev/null || echo "exit status $?"'
    dcat nosuch </dev/null 2>/dev/null || status=$?
    check "no such service is exit status 69" "[[ $status -eq 69 ]]"
    status=0
    dcat --bogus 2>/dev/null || status=$?
    check "a usage error is exit status 64" "[[ $status -eq 64 ]]"
}

# ---------------------------------------------------------------------------

if (($#)); then
    # The later sections use the services the first one starts.
    [[ $1 == services ]] || set -- services "$@"
    SECTIONS=("$@")
fi
for section in "${SECTIONS[@]}"; do
    "section_$section"
done

header "Result"
if ((failures)); then
    echo "$failures of $checks checks FAILED"
    exit 1
fi
echo "all $checks checks passed"
