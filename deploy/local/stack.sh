#!/usr/bin/env bash
# The local stack without a Docker engine: Apache Kafka (KRaft, one combined broker+controller)
# run from Maven Central jars, and a private PostgreSQL 15 cluster from Debian's packages.
#
#   deploy/local/stack.sh up       fetch jars if needed, start what is not running, wait healthy
#                                  (a healthy stack on these ports that another checkout started
#                                  is reused, never stopped: same role, databases, wal_level)
#   deploy/local/stack.sh down     stop what `up` started (pid files); data is kept
#   deploy/local/stack.sh status   healthy/down, port, version of each; non-zero if one is down
#   deploy/local/stack.sh restart-pg [fast|immediate]   restart PostgreSQL in place (tests)
#   deploy/local/stack.sh kill-kafka    SIGKILL the broker, no clean shutdown (tests)
#   deploy/local/stack.sh start-kafka   start the broker again and wait until it answers
#
# Everything listens on 127.0.0.1 only; all state and logs live under <repo>/.stack/:
#   .stack/kafka/{server.properties,cluster.id,kafka.pid,kafka.log,kafka.stdout.log,data/}
#   .stack/pg/{data/,run/ (unix socket),postgres.log}
#
# Environment: STACK_KAFKA_PORT (19092), STACK_KAFKA_CONTROLLER_PORT (19093), STACK_PG_PORT
# (15432), STACK_PG_BIN (/usr/lib/postgresql/15/bin), STACK_WAIT_S (90), STACK_KAFKA_HEAP
# ("-Xms256m -Xmx512m").
#
# Local development only: the `sync` role is a SUPERUSER here so that it can create
# publications and replication slots in the per-test databases without further grants.
# Production uses least-privilege roles (LOGIN REPLICATION, owner of the published tables
# or pg_create_subscription-style grants as the DBA decides), never a superuser.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STACK="$ROOT/.stack"

KAFKA_PORT="${STACK_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${STACK_KAFKA_CONTROLLER_PORT:-19093}"
PG_PORT="${STACK_PG_PORT:-15432}"
PG_BIN="${STACK_PG_BIN:-/usr/lib/postgresql/15/bin}"
WAIT_S="${STACK_WAIT_S:-90}"
KAFKA_HEAP="${STACK_KAFKA_HEAP:--Xms256m -Xmx512m}"

LIB="$HERE/lib"
KAFKA_DIR="$STACK/kafka"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/kafka.log"
KAFKA_STDOUT="$KAFKA_DIR/kafka.stdout.log"
KAFKA_PROPS="$KAFKA_DIR/server.properties"

PG_DIR="$STACK/pg"
PG_DATA="$PG_DIR/data"
PG_RUN="$PG_DIR/run"
PG_LOG="$PG_DIR/postgres.log"

VENV_PY="$ROOT/.venv/bin/python"

# Set when `up` found a healthy stack on the ports that this checkout did not start.
KAFKA_REUSED=""
PG_REUSED=""
OTHER_PORTS_HINT="STACK_KAFKA_PORT, STACK_KAFKA_CONTROLLER_PORT, STACK_PG_PORT, and CRM_ERP_SYNC_KAFKA_BOOTSTRAP, CRM_ERP_SYNC_CRM_DSN, CRM_ERP_SYNC_ERP_DSN to match"

