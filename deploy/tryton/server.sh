#!/usr/bin/env bash
# Start or stop a Tryton server for one database, on loopback.
#
#   deploy/tryton/server.sh start <db> <port>   start `trytond -c conf -d <db>` on 127.0.0.1:<port>,
#                                               wait until /<db>/rpc/ answers (TRYTON_WAIT_S, 120)
#   deploy/tryton/server.sh stop <db>           stop it (SIGTERM, then SIGKILL after 20 s)
#   deploy/tryton/server.sh status <db>         exit 0 when its pid is alive
#
# The database must exist (clone it: CREATE DATABASE x TEMPLATE <the template install.sh printed>). Starting
# with -d loads the database's pool before the first call; without it the first login fails
# with KeyError 'res.user'. State: .stack/tryton/server-<db>.{conf,pid,log}.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="$ROOT/.stack/tryton"
VENV="$STATE/venv"
CONF="$STATE/trytond.conf"
WAIT_S="${TRYTON_WAIT_S:-120}"

log() { printf '[tryton-server %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 0 when the server answers HTTP on /<db>/rpc/ (401 counts: without a session every method
# but login is refused, and an answer is all this checks).
answers() {
    "$VENV/bin/python" - "$1" "$2" <<'EOF'
import json, sys, urllib.error, urllib.request
db, port = sys.argv[1:]
req = urllib.request.Request(
    f"http://127.0.0.1:{port}/{db}/rpc/",
    data=json.dumps({"id": 0, "method": "common.server.version", "params": []}).encode(),
    headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=3) as r:
        r.read()
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)
EOF
}

start() {
    local db="$1" port="$2" pidf="$STATE/server-$1.pid" logf="$STATE/server-$1.log"
    [[ -x "$VENV/bin/trytond" && -f "$CONF" ]] || die "Tryton is not installed: run deploy/tryton/install.sh"
    if alive "$pidf"; then
        log "already running for $db (pid $(cat "$pidf"))"
    else
        # Its own config file: trytond reads TRYTOND_WEB__LISTEN before the file, which wins.
        sed "s/^listen = .*/listen = 127.0.0.1:$port/" "$CONF" >"$STATE/server-$db.conf"
        nohup "$VENV/bin/trytond" -c "$STATE/server-$db.conf" -d "$db" >"$logf" 2>&1 </dev/null &
        echo $! >"$pidf"
    fi
    local deadline=$((SECONDS + WAIT_S))
    until answers "$db" "$port"; do
        alive "$pidf" || { tail -n 30 "$logf" >&2; die "trytond for $db exited (log: $logf)"; }
        ((SECONDS < deadline)) || { tail -n 30 "$logf" >&2; die "trytond for $db did not answer within ${WAIT_S} s"; }
        sleep 0.3
    done
    log "trytond for $db answers on http://127.0.0.1:$port/$db/rpc/ (pid $(cat "$pidf"))"
}

stop() {
    local db="$1" pidf="$STATE/server-$1.pid" pid
    if ! alive "$pidf"; then
        rm -f "$pidf"
        return
    fi
    pid="$(cat "$pidf")"
    kill -TERM "$pid"
    local deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$pidf" "$STATE/server-$db.conf"
    log "trytond for $db stopped (log kept: $STATE/server-$db.log)"
}

case "${1:-}" in
    start) [[ $# -eq 3 ]] || die "usage: $0 start <db> <port>"; start "$2" "$3" ;;
    stop) [[ $# -ge 2 ]] || die "usage: $0 stop <db>"; stop "$2" ;;
    status) [[ $# -ge 2 ]] || die "usage: $0 status <db>"; alive "$STATE/server-$2.pid" ;;
    *) die "usage: $0 start <db> <port> | stop <db> | status <db>" ;;
esac
