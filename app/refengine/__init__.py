"""The reference engine, `python -m app.refengine`: the engine contract of the spec, standard
library only, so that it boots in tens of milliseconds and benchmarks measure the orchestrator,
not the engine.

Environment
  ENGINE_PORT          port to listen on (required; 0 = any free port, named in the log)
  ENGINE_HOST          address to listen on (default 127.0.0.1; the Nomad jobspec sets 0.0.0.0)
  ENGINE_BRAIN_DIR     persistent directory (required; created with mode 0700 if missing)
  ENGINE_API_KEY_FILE  file holding the current key, whitespace stripped (required, not empty;
                       re-read on SIGHUP)
  ENGINE_USER_ID       reported by /v1/info; empty for a warm pool's engine, which learns its
                       user from PUT /v1/identity and keeps it in ENGINE_BRAIN_DIR/identity
                       (read at start, before ENGINE_USER_ID)
  ENGINE_VERSION       reported by /v1/info; may carry fault knobs (below)
A missing or bad variable prints one line to stderr and exits 2; a port that cannot be bound
exits 1.

Routes (JSON unless said otherwise)
  GET  /health               200 {"status":"ok"}, or 503 {"status":"unhealthy"}; no auth
  Everything else needs `Authorization: Bearer <key>`, else 401 {"error":"unauthorized"}:
  GET  /v1/keycheck          200 {"ok":true} (the orchestrator confirms key rotations with it)
  GET  /v1/info              200 {"user_id","version","pid","started_at" (ISO 8601 UTC)}
  PUT  /v1/identity          {"user_id": str}: 200 {"user_id"} once recorded (again: the same
                             user 200, another 409)
  PUT  /v1/memory/{key}      stores the raw body in the brain: 200 {"stored": <bytes>}
  GET  /v1/memory/{key}      200 the stored bytes (application/octet-stream), or 404
  DELETE /v1/memory/{key}    204, or 404
  POST /v1/checkpoint        {"hold_s": seconds, default 60}: 200 once every write in progress
                             is on disk; writes then wait until DELETE or hold_s passes
  DELETE /v1/checkpoint      200 {"released": true}; 409 when the hold had run out already
  POST /v1/admin/exit        {"code": 0..255}: 202, then the process exits with that code
  POST /v1/admin/health      {"healthy": bool}: 200, and /health answers accordingly
  Unknown route 404, wrong method 405, bad JSON or field 400, body over 1 MiB 413. A memory
  key is 1 to 200 characters after percent-decoding (else 400); any character is allowed.

Signals
  SIGHUP           re-read the key file; logs `reloaded key` (a missing or empty file keeps
                   the current key and logs why)
  SIGTERM, SIGINT  `received SIGTERM`, stop accepting, let in-flight requests finish (at most
                   3 s), `shutdown complete`, exit 0
Stdout carries `listening on HOST:PORT` once ready; every line is written unbuffered.

Fault knobs, for tests: `+`-separated tokens after the first `+` of ENGINE_VERSION, e.g.
`ref-1.0+fault-crash` or `ref+boot-delay-500+fault-hang-term`. Unknown tokens are ignored.
  fault-crash             exit 3 at start, before ever answering /health
  fault-never-healthy     listen, but /health always answers 503 (even after admin/health)
  fault-hang-term         ignore SIGTERM and SIGINT (print `ignoring SIGTERM`); only SIGKILL ends it
  boot-delay-<ms>         wait that long before listening (SIGTERM still ends it meanwhile)
  fault-crash-after-<ms>  become healthy, then exit 3 that long after listening
  hup-delay-<ms>          apply each SIGHUP's key reload that long later (a slow rotation)
  identity-delay-<ms>     answer PUT /v1/identity that long later (a slow claim)
  identity-drop-unheard   forget a PUT /v1/identity whose client closed the connection before
                          the answer (with identity-delay: a claimer that died mid-call), so
                          the engine learns its user only from a call that is heard out
"""
