#!/usr/bin/env bash
# PostgreSQL for the labelling app's database test (tests/test_label_postgres.py): Debian's server
# binaries (initdb, pg_ctl; the test starts its own throw-away cluster on 127.0.0.1, as the postgres
# user when run as root) and the psycopg driver (also in the `test` extra).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  apt-get update
  apt-get install -y --no-install-recommends postgresql
fi
python -m pip install "psycopg[binary]>=3.1"
