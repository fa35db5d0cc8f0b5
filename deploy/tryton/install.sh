#!/usr/bin/env bash
# Tryton 8.2 for the `tryton` ERP target: its own venv, and a template database to clone.
#
#   deploy/tryton/install.sh             venv (if the pins changed) + template database
#   deploy/tryton/install.sh venv        only the venv
#   deploy/tryton/install.sh template    only the template database (needs the venv)
#   deploy/tryton/install.sh rebuild     drop the template and build it again
#
# Idempotent: the venv carries a stamp with the hash of requirements.txt; the template is
# built under a temporary name and renamed to the template's name only when its
# set-up has finished, so an existing template is always complete (an interrupted build
# leaves <template>_build behind, which the next run drops).
#
# State under <repo>/.stack/tryton/: venv/, trytond.conf, admin.pass and sync.pass (the
# passwords of the Tryton users `admin` and `crm_sync`, generated once, mode 600),
# install.log. PostgreSQL is the local stack's (127.0.0.1:${STACK_PG_PORT:-15432}, role
# sync/sync, a development-only superuser).
#
# Environment: STACK_PG_PORT (15432), TRYTON_PYTHON (python3.11, else python3; >= 3.10),
# TRYTON_TEMPLATE_DB
# (tryton_template_<8 hex digits of the sha1 of this checkout's path>).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd -P)"
STATE="$ROOT/.stack/tryton"
VENV="$STATE/venv"
CONF="$STATE/trytond.conf"
LOG="$STATE/install.log"
PG_PORT="${STACK_PG_PORT:-15432}"
PY="${TRYTON_PYTHON:-$(command -v python3.11 || command -v python3 || echo python3)}"
# The template holds this checkout's passwords (above), and the stack's PostgreSQL may be
# shared by several checkouts (stack.sh reuses another checkout's stack): its name carries
# the checkout (sha1 of its path), so one checkout's build never replaces another's
# template under it. service/demo/tryton.py:template_name() computes the same name.
TEMPLATE="${TRYTON_TEMPLATE_DB:-tryton_template_$(printf '%s' "$ROOT" | sha1sum | cut -c1-8)}"
BUILD="${TEMPLATE}_build"
PG_ADMIN_DSN="postgresql://sync:sync@127.0.0.1:${PG_PORT}/postgres"

log() { printf '[tryton %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$STATE"
# One installer at a time (parallel test sessions, make targets): the second waits.
exec 9>"$STATE/install.lock"
flock -w 900 9 || die "another install.sh holds $STATE/install.lock for more than 15 min"

psql_admin() {
    "$VENV/bin/python" - "$PG_ADMIN_DSN" "$@" <<'EOF'
import sys
import psycopg
dsn, sql, *args = sys.argv[1:]
with psycopg.connect(dsn, autocommit=True) as conn:
    cur = conn.execute(sql, args or None)
    if cur.description:
        for row in cur:
            print(*row)
EOF
}

install_venv() {
    local want have=""
    want="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
    [[ -f "$VENV/.installed" ]] && have="$(cat "$VENV/.installed")"
    if [[ "$want" == "$have" ]]; then
        log "venv up to date ($VENV)"
        return
    fi
    command -v "$PY" >/dev/null || die "$PY not found (set TRYTON_PYTHON to a Python >= 3.10)"
    local t0=$SECONDS
    log "installing Tryton 8.2 into $VENV"
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$HERE/requirements.txt"
    echo "$want" >"$VENV/.installed"
    log "venv installed in $((SECONDS - t0)) s"
}

write_conf() {
    local user
    for user in admin sync; do
        if [[ ! -s "$STATE/$user.pass" ]]; then
            (umask 077; "$VENV/bin/python" -c \
                'import secrets; print(secrets.token_urlsafe(18))' >"$STATE/$user.pass")
        fi
    done
    cat >"$CONF" <<EOF
# Written by deploy/tryton/install.sh; local development only.
[database]
uri = postgresql://sync:sync@127.0.0.1:${PG_PORT}/
[web]
listen = 127.0.0.1:18000
[session]
# The sync keeps one session for its lifetime; the default is 30 days of inactivity anyway.
timeout = 86400
EOF
}

template_exists() {
    [[ "$(psql_admin "SELECT count(*) FROM pg_database WHERE datname = %s" "$TEMPLATE")" == 1 ]]
}

build_template() {
    local t0=$SECONDS
    log "building template database $TEMPLATE (several minutes on a loaded box)"
    psql_admin "DROP DATABASE IF EXISTS \"$BUILD\" WITH (FORCE)" >/dev/null
    psql_admin "CREATE DATABASE \"$BUILD\" ENCODING 'UTF8' TEMPLATE template0" >/dev/null
    # The admin's password comes from TRYTONPASSFILE; --email avoids the interactive prompt.
    TRYTONPASSFILE="$STATE/admin.pass" "$VENV/bin/trytond-admin" -c "$CONF" -d "$BUILD" \
        --all -u sale web_shop --activate-dependencies --email admin@example.invalid \
        >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "trytond-admin failed (log: $LOG)"; }
    log "modules activated in $((SECONDS - t0)) s"
    TRYTON_SYNC_PASSFILE="$STATE/sync.pass" "$VENV/bin/python" "$HERE/setup_template.py" \
        --config "$CONF" --database "$BUILD" --mappings "$ROOT/service/erp/mappings.toml" \
        >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "setup_template.py failed (log: $LOG)"; }
    psql_admin "ALTER DATABASE \"$BUILD\" RENAME TO \"$TEMPLATE\"" >/dev/null
    psql_admin "ALTER DATABASE \"$TEMPLATE\" WITH IS_TEMPLATE true" >/dev/null
    log "template $TEMPLATE built in $((SECONDS - t0)) s"
}

drop_template() {
    psql_admin "ALTER DATABASE \"$TEMPLATE\" WITH IS_TEMPLATE false" >/dev/null 2>&1 || true
    psql_admin "DROP DATABASE IF EXISTS \"$TEMPLATE\" WITH (FORCE)" >/dev/null
}

template() {
    [[ -x "$VENV/bin/trytond-admin" ]] || die "no Tryton venv: run $0 venv first"
    psql_admin "SELECT 1" >/dev/null 2>&1 \
        || die "PostgreSQL at 127.0.0.1:$PG_PORT (role sync) is not reachable: run make up"
    local had_passwords=1
    [[ -s "$STATE/admin.pass" && -s "$STATE/sync.pass" ]] || had_passwords=0
    write_conf
    if template_exists; then
        if ((had_passwords)); then
            log "template $TEMPLATE exists"
            return
        fi
        # The template holds the passwords of files that are gone: build it again.
        log "template $TEMPLATE exists but its password files do not: rebuilding"
        drop_template
    fi
    build_template
}

case "${1:-all}" in
    all) install_venv; template ;;
    venv) install_venv ;;
    template) template ;;
    rebuild) install_venv; write_conf; drop_template; build_template ;;
    *) die "usage: $0 [all|venv|template|rebuild]" ;;
esac
