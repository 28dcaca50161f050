# waypost agent configuration: every key, set to its default unless noted.
#
#   waypost agent --config examples/agent.hcl --config examples/services.hcl
#
# Files given later extend earlier ones: settings override key by key
# (so two files may each set part of `dns`), `service` blocks add up.
# Durations are Go/Consul strings ("0s", "250ms", "5s", "1m30s") or
# integers (seconds).  Unknown keys are an error.  JSON files (*.json)
# take the same keys.  SIGHUP re-reads every file: services and `dns`
# apply at once; node, addresses, ports, data_dir, `acl` and `consul`
# need a restart.

datacenter  = "dc1"         # the <dc> label in names; queries without it mean this one
domain      = "nomad."      # the zone waypost answers for
alt_domains = ["waypost."]  # answered exactly like `domain` (default: none)
# node_name = "my-host"     # default: this host's name as a DNS label

bind_addr = "127.0.0.1" # where DNS and HTTP listen unless `addresses` says otherwise
# advertise_addr = "192.0.2.10"  # this node's address; default: bind_addr, or
#                                # 127.0.0.1 when bind_addr is 0.0.0.0 or ::

data_dir = "/var/lib/waypost" # waypost.db (SQLite) and its lock; default ./data with --dev

addresses {
  dns  = "127.0.0.1" # default: bind_addr
  http = "127.0.0.1" # default: bind_addr
}

ports {
  dns  = 8600 # UDP and TCP; 0 picks a free port
  http = 4646 # the HTTP API (Consul and Nomad shapes); 0 picks a free port
}

dns {
  # TTL of service records (default "0s"): one duration, or per service (exact name, then
  # the longest "prefix*", then "*"), as Consul's dns_config.service_ttl.
  service_ttl = {
    "*"   = "0s"
    "web" = "5s"
    "db*" = "10s"
  }
  node_ttl = "0s" # <node>.node, <hexip>.addr and <alloc>.alloc records

  soa {
    refresh = "1h"
    retry   = "10m"
    expire  = "24h"
    min_ttl = "0s" # also the TTL of negative answers (RFC 2308)
  }

  only_passing     = false # true: serve passing instances only, not warning ones
  udp_answer_limit = 3     # answers in a UDP reply to a client without EDNS
  enable_truncate  = true  # set TC=1 when a UDP reply was trimmed
  edns_max_payload = 1232  # cap on the UDP size a client may ask for (512-65535)
  tcp_idle_timeout = "10s" # close idle TCP connections (RFC 7766)

  # Forward queries outside the zone (default: none, they are REFUSED).
  recursors            = ["127.0.0.53", "127.0.0.1:5353"] # "ip", "ip:port", "[v6]:port"
  recursor_timeout     = "2s"
  allow_recursion_from = ["127.0.0.0/8", "::1/128"] # clients that may use the recursors
}

# Services use Consul's shape; `service` may appear any number of times.
service {
  name    = "billing"       # required; a DNS label
  id      = "billing-1"     # default: the name; unique across all files
  address = "127.0.0.1"     # default: this node's address
  port    = 9090
  tags    = ["v1", "canary"]
  meta = {                  # served as TXT "key=value"
    version      = "2.0"
    srv-priority = "10"     # SRV priority (default 1)
  }
  weights {                 # SRV weight when passing / warning
    passing = 10
    warning = 1
  }
  ports = {                 # named ports: _grpc._tcp.billing.service.nomad
    grpc = 9091
  }

  # Consul's check shape; exactly one of http, tcp or ttl.  The agent runs
  # http and tcp checks every `interval`; a ttl check is critical until
  # PUT /v1/agent/check/pass/<id> (then again when the ttl runs out).
  # A check without `status` starts critical, as in Consul; the service's
  # health is the worst of its checks.
  check {
    id       = "billing-http"                   # default: service:<service id>[:<n>]
    name     = "Billing health"
    http     = "http://127.0.0.1:9090/health"   # or tcp = "127.0.0.1:9090", or ttl = "30s"
    interval = "10s"                            # required for http and tcp
    timeout  = "2s"                             # default 10s
    deregister_critical_service_after = "10m"   # remove the instance after 10m critical
    status   = "passing"                        # initial status
  }
}

# ACL tokens for the HTTP API (see examples/acl.hcl).  Off by default.
acl {
  enabled        = false
  default_policy = "deny" # requests without a known token: "deny" or "read"
  tokens         = {}     # { "<secret of 8+ characters>" = "read" | "write" }
}

# The Consul mirror (see examples/consul.hcl).  A `consul` block, even an empty
# one, turns it on; without one there is no mirror.
# consul {
#   address    = "127.0.0.1:8500"  # default CONSUL_HTTP_ADDR, else 127.0.0.1:8500
#   token      = "<secret>"        # default CONSUL_HTTP_TOKEN
#   datacenter = "dc1"             # default: the Consul agent's
#   push       = true
#   pull       = true
#   services   = []                # pulled services; empty: all
# }
