#!/usr/bin/env bash
# Install BottleCRM (PyPI django-crm, a real open-source Django CRM on PostgreSQL) into a venv of
# its own, and build a TEMPLATE database from its real migrations that tests clone per test.
#
#   deploy/bottlecrm/install.sh            venv + template (each step skipped when already done)
#
# The venv is <repo>/.stack/bottlecrm/venv (git-ignored; BOTTLECRM_HOME moves .stack/bottlecrm).
# BottleCRM needs Python >= 3.12: BOTTLECRM_PYTHON, else pyenv's 3.12.1 ($PYENV_ROOT, default
# /root/.pyenv as in this machine image), else a python3.12 on PATH. Without one the script
# exits 3 (the tests skip on that code).
#
# The template is `bottlecrm_template` (BOTTLECRM_TEMPLATE) on the local stack PostgreSQL
# (127.0.0.1:STACK_PG_PORT, default 15432, role sync/sync; STACK_PG_HOST/USER/PASSWORD override).
# It is built under a temporary name, then renamed, marked IS_TEMPLATE with connections
# disallowed (so no session can block a clone), and commented with a marker that names the
# pinned requirements; a template with a matching marker is complete and is kept.
# Concurrent runs (several worktrees share one PostgreSQL) serialise on an advisory lock.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${BOTTLECRM_HOME:-$ROOT/.stack/bottlecrm}"
VENV="$STATE/venv"
REQ="$HERE/requirements.txt"
STAMP="$VENV/.crm-erp-sync-installed"

export PGHOST="${STACK_PG_HOST:-127.0.0.1}"
export PGPORT="${STACK_PG_PORT:-15432}"
export PGUSER="${STACK_PG_USER:-sync}"
export PGPASSWORD="${STACK_PG_PASSWORD:-sync}"
TEMPLATE="${BOTTLECRM_TEMPLATE:-bottlecrm_template}"
BUILD_DB="${TEMPLATE}_build"
LOCK_KEY=738112204  # advisory lock id shared by every run against this cluster

T0=$EPOCHREALTIME
log() { printf '[bottlecrm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $1"; exit "${2:-1}"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }'; }

REQ_HASH="$(sha256sum "$REQ" | cut -c1-16)"
MARKER="crm-erp-sync bottlecrm template: migrated, requirements $REQ_HASH"

# ---- Python 3.12 --------------------------------------------------------------------------
is_py312() { [[ -x "$1" ]] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

find_python() {
    local c
    for c in "${BOTTLECRM_PYTHON:-}" "${PYENV_ROOT:-/root/.pyenv}/versions/3.12.1/bin/python" \
             "$(command -v python3.12 || true)"; do
        if [[ -n "$c" ]] && is_py312 "$c"; then printf '%s\n' "$c"; return 0; fi
    done
    return 1
}

# ---- venv ---------------------------------------------------------------------------------
install_venv() {
    local want have py t
    want="$REQ_HASH"
    have="$(cat "$STAMP" 2>/dev/null || true)"
    if [[ "$have" == "$want" && -x "$VENV/bin/django-admin" ]]; then
        log "venv up to date ($VENV)"
        return 0
    fi
    py="$(find_python)" || die "BottleCRM needs Python 3.12 (django-crm 1.35.0 requires >=3.12): \
set BOTTLECRM_PYTHON, or install it (pyenv install 3.12.1), or put python3.12 on PATH" 3
    log "installing django-crm into $VENV with $py ($("$py" -V 2>&1))"
    t=$EPOCHREALTIME
    rm -rf "$VENV"
    mkdir -p "$STATE"
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
    printf '%s\n' "$want" > "$STAMP"
    log "venv installed in $(since "$t")"
}

# ---- template database ---------------------------------------------------------------------
psql_admin() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d postgres -At "$@"; }

template_marker() {
    psql_admin -c "SELECT coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database \
WHERE datname = '$TEMPLATE'"
}

build_template() {
    local t
    if [[ "$(template_marker)" == "$MARKER" ]]; then
        log "template $TEMPLATE is complete"
        return 0
    fi
    pg_isready -q -t 5 || die "PostgreSQL at $PGHOST:$PGPORT does not answer: run \`make up\`"
    # One session holds the advisory lock while this shell builds; coproc keeps it open.
    coproc LOCK { psql -X -q -d postgres -At 2>&1; }
    printf "SELECT 'locked' FROM pg_advisory_lock(%s);\n" "$LOCK_KEY" >&"${LOCK[1]}"
    local line
    read -r line <&"${LOCK[0]}"
    [[ "$line" == locked ]] || die "could not take the template lock: $line"
    if [[ "$(template_marker)" == "$MARKER" ]]; then  # another run built it while we waited
        log "template $TEMPLATE is complete"
        return 0
    fi
    log "building template $TEMPLATE (django-admin migrate; a few minutes)"
    t=$EPOCHREALTIME
    psql_admin <<SQL
DROP DATABASE IF EXISTS "$BUILD_DB" WITH (FORCE);
CREATE DATABASE "$BUILD_DB" ENCODING 'UTF8' TEMPLATE template0;
SQL
    (
        cd "$STATE"
        DJANGO_SETTINGS_MODULE=crm.settings ENV_TYPE=dev SECRET_KEY=crm-erp-sync-tests-only-not-a-real-secret-key \
        DBNAME="$BUILD_DB" DBUSER="$PGUSER" DBPASSWORD="$PGPASSWORD" DBHOST="$PGHOST" \
        DBPORT="$PGPORT" "$VENV/bin/django-admin" migrate --noinput -v 1 > "$STATE/migrate.log" 2>&1
    ) || { tail -n 40 "$STATE/migrate.log" >&2; die "migrate failed (log: $STATE/migrate.log)"; }
    log "migrated in $(since "$t") ($(grep -c '  Applying ' "$STATE/migrate.log") migrations)"
    psql_admin <<SQL
SELECT format('ALTER DATABASE %I IS_TEMPLATE false', datname) FROM pg_database
 WHERE datname = '$TEMPLATE' \\gexec
DROP DATABASE IF EXISTS "$TEMPLATE" WITH (FORCE);
ALTER DATABASE "$BUILD_DB" RENAME TO "$TEMPLATE";
ALTER DATABASE "$TEMPLATE" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false;
COMMENT ON DATABASE "$TEMPLATE" IS '$MARKER';
SQL
    log "template $TEMPLATE ready"
}

# One run at a time per state directory (two test sessions in one worktree, say).
mkdir -p "$STATE"
exec 9> "$STATE/.install.lock"
flock 9
install_venv
build_template
log "done in $(since "$T0")"
