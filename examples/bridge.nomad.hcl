# Nomad's networking guide, "bridge mode": the allocation gets its own network
# namespace on the "nomad" bridge; the task listens on port 3000 inside it, and the
# agent forwards a dynamic host port to it.  Bridge mode needs root
# (CAP_NET_ADMIN): an agent that is not root answers this job with a 500 saying so.
#
#   sudo waypost agent --dev --job examples/bridge.nomad.hcl
#   curl -s "$(curl -s localhost:4646/v1/allocations | jq -r '.[0].ID' \
#     | xargs -I{} curl -s localhost:4646/v1/allocation/{} | jq -r .Env.server.NOMAD_ADDR_http)"

job "bridge" {
  group "app" {
    network {
      mode = "bridge"

      port "http" {
        to = 3000
      }
    }

    service {
      name = "bridge"
      port = "http"

      check {
        type     = "http"
        path     = "/"
        interval = "5s"
        timeout  = "1s"
      }
    }

    task "server" {
      driver = "raw_exec"

      config {
        command = "python3"
        # Inside the namespace the port is 3000 (NOMAD_PORT_http is the "to" port).
        args = ["-m", "http.server", "--bind", "0.0.0.0", "3000"]
      }
    }
  }
}
