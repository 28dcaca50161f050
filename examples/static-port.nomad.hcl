# Nomad's networking guide, "static ports": the task gets the port the job names.
#
# The guide uses port 80; binding a port under 1024 needs root (CAP_NET_BIND_SERVICE),
# so this one uses 30080: high enough to run as any user, inside Linux's unprivileged
# range and below its ephemeral range (32768-60999), so the kernel never hands it out
# to an outgoing connection.  One host gives a static port to one allocation only:
# count stays 1.
#
#   waypost agent --dev --job examples/static-port.nomad.hcl
#   curl -s localhost:30080/

job "static-port" {
  group "app" {
    count = 1

    network {
      port "http" {
        static = 30080
      }
    }

    service {
      name = "static-port"
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
        args    = ["-m", "http.server", "--bind", "${NOMAD_IP_http}", "${NOMAD_PORT_http}"]
      }
    }
  }
}
