# Consul mirror: push this agent's instances into Consul, pull the others back.
#
#   CONSUL_HTTP_ADDR=127.0.0.1:8500 \
#     waypost agent --dev --config examples/services.hcl --config examples/consul.hcl
#
# A `consul` block turns the mirror on (`consul {}` alone: push and pull, with
# CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN or 127.0.0.1:8500).  The block's own
# keys win over the environment.  Changes need a restart (SIGHUP keeps the
# running mirror and logs that it changed).

consul {
  # address    = "127.0.0.1:8500"  # [http(s)://]host[:port]; default CONSUL_HTTP_ADDR, else 127.0.0.1:8500
  # token      = "<secret>"        # X-Consul-Token; default CONSUL_HTTP_TOKEN; never logged
  # datacenter = "dc1"             # the catalog pulled; default: the Consul agent's own
  push     = true # register this agent's instances with the Consul agent
  pull     = true # read the catalog (other hosts' instances) into the registry
  services = []   # services pulled; empty: every service in the catalog
}
