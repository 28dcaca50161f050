"""Benchmark data: services, query files and each server's config.  Pure: no I/O.

The same N services x 3 instances are rendered three ways, so that waypost,
Knot DNS and dnsmasq serve identical record sets:

- waypost: its JSON agent config (`service` blocks, Consul's shape);
- Knot: a `nomad.` zone file with the SRV records waypost would answer
  (targets `<hexip>.addr.dc1.nomad.`), the A records of those targets, and
  A records at the service names; plus a knot.conf (one UDP and one TCP worker);
- dnsmasq: `srv-host=` and `host-record=` lines.

Instance addresses are record data only (10.0.0.0/8, never contacted).
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

DOMAIN = "nomad"
DATACENTER = "dc1"
NODE_NAME = "bench"
NODE_ADDRESS = "127.0.0.1"  # the agent's own node; no instance uses it, so targets are addr.
INSTANCES_PER_SERVICE = 3
BASE_PORT = 20000
# The query mix the issue asks for: 70% SRV, 20% A, 10% names that do not exist.
SRV_SHARE = 0.70
A_SHARE = 0.20
QUERY_SEED = 2026
QUERY_LINES = 100_000  # dnsperf loops over the file; long enough to avoid a tiny cycle


@dataclass(frozen=True, slots=True)
class BenchInstance:
    """One service instance as the three servers see it."""

    service: str
    id: str
    address: str
    port: int
    tags: tuple[str, ...]

    @property
    def target(self) -> str:
        """The SRV target waypost answers (address differs from the node's)."""
        return f"{hexip(self.address)}.addr.{DATACENTER}.{DOMAIN}"


def hexip(address: str) -> str:
    """`10.1.0.1` -> `0a010001` (the `<hexip>.addr` label of dns_rules.md)."""
    return ipaddress.ip_address(address).packed.hex()


def service_name(index: int) -> str:
    return f"svc{index}"


def plan_instances(services: int) -> tuple[BenchInstance, ...]:
    """`services` services named svc1..svcN, each with 3 distinct 10.x addresses."""
    out: list[BenchInstance] = []
    for i in range(1, services + 1):
        name = service_name(i)
        for j in range(1, INSTANCES_PER_SERVICE + 1):
            address = f"10.{(i >> 8) & 0xFF}.{i & 0xFF}.{j}"
            if i >= 1 << 16:
                raise ValueError(f"{services} services do not fit the 10.x.y.z address plan")
            out.append(
                BenchInstance(
                    service=name,
                    id=f"{name}-{j}",
                    address=address,
                    port=BASE_PORT + (i * INSTANCES_PER_SERVICE + j) % 10_000,
                    tags=(f"v{j}",),
                )
            )
    return tuple(out)


def render_waypost_config(instances: Sequence[BenchInstance]) -> str:
    """waypost's JSON agent config holding every instance."""
    services = [
        {
            "name": inst.service,
            "id": inst.id,
            "address": inst.address,
            "port": inst.port,
            "tags": list(inst.tags),
        }
        for inst in instances
    ]
    doc = {"datacenter": DATACENTER, "node_name": NODE_NAME, "service": services}
    return json.dumps(doc, indent=1) + "\n"


def render_knot_zone(instances: Sequence[BenchInstance]) -> str:
    """The `nomad.` zone file (TTL 0 everywhere, as waypost's defaults)."""
    ns = f"{NODE_NAME}.node.{DATACENTER}.{DOMAIN}."
    lines = [
        f"$ORIGIN {DOMAIN}.",
        "$TTL 0",
        f"@ SOA {ns} hostmaster.{DOMAIN}. 1 3600 600 86400 0",
        f"@ NS {ns}",
        f"{ns} A {NODE_ADDRESS}",
    ]
    for inst in instances:
        fqdn = f"{inst.service}.service.{DOMAIN}."
        lines.append(f"{fqdn} SRV 1 1 {inst.port} {inst.target}.")
        lines.append(f"{fqdn} A {inst.address}")
        lines.append(f"{inst.target}. A {inst.address}")
    return "\n".join(lines) + "\n"


def render_knot_conf(*, port: int, rundir: str, storage: str, zonefile: str) -> str:
    """knot.conf: loopback only, one UDP and one TCP worker, state in a temp dir."""
    return f"""\
server:
    rundir: "{rundir}"
    listen: 127.0.0.1@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

database:
    storage: "{storage}"

log:
  - target: stderr
    any: warning

zone:
  - domain: {DOMAIN}.
    file: "{zonefile}"
    journal-content: none
    zonefile-sync: -1
"""


def render_dnsmasq_conf(instances: Sequence[BenchInstance]) -> str:
    """dnsmasq conf-file lines: SRV at the service names, A for targets and names."""
    lines = [
        f"local=/{DOMAIN}/",
        f"host-record={NODE_NAME}.node.{DATACENTER}.{DOMAIN},{NODE_ADDRESS}",
    ]
    for inst in instances:
        fqdn = f"{inst.service}.service.{DOMAIN}"
        lines.append(f"srv-host={fqdn},{inst.target},{inst.port},1,1")
        lines.append(f"host-record={fqdn},{inst.address}")
        lines.append(f"host-record={inst.target},{inst.address}")
    return "\n".join(lines) + "\n"


def plan_queries(
    services: int, *, lines: int = QUERY_LINES, seed: int = QUERY_SEED
) -> list[tuple[str, str]]:
    """(name, type) pairs: 70% SRV, 20% A at service names, 10% nonexistent names."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for _ in range(lines):
        roll = rng.random()
        index = rng.randint(1, services)
        if roll < SRV_SHARE:
            out.append((f"{service_name(index)}.service.{DOMAIN}", "SRV"))
        elif roll < SRV_SHARE + A_SHARE:
            out.append((f"{service_name(index)}.service.{DOMAIN}", "A"))
        else:
            out.append((f"nx{index}.service.{DOMAIN}", "A"))
    return out


def render_queries(queries: Sequence[tuple[str, str]]) -> str:
    """dnsperf's input format: one `name TYPE` per line."""
    return "".join(f"{name} {qtype}\n" for name, qtype in queries)
