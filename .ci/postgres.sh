#!/usr/bin/env bash
# Install PostgreSQL from Debian's packages if missing, start it on loopback, make a role for
# the tests, and print the URL for ORCH_TEST_POSTGRES. Needs root (CI and dev machines here).
set -euo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
version=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
if [ -z "$version" ]; then
  version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  pg_createcluster "$version" main >&2
fi
sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" "/etc/postgresql/$version/main/postgresql.conf"
pg_ctlcluster "$version" main start >&2 2>&1 || pg_ctlcluster "$version" main status >&2
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
for _ in $(seq 1 50); do
  runuser -u postgres -- psql -p "$port" -qAtc "SELECT 1" >/dev/null 2>&1 && break
  sleep 0.2
done
runuser -u postgres -- psql -p "$port" -qc "DO \$\$BEGIN CREATE ROLE orch_test LOGIN SUPERUSER PASSWORD 'orch_test'; EXCEPTION WHEN duplicate_object THEN NULL; END\$\$;" >&2
echo "postgresql://orch_test:orch_test@127.0.0.1:$port/postgres"
