# Nomad's networking guide, "dynamic ports": the agent picks a free port from its
# dynamic range (20000-32000) and tells the task through NOMAD_PORT_http.
#
#   waypost agent --dev --job examples/dynamic-port.nomad.hcl
#   curl -s localhost:4646/v1/job/dynamic-port/allocations | jq -r '.[].ID'

variable "greeting" {
  description = "What the server answers"
  default     = "hello from a dynamic port"
}

job "dynamic-port" {
  group "app" {
    network {
      port "http" {}
    }

    service {
      name = "dynamic-port"
      port = "http"

      check {
        type     = "tcp"
        interval = "5s"
        timeout  = "1s"
      }
    }

    task "server" {
      driver = "raw_exec"

      config {
        command = "python3"
        # A tiny server taking its port as --port=..., as most programs do.
        args = [
          "-c",
          <<-EOF
          import argparse, http.server
          parser = argparse.ArgumentParser()
          parser.add_argument("--port", type=int)
          parser.add_argument("--bind")
          args = parser.parse_args()
          class Hello(http.server.BaseHTTPRequestHandler):
              def do_GET(self):
                  body = b"${var.greeting}\n"
                  self.send_response(200)
                  self.send_header("Content-Length", str(len(body)))
                  self.end_headers()
                  self.wfile.write(body)
          http.server.HTTPServer((args.bind, args.port), Hello).serve_forever()
          EOF
          ,
          "--port=${NOMAD_PORT_http}",
          "--bind=${NOMAD_IP_http}",
        ]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
