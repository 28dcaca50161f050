# Example services for `make run` (waypost agent --dev --config examples/services.hcl).
#
# Consul's service shape.  An empty or missing address means the node's
# address (127.0.0.1 in --dev), so SRV targets are <node>.node.dc1.nomad.
#
#   dig @127.0.0.1 -p 8600 SRV web.service.nomad             three instances
#   dig @127.0.0.1 -p 8600 SRV v1.primary.web.service.nomad   web-1 only
#   dig @127.0.0.1 -p 8600 TXT web.service.nomad              web-1's meta
#   dig @127.0.0.1 -p 8600 SRV _metrics._tcp.db.service.nomad the named port

service {
  name = "web"
  id   = "web-1"
  port = 8081
  tags = ["primary", "v1"]
  meta = {
    version = "1.4.2"
    owner   = "team-a"
  }
}

service {
  name = "web"
  id   = "web-2"
  port = 8082
  tags = ["v1"]
}

service {
  name    = "web"
  id      = "web-3"
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
