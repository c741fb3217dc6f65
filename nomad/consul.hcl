# Consul dev agent for the orchestrator: `consul agent -dev -config-file=nomad/consul.hcl`.
# The UI (http://127.0.0.1:8500/ui) shows each engine's service, its product and user_id (tags
# and meta) and its /health check.
bind_addr   = "127.0.0.1"
client_addr = "127.0.0.1"
ui_config {
  enabled = true
}