log() { printf '[stack %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print the tail of a log file after a failure.
show_log() {
    local f
    for f in "$@"; do
        if [[ -s "$f" ]]; then
            printf -- '----- last 40 lines of %s -----\n' "$f" >&2
            tail -n 40 "$f" >&2
            printf -- '-----\n' >&2
        fi
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

python_for_probe() {
    if [[ -x "$VENV_PY" ]] && "$VENV_PY" -c 'import kafka' 2>/dev/null; then
        echo "$VENV_PY"
    else
        command -v python3 || true
    fi
}

# ------------------------------------------------------------------------------------ kafka

kafka_jar() {
    local j
    for j in "$LIB"/kafka_2.13-*.jar; do
        [[ -e "$j" ]] && { echo "$j"; return 0; }
    done
    return 1
}

kafka_jar_version() {
    local j
    j="$(kafka_jar)" || { echo "unknown"; return 0; }
    j="${j##*/kafka_2.13-}"
    echo "${j%.jar}"
}

# The jars are fetched once; the stamp records which pom.xml fetched them, so a version bump in
# the pom refetches. A half-finished fetch leaves no stamp and is redone.
ensure_jars() {
    local want have=""
    want="$(sha256sum "$HERE/pom.xml" | cut -d' ' -f1)"
    [[ -f "$LIB/.fetched" ]] && have="$(cat "$LIB/.fetched")"
    if [[ "$want" == "$have" ]] && kafka_jar >/dev/null; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install maven) to fetch the Kafka jars"
    log "fetching Kafka broker jars from Maven Central into deploy/local/lib (mvn)"
    rm -rf "$LIB"
    mkdir -p "$STACK"
    if ! (cd "$HERE" && mvn -q -B dependency:copy-dependencies \
            -DoutputDirectory=lib -DincludeScope=runtime) >"$STACK/mvn.log" 2>&1; then
        rm -rf "$LIB"
        show_log "$STACK/mvn.log"
        die "mvn could not fetch the Kafka jars"
    fi
    kafka_jar >/dev/null || die "mvn ran but no kafka_2.13-*.jar is in deploy/local/lib"
    echo "$want" >"$LIB/.fetched"
}

kafka_pid() {
    local pid
    [[ -f "$KAFKA_PID" ]] || return 1
    pid="$(cat "$KAFKA_PID" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # guard against a recycled pid: it must be our broker
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
    echo "$pid"
}

write_kafka_props() {
    cat >"$KAFKA_PROPS" <<EOF
# generated by deploy/local/stack.sh on every \`up\`: edit the script, not this file
process.roles=broker,controller
node.id=1
# static quorum (not --standalone/dynamic): the controller port can change between runs
controller.quorum.voters=1@127.0.0.1:${KAFKA_CONTROLLER_PORT}
listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT},CONTROLLER://127.0.0.1:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=${KAFKA_DATA}

auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0

# small machine
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=72
log.segment.bytes=268435456
EOF
}

kafka_start() {
    local pid cluster_id
    if pid="$(kafka_pid)"; then
        log "kafka already running (pid $pid) on 127.0.0.1:$KAFKA_PORT"
        return 0
    fi
    # Another checkout's stack (or one started by hand) on this port: a broker that answers a
    # metadata request is all the project needs of it (it never stops what it did not start).
    if port_open "$KAFKA_PORT"; then
        kafka_probe || die "port 127.0.0.1:$KAFKA_PORT is taken by a process that is not a Kafka broker answering metadata requests: stop it, or run this stack on other ports ($OTHER_PORTS_HINT)"
        KAFKA_REUSED=1
        log "kafka on 127.0.0.1:$KAFKA_PORT was not started by this checkout but answers: reusing it"
        return 0
    fi
    rm -f "$KAFKA_PID"
    command -v java >/dev/null || die "java not found: install a JDK 17+ (apt-get install openjdk-17-jdk-headless)"
    ensure_jars
    port_open "$KAFKA_CONTROLLER_PORT" && die "port 127.0.0.1:$KAFKA_CONTROLLER_PORT (the controller's) is taken by a process that is not this stack's broker: stop it, or set STACK_KAFKA_CONTROLLER_PORT to a free port"
    mkdir -p "$KAFKA_DATA"
    write_kafka_props
    if [[ ! -f "$KAFKA_DATA/meta.properties" ]]; then
        if [[ -s "$KAFKA_DIR/cluster.id" ]]; then
            cluster_id="$(cat "$KAFKA_DIR/cluster.id")"
        else
            cluster_id="$(java -cp "$LIB/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
            [[ -n "$cluster_id" ]] || die "kafka.tools.StorageTool random-uuid printed nothing"
            echo "$cluster_id" >"$KAFKA_DIR/cluster.id"
        fi
        log "formatting kafka storage (cluster id $cluster_id)"
        if ! java -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
                -Dkafka.logs.dir="$KAFKA_DIR" -cp "$LIB/*" kafka.tools.StorageTool \
                format -t "$cluster_id" -c "$KAFKA_PROPS" >"$KAFKA_DIR/format.log" 2>&1; then
            show_log "$KAFKA_DIR/format.log"
            die "kafka storage format failed"
        fi
    fi
    log "starting kafka $(kafka_jar_version) on 127.0.0.1:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT)"
    # shellcheck disable=SC2086 # KAFKA_HEAP is a list of JVM options
    (
        cd "$KAFKA_DIR"
        exec nohup java $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
            -Dkafka.logs.dir="$KAFKA_DIR" \
            -cp "$LIB/*" kafka.Kafka "$KAFKA_PROPS" </dev/null >"$KAFKA_STDOUT" 2>&1
    ) &
    echo $! >"$KAFKA_PID"
}

