"""The exceptions netsetup raises.  Pure: no I/O.

    NetsetupError                 base of everything below
    ├── SpecError                 a bad spec or config value; names the field
    ├── PortError                 a port cannot be reserved (static conflict, in use)
    │   └── PortsExhausted        "dynamic port selection failed": the range is full
    ├── SubnetExhausted           no free address left in the bridge subnet
    ├── NotRoot                   the operation needs root (CAP_NET_ADMIN)
    ├── ToolMissing               an external binary (nft) is not installed
    ├── InvalidName               an allocation id / interface / namespace name is unusable
    ├── KernelError               netlink, nft or /proc/sys refused a change
    ├── StateError                <data_dir>/netsetup.db cannot be opened or is corrupt
    ├── AllocExists               the allocation already holds a reservation
    └── TeardownError             teardown finished but some objects could not be removed

Errors are translated once, at the adapter that meets them (netlink, nft,
SQLite), and carry what is needed to act on them: the operation, the object,
the errno and the tool's stderr.  Every message reads on its own in a log line.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence


class NetsetupError(Exception):
    """Base class of all netsetup errors."""


class SpecError(NetsetupError):
    """A spec or config value was rejected; `field` names it (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PortError(NetsetupError):
    """A port could not be reserved for an allocation; nothing was reserved."""

    def __init__(self, message: str, *, host_ip: str = "", port: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.host_ip = host_ip
        self.port = port


class PortsExhausted(PortError):
    """No free port left in the dynamic range (Nomad's wording, kept for grep-ability)."""

    def __init__(self, host_ip: str, low: int, high: int) -> None:
        super().__init__(
            f"dynamic port selection failed: no free port left in {low}-{high} on {host_ip}",
            host_ip=host_ip,
        )
        self.low = low
        self.high = high


class SubnetExhausted(NetsetupError):
    """Every usable address of the bridge subnet is leased."""

    def __init__(self, subnet: str) -> None:
        super().__init__(f"bridge subnet {subnet} exhausted: no free address to lease")
        self.subnet = subnet


class NotRoot(NetsetupError):
    """The operation needs root (CAP_NET_ADMIN / CAP_SYS_ADMIN)."""

    def __init__(self, operation: str) -> None:
        super().__init__(f"{operation} needs root (CAP_NET_ADMIN); running as uid {os.getuid()}")
        self.operation = operation


class ToolMissing(NetsetupError):
    """An external binary netsetup drives is not installed."""

    def __init__(self, tool: str, hint: str = "") -> None:
        extra = f" ({hint})" if hint else ""
        super().__init__(f"{tool} not found in PATH{extra}")
        self.tool = tool
        self.hint = hint


class InvalidName(NetsetupError):
    """A name (allocation id, interface, namespace) cannot be used."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"invalid {kind} name {name!r}: {reason}")
        self.kind = kind
        self.name = name
        self.reason = reason


class KernelError(NetsetupError):
    """The kernel (netlink, /proc/sys) or a tool (nft) refused a change."""

    def __init__(self, op: str, obj: str, errno: int | None = None, stderr: str = "") -> None:
        parts = [f"{op} {obj} failed"]
        if errno is not None:
            parts.append(f"{_errno.errorcode.get(errno, str(errno))} ({os.strerror(errno)})")
        if stderr:
            parts.append(stderr.strip())
        super().__init__(": ".join(parts))
        self.op = op
        self.obj = obj
        self.errno = errno
        self.stderr = stderr


class StateError(NetsetupError):
    """The state database cannot be used; `path` names it.  It is never replaced."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class AllocExists(NetsetupError):
    """The allocation already holds ports / addresses: set up once, release first."""

    def __init__(self, alloc_id: str) -> None:
        super().__init__(f"allocation {alloc_id} already holds a reservation")
        self.alloc_id = alloc_id


class TeardownError(NetsetupError):
    """Teardown ran every step; these ones failed (objects possibly left behind)."""

    def __init__(self, alloc_id: str, errors: Sequence[NetsetupError]) -> None:
        listed = "; ".join(str(e) for e in errors)
        super().__init__(f"teardown of {alloc_id}: {len(errors)} step(s) failed: {listed}")
        self.alloc_id = alloc_id
        self.errors = tuple(errors)
