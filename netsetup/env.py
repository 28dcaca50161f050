"""The NOMAD_* environment of an allocation's ports.  Pure: no I/O.

Built exactly as Nomad's client does it (client/taskenv/env.go: `addPorts`,
`addNomadAllocNetwork`, the key cleaning at the end of `buildEnv`), for each
port label:

    NOMAD_IP_<l>, NOMAD_HOST_IP_<l>        the host IP
    NOMAD_ADDR_<l>, NOMAD_HOST_ADDR_<l>    host IP:host port
    NOMAD_HOST_PORT_<l>                    host port
    NOMAD_PORT_<l>, NOMAD_ALLOC_PORT_<l>   `to` when > 0, else the host port
and, in bridge mode only (Nomad sets them when the allocation has a network
status, i.e. a namespace):
    NOMAD_ALLOC_IP_<l>                     the allocation's address
    NOMAD_ALLOC_ADDR_<l>                   alloc IP:alloc port
    NOMAD_ALLOC_INTERFACE_<l>              the interface inside ("eth0")

Label cleaning, as Nomad: only keys starting with NOMAD_ADDR_, NOMAD_IP_,
NOMAD_PORT_ or NOMAD_HOST_PORT_ are cleaned (`helper.CleanEnvVar(key, '_')`:
every byte other than ASCII letters, `_`, `.` and non-leading digits becomes
`_`, so a non-ASCII character becomes one `_` per UTF-8 byte).  NOMAD_HOST_IP_,
NOMAD_HOST_ADDR_ and NOMAD_ALLOC_* keep the label as written: a port "my-api"
gives NOMAD_PORT_my_api but NOMAD_HOST_IP_my-api, exactly like Nomad.

One deliberate difference: Nomad writes the raw `to` into NOMAD_ALLOC_ADDR_
(giving "ip:0" for a static port without `to`); we write the port the
allocation really gets (`PortMapping.alloc_port`).
"""

from __future__ import annotations

from netsetup.spec import AllocNetwork

IP_PREFIX = "NOMAD_IP_"
HOST_IP_PREFIX = "NOMAD_HOST_IP_"
ADDR_PREFIX = "NOMAD_ADDR_"
HOST_ADDR_PREFIX = "NOMAD_HOST_ADDR_"
PORT_PREFIX = "NOMAD_PORT_"
HOST_PORT_PREFIX = "NOMAD_HOST_PORT_"
ALLOC_PORT_PREFIX = "NOMAD_ALLOC_PORT_"
ALLOC_IP_PREFIX = "NOMAD_ALLOC_IP_"
ALLOC_ADDR_PREFIX = "NOMAD_ALLOC_ADDR_"
ALLOC_INTERFACE_PREFIX = "NOMAD_ALLOC_INTERFACE_"
# The prefixes whose keys Nomad cleans (env.go, "Clean keys (see #2405)"; we
# have no NOMAD_META_ keys here).
CLEANED_PREFIXES = (ADDR_PREFIX, IP_PREFIX, PORT_PREFIX, HOST_PORT_PREFIX)


def clean_env_var(name: str, replacement: str = "_") -> str:
    """Nomad's helper.CleanEnvVar: keep `_`, `.`, ASCII letters, non-leading digits."""
    out = []
    for i, byte in enumerate(name.encode("utf-8")):
        char = chr(byte)
        keep = (
            char in "_."
            or "a" <= char <= "z"
            or "A" <= char <= "Z"
            or (i > 0 and "0" <= char <= "9")
        )
        out.append(char if keep else replacement)
    return "".join(out)


def join_host_port(host: str, port: int) -> str:
    """Go's net.JoinHostPort: IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_env(network: AllocNetwork) -> dict[str, str]:
    """The NOMAD_* port variables of `network`, keys cleaned as Nomad does."""
    env: dict[str, str] = {}
    alloc_ip = network.alloc_ip or network.alloc_ip6
    for port in network.ports:
        label, host = port.label, str(port.host_port)
        inside = str(port.alloc_port)
        env[ADDR_PREFIX + label] = join_host_port(port.host_ip, port.host_port)
        env[HOST_ADDR_PREFIX + label] = join_host_port(port.host_ip, port.host_port)
        env[IP_PREFIX + label] = port.host_ip
        env[HOST_IP_PREFIX + label] = port.host_ip
        env[PORT_PREFIX + label] = inside
        env[ALLOC_PORT_PREFIX + label] = inside
        env[HOST_PORT_PREFIX + label] = host
        if network.mode == "bridge" and alloc_ip:
            env[ALLOC_INTERFACE_PREFIX + label] = network.interface
            env[ALLOC_IP_PREFIX + label] = alloc_ip
            env[ALLOC_ADDR_PREFIX + label] = join_host_port(alloc_ip, port.alloc_port)
    return {_clean_key(key): value for key, value in env.items()}


def _clean_key(key: str) -> str:
    if key.startswith(CLEANED_PREFIXES):
        return clean_env_var(key)
    return key
