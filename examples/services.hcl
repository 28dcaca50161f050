# Example services for `make run` (waypost agent --dev --config examples/services.hcl).
#
# Consul's service shape: instances registered from a file, which the agent
# serves but does not run (nothing listens on these ports; the example job,
# examples/web.job.json, is what runs).  An empty or missing address means the
# node's address (127.0.0.1 in --dev), so SRV targets are <node>.node.dc1.nomad.
#
#   dig @127.0.0.1 -p 8600 SRV api.service.nomad             three instances
#   dig @127.0.0.1 -p 8600 SRV v1.primary.api.service.nomad   api-1 only
#   dig @127.0.0.1 -p 8600 TXT api.service.nomad              api-1's meta
#   dig @127.0.0.1 -p 8600 SRV _metrics._tcp.db.service.nomad the named port

service {
  name = "api"
  id   = "api-1"
  port = 8081
  tags = ["primary", "v1"]
  meta = {
    version = "1.4.2"
    owner   = "team-a"
  }
}

service {
  name = "api"
  id   = "api-2"
  port = 8082
  tags = ["v1"]
}

service {
  name    = "api"
  id      = "api-3"
  address = "127.0.0.1"
  port    = 8083
  tags    = ["v2"]
  weights {
    passing = 3 # SRV weight while passing (default 1)
    warning = 1
  }
}

service {
  name = "db"
  id   = "db-1"
  port = 5432
  tags = ["primary"]
  ports = {
    metrics = 9187 # _metrics._tcp.db.service.nomad
  }
}
