# Nomad dev agent for the orchestrator: `nomad agent -dev -config=nomad/nomad.hcl`
# (`make nomad-dev` runs it, with Consul). Needs Nomad >= 1.10 (dynamic host volumes).
bind_addr = "127.0.0.1"

advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

client {
  enabled = true
  # Where the built-in `mkdir` plugin creates each engine's dynamic host volume (its brain).
  # -dev puts data_dir in a temp dir; this keeps brains somewhere an operator can look.
  host_volumes_dir = "/tmp/orch-nomad/host_volumes"
}

# jobspecs/engine.raw_exec.json runs the reference engine without Docker.
plugin "raw_exec" {
  config {
    enabled = true
  }
}

# Engines register their service and /health check here; see them in the Consul UI.
consul {
  address = "127.0.0.1:8500"
}