# One probe of the broker. With the venv: kafka-python's admin client lists topics (a real
# Metadata request). Without it: the system python3 sends an ApiVersions request by hand.
kafka_probe() {
    local py
    py="$(python_for_probe)"
    [[ -n "$py" ]] || { port_open "$KAFKA_PORT"; return; }
    "$py" - "$KAFKA_PORT" <<'PY' >/dev/null 2>&1
import sys
port = int(sys.argv[1])
try:
    from kafka import KafkaAdminClient
except ImportError:
    import socket, struct
    req = struct.pack(">hhih", 18, 0, 1, 5) + b"probe"  # ApiVersions v0, correlation 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack(">i", len(req)) + req)
        head = s.recv(10)
    size, corr, err = struct.unpack(">iih", head[:10])
    sys.exit(0 if corr == 1 and err == 0 else 1)
admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5000,
                         bootstrap_timeout_ms=5000, client_id="stack-probe")
try:
    admin.list_topics()
finally:
    admin.close()
PY
}

kafka_wait() {
    [[ -n "$KAFKA_REUSED" ]] && return 0  # answered in kafka_start
    local deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        if ! kafka_pid >/dev/null; then
            show_log "$KAFKA_LOG" "$KAFKA_STDOUT"
            die "kafka exited during startup"
        fi
        if kafka_probe; then
            log "kafka healthy on 127.0.0.1:$KAFKA_PORT"
            return 0
        fi
        sleep 1
    done
    show_log "$KAFKA_LOG" "$KAFKA_STDOUT"
    die "kafka did not answer a metadata request on 127.0.0.1:$KAFKA_PORT within ${WAIT_S}s"
}

kafka_stop() {
    local pid deadline
    if ! pid="$(kafka_pid)"; then
        rm -f "$KAFKA_PID"
        if port_open "$KAFKA_PORT"; then
            log "kafka on 127.0.0.1:$KAFKA_PORT was not started by this checkout: left running"
        else
            log "kafka not running"
        fi
        return 0
    fi
    log "stopping kafka (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        log "kafka still running after 60s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
    rm -f "$KAFKA_PID"
}

kafka_version_probe() {
    # What the broker itself says: its ApiVersions answer, as kafka-python reads it.
    [[ -x "$VENV_PY" ]] || return 0
    "$VENV_PY" - "$KAFKA_PORT" <<'PY' 2>/dev/null || true
import sys
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{sys.argv[1]}", request_timeout_ms=5000,
                         bootstrap_timeout_ms=5000, client_id="stack-status")
try:
    print(".".join(map(str, admin._client.check_version())))
finally:
    admin.close()
PY
}

kafka_status() {
    local pid ver api started=""
    ver="$(kafka_jar_version)"
    if pid="$(kafka_pid)" && kafka_probe; then
        api="$(kafka_version_probe)"
        # the broker logs its own version at startup (AppInfoParser)
        started="$(grep -ho 'Kafka version: [^ ]*' "$KAFKA_LOG" 2>/dev/null | tail -n 1 | cut -d' ' -f3)"
        printf '%-10s %-8s 127.0.0.1:%-6s version %s (jar %s%s) pid %s\n' kafka healthy \
            "$KAFKA_PORT" "${started:-$ver}" "$ver" "${api:+, ApiVersions ~ $api}" "$pid"
        return 0
    fi
    if port_open "$KAFKA_PORT" && kafka_probe; then
        api="$(kafka_version_probe)"
        printf '%-10s %-8s 127.0.0.1:%-6s %s(not started by this checkout)\n' kafka healthy \
            "$KAFKA_PORT" "${api:+ApiVersions ~ $api }"
        return 0
    fi
    printf '%-10s %-8s 127.0.0.1:%-6s version %s (jar)\n' kafka down "$KAFKA_PORT" "$ver"
    return 1
}

# ------------------------------------------------------------------------------- postgresql

