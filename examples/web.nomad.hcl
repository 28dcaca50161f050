# The job of examples/web.job.json as an HCL jobspec: three Python web servers on
# dynamic ports, restarted 2 s after they exit, served as the service "web" while
# their HTTP check passes.
#
#   waypost agent --dev --job examples/web.nomad.hcl
#   dig +short @127.0.0.1 -p 8600 SRV web.service.nomad

job "web" {
  type = "service"

  group "web" {
    count = 3

    restart {
      attempts = 2
      interval = "30m"
      delay    = "2s"
      mode     = "fail"
    }

    network {
      mode = "host"
      port "http" {}
    }

    service {
      name = "web"
      port = "http"
      tags = ["http", "v1"]

      meta {
        version = "1"
      }

      check {
        name     = "web alive"
        type     = "http"
        path     = "/"
        interval = "2s"
        timeout  = "1s"
      }
    }

    task "server" {
      driver = "raw_exec"

      config {
        command = "python3"
        # ${NOMAD_*} is left for the agent to fill in when it starts the task.
        args = ["-m", "http.server", "--bind", "${NOMAD_IP_http}", "${NOMAD_PORT_http}"]
      }
    }
  }
}
