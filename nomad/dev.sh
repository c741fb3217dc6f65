#!/usr/bin/env bash
# Start `consul agent -dev` and `nomad agent -dev` on loopback with this directory's configs,
# wait until both have a leader, and print the environment the orchestrator needs.
# `nomad/dev.sh stop` stops them. Logs and pids: .orch/agents/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=${ORCH_STATE_DIR:-.orch}/agents
mkdir -p "$run" /tmp/orch-nomad/host_volumes

stop() {
  for name in nomad consul; do
    if [ -f "$run/$name.pid" ]; then
      kill "$(cat "$run/$name.pid")" 2>/dev/null || true
      rm -f "$run/$name.pid"
    fi
  done
}

if [ "${1:-start}" = stop ]; then stop; exit 0; fi

wait_leader() {  # name url
  for _ in $(seq 1 100); do
    if curl -fsS "$2" 2>/dev/null | grep -q ':'; then return 0; fi
    sleep 0.2
  done
  echo "$1 did not elect a leader; see $run/$1.log" >&2
  exit 1
}

consul agent -dev -config-file="$here/consul.hcl" >"$run/consul.log" 2>&1 &
echo $! >"$run/consul.pid"
wait_leader consul http://127.0.0.1:8500/v1/status/leader

nomad agent -dev -config="$here/nomad.hcl" >"$run/nomad.log" 2>&1 &
echo $! >"$run/nomad.pid"
wait_leader nomad http://127.0.0.1:4646/v1/status/leader

cat <<EOT
Nomad and Consul are up (logs in $run; stop with: bash nomad/dev.sh stop).
  export ORCH_DRIVER=nomad NOMAD_ADDR=http://127.0.0.1:4646 CONSUL_HTTP_ADDR=127.0.0.1:8500
  export ORCH_NOMAD_JOBSPEC=jobspecs/engine.raw_exec.json   # or engine.docker.json with Docker
  make run                          # the orchestrator on Nomad
  NOMAD_REAL=1 make integration     # the integration suite against these agents
EOT