# PostgreSQL refuses to run as root: as root, its cluster belongs to the `postgres` OS user.
as_pg() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_check_bin() {
    [[ -x "$PG_BIN/pg_ctl" && -x "$PG_BIN/initdb" ]] \
        || die "PostgreSQL 15 not found in $PG_BIN: apt-get install postgresql-15 (or set STACK_PG_BIN)"
    command -v psql >/dev/null || die "psql not found: apt-get install postgresql-client-15"
    if [[ "$(id -u)" == 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' OS user"
    fi
}

# As root, every parent of .stack/pg must be searchable by `postgres` (e.g. a clone under
# /root). Adds only the search (x) bit for others, and only where it is missing.
pg_make_traversable() {
    [[ "$(id -u)" == 0 ]] || return 0
    local d="" part
    local -a parts
    IFS=/ read -r -a parts <<<"${STACK#/}"
    for part in "${parts[@]}"; do  # top-down: / first, .stack last
        d="$d/$part"
        if ! runuser -u postgres -- test -x "$d"; then
            log "chmod o+x $d (so the postgres user can reach .stack/pg)"
            chmod o+x "$d"
        fi
    done
}

pg_running() { [[ -f "$PG_DATA/PG_VERSION" ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

write_pg_conf() {
    cat >"$PG_DATA/stack.conf" <<EOF
# generated by deploy/local/stack.sh on every \`up\`: edit the script, not this file
listen_addresses = '127.0.0.1'
port = ${PG_PORT}
unix_socket_directories = '${PG_RUN}'
unix_socket_permissions = 0700
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_slot_wal_keep_size = 1GB
shared_buffers = 64MB
max_connections = 100
password_encryption = scram-sha-256
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    cat >"$PG_DATA/pg_hba.conf" <<EOF
# generated by deploy/local/stack.sh on every \`up\`
# unix socket (directory .stack/pg/run, mode 0700): only the cluster's OS user gets in
local   all          all                 trust
local   replication  all                 trust
# TCP on loopback only, with passwords
host    all          all   127.0.0.1/32  scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
EOF
    if [[ "$(id -u)" == 0 ]]; then chown postgres:postgres "$PG_DATA/stack.conf" "$PG_DATA/pg_hba.conf"; fi
}

# A PostgreSQL this checkout did not start, serving what the stack serves: role sync/sync,
# databases crm and erp, wal_level=logical (another checkout's stack).
pg_serves_stack() {
    pg_probe && [[ "$(psql -X -q -At "$(pg_dsn crm)" -c 'SHOW wal_level' 2>/dev/null)" == logical ]]
}

pg_start() {
    pg_check_bin
    if ! pg_running && port_open "$PG_PORT"; then
        pg_serves_stack || die "port 127.0.0.1:$PG_PORT is taken by a PostgreSQL (or another process) that is not this checkout's and does not serve the stack (role sync/sync, databases crm and erp, wal_level=logical): stop it, or run this stack on other ports ($OTHER_PORTS_HINT)"
        PG_REUSED=1
        log "postgresql on 127.0.0.1:$PG_PORT was not started by this checkout but serves the stack (sync/sync, crm, erp, wal_level=logical): reusing it"
        return 0
    fi
    mkdir -p "$PG_DIR"
    pg_make_traversable
    if [[ "$(id -u)" == 0 ]]; then chown postgres:postgres "$PG_DIR"; fi
    as_pg mkdir -p "$PG_RUN"
    as_pg chmod 0700 "$PG_RUN"
    if pg_running; then
        log "postgresql already running on 127.0.0.1:$PG_PORT"
        return 0
    fi
    if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
        log "initdb $PG_DATA"
        rm -rf "$PG_DATA"
        if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
                --auth-local=trust --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1; then
            show_log "$PG_DIR/initdb.log"
            die "initdb failed"
        fi
        echo "include 'stack.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
    fi
    write_pg_conf
    log "starting postgresql on 127.0.0.1:$PG_PORT"
    if [[ "$(id -u)" == 0 ]]; then touch "$PG_LOG" && chown postgres:postgres "$PG_LOG"; fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$WAIT_S" start >/dev/null; then
        show_log "$PG_LOG"
        die "postgresql did not start"
    fi
}

psql_admin() { as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres "$@"; }

# Role and databases, every `up` (idempotent, cheap).
pg_bootstrap() {
    psql_admin >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sync') THEN
    CREATE ROLE sync;
  END IF;
END $$;
-- SUPERUSER: local dev stack only (publications/slots in per-test databases); production
-- uses least-privilege roles.
ALTER ROLE sync WITH LOGIN REPLICATION CREATEDB SUPERUSER PASSWORD 'sync';
SELECT format('CREATE DATABASE %I OWNER sync', d)
  FROM unnest(ARRAY['crm', 'erp']) AS d
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d)
\gexec
SQL
}

pg_dsn() { echo "postgresql://sync:sync@127.0.0.1:$PG_PORT/$1?connect_timeout=3"; }

pg_probe() {
    local db
    for db in crm erp; do
        psql -X -q -At "$(pg_dsn "$db")" -c 'SELECT 1' >/dev/null 2>&1 || return 1
    done
}

pg_wait() {
    [[ -n "$PG_REUSED" ]] && return 0  # checked in pg_start
    local deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        if pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
            if ! pg_bootstrap; then
                show_log "$PG_LOG"
                die "could not create role sync / databases crm, erp"
            fi
            if pg_probe; then
                log "postgresql healthy on 127.0.0.1:$PG_PORT (databases crm, erp as sync)"
                return 0
            fi
        fi
        pg_running || { show_log "$PG_LOG"; die "postgresql exited during startup"; }
        sleep 1
    done
    show_log "$PG_LOG"
    die "postgresql: databases crm/erp not accepting connections as sync on 127.0.0.1:$PG_PORT within ${WAIT_S}s"
}

pg_stop() {
    if [[ ! -x "$PG_BIN/pg_ctl" ]] || ! pg_running; then
        if port_open "$PG_PORT"; then
            log "postgresql on 127.0.0.1:$PG_PORT was not started by this checkout: left running"
        else
            log "postgresql not running"
        fi
        return 0
    fi
    log "stopping postgresql"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
}

pg_status() {
    local ver
    if pg_running && pg_probe; then
        ver="$(psql -X -At "$(pg_dsn crm)" -c 'SHOW server_version' 2>/dev/null)"
        printf '%-10s %-8s 127.0.0.1:%-6s version %s\n' postgresql healthy "$PG_PORT" "$ver"
        return 0
    fi
    if ! pg_running && port_open "$PG_PORT" && pg_serves_stack; then
        ver="$(psql -X -At "$(pg_dsn crm)" -c 'SHOW server_version' 2>/dev/null)"
        printf '%-10s %-8s 127.0.0.1:%-6s version %s (not started by this checkout)\n' \
            postgresql healthy "$PG_PORT" "$ver"
        return 0
    fi
    printf '%-10s %-8s 127.0.0.1:%-6s version %s\n' postgresql down "$PG_PORT" \
        "$("$PG_BIN/postgres" --version 2>/dev/null | awk '{print $3}') (binary)"
    return 1
}

# ------------------------------------------------------------------------------------- main

cmd_up() {
    mkdir -p "$STACK"
    # start both first (they boot in parallel), then wait for each
    kafka_start
    pg_start
    pg_wait
    kafka_wait
    local reused=""
    [[ -n "$KAFKA_REUSED$PG_REUSED" ]] && reused="; reused, not started by this checkout (\`down\` leaves it running):${KAFKA_REUSED:+ kafka}${PG_REUSED:+ postgresql}"
    log "stack up: kafka 127.0.0.1:$KAFKA_PORT, postgresql 127.0.0.1:$PG_PORT (sync/sync, crm, erp)$reused"
}

cmd_down() {
    local rc=0
    kafka_stop || rc=1
    pg_stop || rc=1
    return "$rc"
}

cmd_status() {
    local rc=0
    kafka_status || rc=1
    pg_status || rc=1
    return "$rc"
}

# Restart PostgreSQL in place (tests use it to show producers and consumers riding out a
# restart). Mode fast (default) or immediate (no checkpoint: crash recovery on start).
cmd_restart_pg() {
    local mode="${1:-fast}"
    [[ "$mode" == fast || "$mode" == immediate ]] || die "restart-pg: mode is fast or immediate"
    pg_running || die "postgresql is not running"
    log "restarting postgresql ($mode)"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m "$mode" -w -t 60 restart >/dev/null
}

# Kill the broker as a crash would (tests: clients must ride it out).
cmd_kill_kafka() {
    local pid
    pid="$(kafka_pid)" || die "kafka is not running"
    log "killing kafka (pid $pid) with SIGKILL"
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    rm -f "$KAFKA_PID"
}

cmd_start_kafka() {
    kafka_start
    kafka_wait
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    restart-pg) cmd_restart_pg "${2:-fast}" ;;
    kill-kafka) cmd_kill_kafka ;;
    start-kafka) cmd_start_kafka ;;
    *)
        echo "usage: $0 up|down|status|restart-pg [fast|immediate]|kill-kafka|start-kafka" >&2
        exit 2
        ;;
esac
