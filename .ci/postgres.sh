#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1 for the tests that need one (KDSL_TEST_PG_URL).
#
#   eval "$(bash .ci/postgres.sh)"     start; sets KDSL_TEST_PG_URL and KDSL_TEST_PG_DIR
#   source .ci/postgres.sh             the same, from inside a bash script
#   bash .ci/postgres.sh stop [DIR]    stop the cluster in DIR (default $KDSL_TEST_PG_DIR) and remove it
#
# The cluster lives in a temporary directory, trusts local TCP connections, listens on 127.0.0.1 only,
# and runs as the `postgres` user when started by root (initdb refuses root). PostgreSQL comes from the
# Debian package `postgresql`; it is installed when missing and we are root.

_kdsl_pg_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [[ -z "$dir" ]] && command -v initdb >/dev/null 2>&1; then
        dir="$(dirname "$(readlink -f "$(command -v initdb)")")"
    fi
    echo "$dir"
}

_kdsl_pg_as_owner() {  # run a command as the cluster's owner
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_kdsl_pg_start() (
    set -euo pipefail
    bindir="$(_kdsl_pg_bindir)"
    if [[ -z "$bindir" ]]; then
        if [[ "$(id -u)" == 0 ]]; then
            echo "postgres.sh: installing postgresql from Debian packages" >&2
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
            bindir="$(_kdsl_pg_bindir)"
        fi
        [[ -n "$bindir" ]] || { echo "postgres.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
    fi
    dir="$(mktemp -d /tmp/kdsl-pg.XXXXXX)"
    [[ "$(id -u)" == 0 ]] && chown postgres: "$dir"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    _kdsl_pg_as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    # fsync off: the cluster is thrown away, and the tests measure correctness, not durability.
    _kdsl_pg_as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >&2 \
        || { cat "$dir/server.log" >&2; exit 1; }
    _kdsl_pg_as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres kdsl_test
    echo "export KDSL_TEST_PG_DIR=$dir"
    echo "export KDSL_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:$port/kdsl_test"
)

_kdsl_pg_stop() (
    set -euo pipefail
    dir="${1:-${KDSL_TEST_PG_DIR:-}}"
    [[ -n "$dir" && -d "$dir/data" ]] || { echo "postgres.sh: no cluster directory given" >&2; exit 1; }
    _kdsl_pg_as_owner "$(_kdsl_pg_bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    rm -rf "$dir"
)

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: export into the caller's shell without leaking `set -e` into it.
    if _kdsl_pg_lines="$(_kdsl_pg_start)"; then
        eval "$_kdsl_pg_lines"
        echo "$_kdsl_pg_lines"
    else
        return 1
    fi
elif [[ "${1:-start}" == "stop" ]]; then
    _kdsl_pg_stop "${2:-}"
else
    _kdsl_pg_start
fi
