#!/bin/bash
# real-servers.sh — a real key-value server (redis) and a real HTTP server
# (nginx) on UNIX sockets, used with their own clients directly, through a
# dipus import of a dipus exporter on 127.0.0.1 (UNIX -> TCP -> UNIX), and
# through socat doing the same two hops: what a new user would try first.
#
# Needs redis-server, redis-benchmark, nginx, curl and socat (Debian:
# redis-server nginx-light curl socat); builds dipus if needed. Everything
# runs in a temporary directory on loopback and is stopped at the end.
# Prints one line per run: redis SET/GET requests per second with 50
# clients, and HTTP bytes per second for one 64 MiB file.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in redis-server redis-benchmark nginx curl socat; do
    command -v "$tool" >/dev/null || { echo "real-servers: needs $tool" >&2; exit 1; }
done
cargo build --release --quiet
B=$PWD/target/release/dipus
T=$(mktemp -d /tmp/dipus-real.XXXXXX)
PIDS=()
cleanup() {
    kill "${PIDS[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
free_port() {
    local port
    for port in $(seq 21000 21999); do
        ss -ltn | grep -q ":$port " || { echo "$port"; return; }
    done
}
start() { "$@" >/dev/null 2>&1 & PIDS+=($!); }
wait_socket() { for _ in $(seq 500); do [[ -S $1 ]] && return; sleep 0.01; done; echo "no socket $1" >&2; exit 1; }

mkdir -p "$T/a/exported/db" "$T/a/exported/http" "$T/b" "$T/www"
chmod 755 "$T" "$T/www"   # nginx's workers read the file as its unprivileged user
REDIS=$T/a/exported/db/redis.alpha..0
WEB=$T/a/exported/http/web.alpha..0
start redis-server --port 0 --unixsocket "$REDIS" --unixsocketperm 777 --save '' --appendonly no
head -c 64M /dev/urandom >"$T/www/file"
chmod 644 "$T/www/file"
cat >"$T/nginx.conf" <<CONF
daemon off; worker_processes 1; pid $T/nginx.pid; error_log $T/nginx.err;
events { worker_connections 1024; }
http { access_log off; sendfile on; server { listen unix:$WEB; root $T/www; } }
CONF
start nginx -c "$T/nginx.conf"
wait_socket "$REDIS"
wait_socket "$WEB"
chmod 666 "$WEB"   # the exporter offers only what everyone may connect to

SEP=$(free_port)
DIPUS_ROOT=$T/a DIPUS_HOSTNAME=alpha start "$B" exporter --bind 127.0.0.1 --port "$SEP"
sleep 0.3
DIPUS_ROOT=$T/b DIPUS_HOSTNAME=beta start "$B" import -f "sep://127.0.0.1:$SEP"
for pair in "redis:$REDIS" "web:$WEB"; do
    name=${pair%%:*} target=${pair#*:} port=$(free_port)
    start socat "TCP-LISTEN:$port,reuseaddr,fork,bind=127.0.0.1" "UNIX-CONNECT:$target"
    sleep 0.1
    start socat "UNIX-LISTEN:$T/socat-$name.sock,fork,backlog=512" "TCP:127.0.0.1:$port"
done
wait_socket "$T/b/imported/db/redis.alpha..0"
wait_socket "$T/b/imported/http/web.alpha..0"
wait_socket "$T/socat-redis.sock"
wait_socket "$T/socat-web.sock"

for path in "$REDIS:direct" "$T/b/imported/db/redis.alpha..0:dipus-import" "$T/socat-redis.sock:socat-2-hops"; do
    for _ in 1 2 3; do
        echo "redis ${path##*:} $(redis-benchmark -s "${path%:*}" -c 50 -n 200000 -t set,get -q 2>/dev/null |
            tr '\r' '\n' | sed -n 's/.*\(SET\|GET\): \([0-9.]*\) requests per second.*/\1=\2/p' | tr '\n' ' ')"
    done
done
for path in "$WEB:direct" "$T/b/imported/http/web.alpha..0:dipus-import" "$T/socat-web.sock:socat-2-hops"; do
    for _ in 1 2 3; do
        echo "http ${path##*:} $(curl -s --unix-socket "${path%:*}" http://x/file -o /dev/null \
            -w '%{speed_download} B/s, %{size_download} bytes')"
    done
done
