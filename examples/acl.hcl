# ACL tokens for the HTTP API.  Use with the services of make run:
#
#   waypost agent --dev --config examples/services.hcl --config examples/acl.hcl
#
# Tokens go in X-Consul-Token, X-Nomad-Token, `Authorization: Bearer <token>`
# or Consul's ?token=.  Writes need a "write" token; reads a "read" or "write"
# one, or default_policy = "read".  Without a known token a request gets
# default_policy.  /v1/agent/health needs no token.  Secrets: at least 8
# characters; keep the real ones out of version control.
acl {
  enabled        = true
  default_policy = "deny" # or "read": anonymous reads allowed (never "write")
  tokens = {
    "3f0c1a9e-reader" = "read"
    "b72d54e1-writer" = "write"
  }
}
