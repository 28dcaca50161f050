"""Kernel objects of allocation networking: bridge, veth pairs, namespaces, addresses, routes.

Adapter: the only netsetup module that imports pyroute2 (0.9, `AsyncIPRoute` in our
loop).  It also owns the host namespace's sysctls and the namespace bind mounts under
/var/run/netns.  Every change has `ensure` semantics where that is safe (EEXIST on add,
ENODEV/ENOENT on delete mean "already so"); creating a per-allocation object whose name
is taken is an error instead, because the name may belong to somebody else.

Namespaces are created without forking: a fresh thread unshares its own network
namespace (namespaces are per thread), bind-mounts /proc/thread-self/ns/net at
/var/run/netns/<name> and dies.  Netlink sockets inside an allocation's namespace are
opened the same way (a thread that setns()s, opens the socket, and exits), so a socket
keeps pointing at that namespace while the rest of the process stays where it is.

The kernel does a netlink request's work inside the sender's sendmsg(), so every
request through `AsyncIPRoute` holds the event loop for as long as the kernel works.
That is fine for the milliseconds of an add; deleting a device waits for RCU grace
periods (10-30 ms on a busy host), so link deletions send their RTM_DELLINK from a
small pool of threads of their own, on sockets `start_links` opens next to the loop's
one (so in the same namespace).

Names come from NetConfig: namespaces at <netns_dir>/<alloc-id> (/var/run/netns),
`alloc_interface` (eth0) inside, host-side veths `veth_prefix` + hex of the alloc id's
hash (15 chars).  Ownership (what reconcile and the leak checks may remove): veths named
that way, and the namespaces of allocations the caller knows.

Error handling: netlink and OS errors are translated once, here, into `KernelError`
(operation, object, errno); a name that cannot be a namespace is `InvalidName`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import itertools
import os
import queue
import re
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netsetup.errors import InvalidName, KernelError, NotRoot
from netsetup.spec import NetConfig

IFNAMSIZ = 15  # usable characters of an interface name (16 with the NUL)
MAX_NAMESPACE_NAME = 64  # Nomad alloc ids are 36; leaves room, stays far below NAME_MAX

_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_CLONE_NEWNET = 0x40000000
_MS_REC = 16384
_MS_BIND = 4096
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_IFF_UP = 1
_IFA_F_NODAD = 0x02
_RT_SCOPE_UNIVERSE = 0
_RT_TABLE_MAIN = 254
_BRIDGE_MODE_HAIRPIN = 1
_RTM_DELLINK = 17
_NLMSG_ERROR = 2
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_NLMSG_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_IFINFOMSG = struct.Struct("=BxHiII")  # struct ifinfomsg
DELETERS = 4  # threads that send link deletions (the kernel's RCU waits overlap)
_IN6_ADDR_GEN_MODE_NONE = 1
_NO_IPV6_ADDRESSES = {
    "attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", _IN6_ADDR_GEN_MODE_NONE]]}]]
}

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


# --- names -------------------------------------------------------------------------------


def check_namespace_name(name: str) -> str:
    """`name` if it can be a file under /var/run/netns; `InvalidName` otherwise."""
    if not name or len(name) > MAX_NAMESPACE_NAME:
        raise InvalidName("namespace", name, f"must be 1 to {MAX_NAMESPACE_NAME} characters")
    if not _NAMESPACE_NAME.fullmatch(name):
        raise InvalidName(
            "namespace", name, "only letters, digits, '_', '.', '-' (not first) are allowed"
        )
    return name


def veth_name(prefix: str, alloc_id: str) -> str:
    """The host-side veth of an allocation: `prefix` + hex of its SHA-256, 15 chars in all."""
    digest = hashlib.sha256(alloc_id.encode()).hexdigest()
    return prefix + digest[: IFNAMSIZ - len(prefix)]


def is_owned_link_name(prefix: str, name: str) -> bool:
    """True for the names `veth_name` produces (the links waypost owns on the host)."""
    rest = name[len(prefix) :]
    return (
        name.startswith(prefix)
        and len(name) == IFNAMSIZ
        and all(c in "0123456789abcdef" for c in rest)
    )


def bridge_mac(bridge: str) -> str:
    """A fixed locally administered MAC for the bridge.

    A bridge without an explicitly set address takes the lowest MAC of its ports, so
    the gateway's MAC would change whenever an allocation comes or goes and every
    allocation's ARP cache would point at a dead address until it expires.
    """
    raw = bytearray(hashlib.sha256(b"waypost-bridge:" + bridge.encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in raw)


# --- what inspection returns ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One link of the host namespace, as far as ownership and health checks need it."""

    index: int
    name: str
    kind: str
    master: int
    up: bool
    peer_index: int  # IFLA_LINK: for a veth, the peer's index in the peer's namespace
    hairpin: bool = False  # a bridge port in hairpin mode (IFLA_BRPORT_MODE)


@dataclass(frozen=True, slots=True)
class InsideState:
    """What an allocation namespace holds (`inspect_inside`)."""

    lo_up: bool
    eth0_up: bool
    eth0_peer_index: int  # 0 when eth0 is missing
    addresses: frozenset[str]  # "ip/prefix" on eth0
    gateways: frozenset[str]  # gateways of default routes (v4 and v6)


@dataclass(frozen=True, slots=True)
class HostAddress:
    """A global address of the host namespace (hostaddr's input)."""

    index: int
    ifname: str
    address: IPv4Interface | IPv6Interface


# --- error translation ----------------------------------------------------------------------


def _kernel_error(op: str, obj: str, exc: BaseException) -> KernelError | NotRoot:
    """The error to raise for `exc`: NotRoot on EPERM, KernelError otherwise."""
    code = _errno_of(exc)
    if code == errno.EPERM:
        return NotRoot(f"{op} {obj}")
    return KernelError(op, obj, code, str(exc))


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        code = exc.code
        return code if isinstance(code, int) else None
    if isinstance(exc, OSError):
        return exc.errno
    return None


@asynccontextmanager
async def _translated(op: str, obj: str, *, ok: Iterable[int] = ()) -> AsyncIterator[None]:
    """Turn netlink/OS errors into KernelError; errnos in `ok` mean "already so"."""
    allowed = set(ok)
    try:
        yield
    except (NetlinkError, OSError) as exc:
        if _errno_of(exc) in allowed:
            return
        raise _kernel_error(op, obj, exc) from exc


# --- namespaces: syscalls run in a thread of their own ---------------------------------------


def _check(rc: int, what: str, obj: str) -> None:
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", obj)


def _in_own_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run `fn` in a new thread (never a pooled one: it may switch its own namespace)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.cancelled():
            if ok and isinstance(value, socket.socket):
                value.close()
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=run, name="netsetup-netns", daemon=True).start()
    return future


def _ensure_shared_netns_dir(directory: Path) -> None:
    """iproute2's netns_add prologue: the namespace directory is a shared mount point.

    Shared propagation makes bind mounts made here visible to `ip netns exec` children
    (which run in their own mount namespace) and vice versa.
    """
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    target = str(directory).encode()
    if _libc.mount(b"none", target, b"none", _MS_SHARED | _MS_REC, None) == 0:
        return
    _check(_libc.mount(target, target, b"none", _MS_BIND | _MS_REC, None), "bind", target.decode())
    _check(_libc.mount(b"none", target, b"none", _MS_SHARED | _MS_REC, None), "share", "netns dir")


def _create_namespace_here(path: Path) -> None:
    """Unshare this thread's netns, bind it at `path`, return to the original one."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _check(_libc.unshare(_CLONE_NEWNET), "unshare", str(path))
            try:
                source = b"/proc/thread-self/ns/net"
                _check(
                    _libc.mount(source, str(path).encode(), b"none", _MS_BIND, None),
                    "bind",
                    str(path),
                )
            finally:
                _check(_libc.setns(original, _CLONE_NEWNET), "setns back", str(path))
        finally:
            os.close(original)
    except BaseException:
        _remove_namespace_here(path)
        raise


def _remove_namespace_here(path: Path) -> bool:
    """Unmount and unlink a namespace file; False when it was not there."""
    _libc.umount2(str(path).encode(), _MNT_DETACH)  # EINVAL (not mounted) is fine
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _socket_in_namespace(path: Path) -> socket.socket:
    """A NETLINK_ROUTE socket living in the namespace at `path` (call in its own thread)."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _check(_libc.setns(target, _CLONE_NEWNET), "setns", str(path))
        finally:
            os.close(target)
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
        finally:
            _check(_libc.setns(original, _CLONE_NEWNET), "setns back", str(path))
    finally:
        os.close(original)


def _delete_link_blocking(sock: socket.socket, index: int, sequence: int) -> None:
    """RTM_DELLINK of `index` on `sock` (NETLINK_ROUTE), waiting for the kernel's answer.

    Blocks for as long as the kernel works (its RCU waits): call it in a worker thread.
    Answers to other sequence numbers (of an earlier, interrupted call) are skipped.
    """
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    sock.send(
        _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(body), _RTM_DELLINK, _NLM_F_REQUEST_ACK, sequence, 0
        )
        + body
    )
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + _NLMSG_HEADER.size <= len(data):
            length, kind, _, seq, _ = _NLMSG_HEADER.unpack_from(data, offset)
            if kind == _NLMSG_ERROR and seq == sequence:
                (code,) = struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)
                if code:
                    raise OSError(-code, os.strerror(-code), f"link index {index}")
                return
            offset += max((length + 3) & ~3, _NLMSG_HEADER.size)


# --- sysctls of the namespace the process runs in ------------------------------------------


def ensure_sysctl(key: tuple[str, ...], value: str) -> bool:
    """Set /proc/sys/<key...> to `value` unless it already is; True when it was changed.

    The key is a tuple, not a dotted string: interface names may contain dots.
    """
    path = Path("/proc/sys", *key)
    name = ".".join(key)
    try:
        if path.read_text().strip() == value:
            return False
        path.write_text(value + "\n")
    except FileNotFoundError as exc:
        hint = "br_netfilter is not loaded" if key[:2] == ("net", "bridge") else "no such key"
        raise KernelError("set sysctl", f"{name}={value}", errno.ENOENT, hint) from exc
    except OSError as exc:
        raise _kernel_error("set sysctl", f"{name}={value}", exc) from exc
    return True


def _disable_ipv6(ifname: str) -> None:
    """IPv6 off on `ifname` of this namespace, before it goes up (nothing without IPv6).

    For the host side of a veth: a bridge port needs no address, and each one with IPv6
    puts three routes in the host's IPv6 table, which the kernel walks whole whenever
    a device goes down (a teardown's cost grew with the number of allocations).
    """
    path = Path("/proc/sys/net/ipv6/conf", ifname, "disable_ipv6")
    try:
        path.write_text("1\n")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _kernel_error("disable IPv6", ifname, exc) from exc


def host_sysctls(bridge: str, *, ipv6: bool, bridge_nf: bool) -> list[tuple[tuple[str, ...], str]]:
    """The host namespace's sysctls bridge mode needs (pure).

    - ip_forward: allocations reach the outside and forwarded ports reach allocations;
    - route_localnet on the bridge: a DNAT of 127.0.0.1:port to an allocation leaves
      through the bridge with source 127.0.0.1, which the kernel drops as martian
      otherwise (the firewall masquerades it on the way out);
    - IPv6 forwarding when the bridge has an IPv6 subnet;
    - bridge-nf-call-iptables/ip6tables when asked (br_netfilter must be loaded).
    """
    wanted: list[tuple[tuple[str, ...], str]] = [
        (("net", "ipv4", "ip_forward"), "1"),
        (("net", "ipv4", "conf", bridge, "route_localnet"), "1"),
    ]
    if ipv6:
        wanted.append((("net", "ipv6", "conf", "all", "forwarding"), "1"))
    if bridge_nf:
        wanted.append((("net", "bridge", "bridge-nf-call-iptables"), "1"))
        if ipv6:
            wanted.append((("net", "bridge", "bridge-nf-call-ip6tables"), "1"))
    return wanted


# --- the host namespace's netlink socket ------------------------------------------------------


def _link_info(msg: Any) -> LinkInfo:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    port = info.get_attr("IFLA_INFO_SLAVE_DATA") if info is not None else None
    mode = port.get_attr("IFLA_BRPORT_MODE") if port is not None else None
    return LinkInfo(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME")),
        kind=str(kind or ""),
        master=int(msg.get_attr("IFLA_MASTER") or 0),
        up=bool(msg["flags"] & _IFF_UP),
        peer_index=int(msg.get_attr("IFLA_LINK") or 0),
        hairpin=mode == _BRIDGE_MODE_HAIRPIN,
    )


async def _collect(request: Any) -> list[Any]:
    """The messages of a pyroute2 request: dumps answer async iterators, gets lists."""
    answer = await request
    if hasattr(answer, "__aiter__"):
        return [msg async for msg in answer]
    return list(answer)


async def start_links(config: NetConfig) -> Links:
    """A `Links` on new netlink sockets in the current namespace; close() it."""
    ipr = AsyncIPRoute(groups=0)  # no multicast groups: no unread events pile up
    deleters: list[socket.socket] = []
    try:
        await ipr.setup_endpoint()
        for _ in range(DELETERS):  # here, next to `ipr`: the same namespace
            deleters.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
    except OSError as exc:
        for sock in deleters:
            sock.close()
        ipr.close()
        raise _kernel_error("open", "netlink socket", exc) from exc
    return Links(ipr, config, delete_sockets=deleters)


class Links:
    """Changes and reads through one netlink socket in the host namespace.

    Not locked: the caller (NetworkManager) serializes changes.  Allocation namespaces
    are reached through short-lived sockets opened inside them (`_inside`).  Link
    deletions use `delete_sockets` (NETLINK_ROUTE sockets of the namespace `ipr` is
    in), one thread each; without them they go through `ipr` and hold the loop.
    """

    def __init__(
        self, ipr: Any, config: NetConfig, *, delete_sockets: Sequence[socket.socket] = ()
    ) -> None:
        self._ipr = ipr
        self.netns_dir = Path(config.netns_dir)
        self.inside_ifname = config.alloc_interface
        self.veth_prefix = config.veth_prefix
        self._netns_dir_ready = False
        self._delete_sockets = list(delete_sockets)
        self._idle_sockets: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        for sock in self._delete_sockets:
            self._idle_sockets.put(sock)
        self._sequence = itertools.count(1)
        self._deleters = (
            ThreadPoolExecutor(len(self._delete_sockets), thread_name_prefix="netsetup-dellink")
            if self._delete_sockets
            else None
        )

    def close(self) -> None:
        if self._deleters is not None:
            self._deleters.shutdown(wait=False)
        for sock in self._delete_sockets:
            sock.close()
        self._ipr.close()

    def veth_name(self, alloc_id: str) -> str:
        return veth_name(self.veth_prefix, alloc_id)

    def owns_link(self, link: LinkInfo) -> bool:
        """A veth named like `veth_name` output: one of ours (reconcile may remove it)."""
        return link.kind == "veth" and is_owned_link_name(self.veth_prefix, link.name)

    # namespaces

    def namespace_path(self, name: str) -> Path:
        return self.netns_dir / check_namespace_name(name)

    def namespaces(self) -> set[str]:
        """Names in the namespace directory (every owner's, not only ours)."""
        try:
            return {p.name for p in self.netns_dir.iterdir()}
        except FileNotFoundError:
            return set()

    def namespace_alive(self, name: str) -> bool:
        """True when the namespace file exists and a namespace is mounted on it."""
        try:
            return self.namespace_path(name).stat().st_dev != self.netns_dir.stat().st_dev
        except FileNotFoundError:
            return False

    # links of the host namespace

    async def links(self) -> list[LinkInfo]:
        async with _translated("list", "links"):
            return [_link_info(m) for m in await _collect(self._ipr.link("dump"))]

    async def link(self, name: str) -> LinkInfo | None:
        try:
            found = await _collect(self._ipr.link("get", ifname=name))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise _kernel_error("get link", name, exc) from exc
        return _link_info(found[0]) if found else None

    async def delete_link(self, name: str) -> bool:
        """Remove link `name` (its veth peer goes with it); False when it was not there."""
        found = await self.link(name)
        if found is None:
            return False
        await self.delete_link_index(found.index, name)
        return True

    async def delete_link_index(self, index: int, name: str) -> None:
        """Remove the link with `index` (gone already is fine).

        Slow: the kernel waits for RCU grace periods when it unregisters a device (tens
        of ms on a busy host), which is why NetworkManager detaches first and deletes
        later, and why the request is sent from a thread (the event loop goes on).
        """
        async with _translated("delete link", name, ok=(errno.ENODEV,)):
            if self._deleters is None:
                await self._ipr.link("del", index=index)
                return
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._deleters, self._delete_in_thread, index)

    def _delete_in_thread(self, index: int) -> None:
        sock = self._idle_sockets.get()  # as many sockets as threads: never waits
        try:
            _delete_link_blocking(sock, index, next(self._sequence))
        finally:
            self._idle_sockets.put(sock)

    async def detach_link(self, name: str) -> int | None:
        """Take link `name` down (fast); its index, None when absent.

        A bridge port whose device is down is disabled: nothing is forwarded to or from
        it.  Leaving the bridge happens with the deletion (it costs another RCU sync).
        """
        found = await self.link(name)
        if found is None:
            return None
        async with _translated("detach link", name, ok=(errno.ENODEV,)):
            await self._ipr.link("set", index=found.index, state="down")
        return found.index

    async def ensure_bridge(
        self, name: str, gateway: IPv4Interface, gateway6: IPv6Interface | None
    ) -> int:
        """The bridge `name`, up, with the gateway address(es); its index."""
        found = await self.link(name)
        if found is None:
            async with _translated("create bridge", name, ok=(errno.EEXIST,)):
                await self._ipr.link("add", ifname=name, kind="bridge", address=bridge_mac(name))
            found = await self.link(name)
            if found is None:
                raise KernelError("create bridge", name, errno.ENODEV, "vanished after creation")
        if found.kind != "bridge":
            raise InvalidName("bridge", name, f"a {found.kind or 'non-bridge'} link has that name")
        await self._ensure_address(found.index, name, gateway)
        if gateway6 is not None:
            await self._ensure_address(found.index, name, gateway6)
        if not found.up:
            async with _translated("set up", name):
                await self._ipr.link("set", index=found.index, state="up")
        return found.index

    async def _ensure_address(
        self, index: int, name: str, address: IPv4Interface | IPv6Interface
    ) -> None:
        extra = {"flags": _IFA_F_NODAD} if address.version == 6 else {}
        async with _translated("add address", f"{address} on {name}", ok=(errno.EEXIST,)):
            await self._ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                **extra,
            )

    async def create_veth(self, name: str, namespace: str, bridge: int, *, hairpin: bool) -> int:
        """A veth `name` on the bridge, up, whose peer is `eth0` inside `namespace`.

        The host side gets no IPv6 (a bridge port needs none; see `_disable_ipv6`).  A
        taken name is an error (KernelError EEXIST): the link may be somebody else's.
        """
        inside = self.inside_ifname
        try:
            fd = os.open(self.namespace_path(namespace), os.O_RDONLY)
        except OSError as exc:
            raise _kernel_error("open namespace", namespace, exc) from exc
        try:
            async with _translated("create veth", f"{name} (peer {namespace}/{inside})"):
                await self._ipr.link(
                    "add",
                    ifname=name,
                    kind="veth",
                    master=bridge,
                    peer={"ifname": inside, "net_ns_fd": fd},
                )
        finally:
            os.close(fd)
        try:  # the veth is ours from here: a failure removes it before raising
            found = await self.link(name)
            if found is None:
                raise KernelError("create veth", name, errno.ENODEV, "vanished after creation")
            _disable_ipv6(name)
            async with _translated("set up", name):
                await self._ipr.link("set", index=found.index, state="up")
            if hairpin:
                await self.set_hairpin(found.index, name, on=True)
        except BaseException:
            with contextlib.suppress(KernelError, NotRoot):
                await self.delete_link(name)
            raise
        return found.index

    async def set_hairpin(self, index: int, name: str, *, on: bool) -> None:
        # IFLA_BRPORT_MODE; the `hairpin_mode` keyword of pyroute2 is silently ignored
        async with _translated("set hairpin", name):
            await self._ipr.brport("set", index=index, mode=_BRIDGE_MODE_HAIRPIN if on else 0)

    async def create_namespace(self, name: str) -> None:
        """A new namespace at <netns_dir>/<name>; a taken name is KernelError EEXIST."""
        path = self.namespace_path(name)
        if not self._netns_dir_ready:
            async with _translated("prepare", str(self.netns_dir)):
                await asyncio.to_thread(_ensure_shared_netns_dir, self.netns_dir)
            self._netns_dir_ready = True
        async with _translated("create namespace", str(path)):
            await _in_own_thread(lambda: _create_namespace_here(path))

    async def delete_namespace(self, name: str) -> bool:
        """Unmount and remove the namespace file; False when it was not there."""
        path = self.namespace_path(name)
        async with _translated("delete namespace", str(path)):
            return await asyncio.to_thread(_remove_namespace_here, path)

    @asynccontextmanager
    async def _inside(self, namespace: str) -> AsyncIterator[Any]:
        path = self.namespace_path(namespace)
        async with _translated("enter namespace", str(path)):
            sock = await _in_own_thread(lambda: _socket_in_namespace(path))
        inner = AsyncIPRoute(use_socket=sock, groups=0)
        try:
            yield inner
        finally:
            inner.close()
            sock.close()

    async def configure_inside(
        self,
        namespace: str,
        address: IPv4Interface,
        gateway: IPv4Address,
        address6: IPv6Interface | None = None,
        gateway6: IPv6Address | None = None,
    ) -> None:
        """lo up, eth0 up with its address(es), default route(s) via the gateway(s).

        Without `address6`, eth0 gets no IPv6 address at all (IN6_ADDR_GEN_MODE_NONE):
        a link-local one would send DAD, MLD and router solicitations, which the bridge
        floods to every other allocation (the cost of a setup grew with their number).
        Set by netlink, not /proc/sys: a /proc/sys/net lookup walks one dentry per
        namespace that was ever looked up there.
        """
        where = f"{namespace}/{self.inside_ifname}"
        async with self._inside(namespace) as ipr:
            lo, eth0 = await _indexes(ipr, namespace, "lo", self.inside_ifname)
            async with _translated("set up", f"{namespace}/lo"):
                await ipr.link("set", index=lo, state="up")
            wanted: list[tuple[IPv4Interface | IPv6Interface, IPv4Address | IPv6Address]] = [
                (address, gateway)
            ]
            if address6 is not None and gateway6 is not None:
                wanted.append((address6, gateway6))
            for addr, _ in wanted:
                extra = {"flags": _IFA_F_NODAD} if addr.version == 6 else {}
                async with _translated("add address", f"{addr} on {where}", ok=(errno.EEXIST,)):
                    await ipr.addr(
                        "add",
                        index=eth0,
                        address=str(addr.ip),
                        prefixlen=addr.network.prefixlen,
                        **extra,
                    )
            if address6 is None:  # no link-local address either: IPv6 stays quiet
                async with _translated("set addrgenmode none", where):
                    await ipr.link("set", index=eth0, IFLA_AF_SPEC=_NO_IPV6_ADDRESSES)
            async with _translated("set up", where):
                await ipr.link("set", index=eth0, state="up")
            for addr, via in wanted:
                default = "0.0.0.0/0" if addr.version == 4 else "::/0"
                async with _translated("add default route", f"via {via} in {namespace}"):
                    await ipr.route("replace", dst=default, gateway=str(via), oif=eth0)

    async def inspect_inside(self, namespace: str) -> InsideState | None:
        """What the namespace holds; None when it is not there (or not a namespace)."""
        if not self.namespace_alive(namespace):
            return None
        async with self._inside(namespace) as ipr, _translated("inspect", namespace):
            links = {i.name: i for i in map(_link_info, await _collect(ipr.link("dump")))}
            eth0 = links.get(self.inside_ifname)
            addrs = await _collect(ipr.addr("dump", index=eth0.index)) if eth0 else []
            routes = await _collect(ipr.route("dump", table=_RT_TABLE_MAIN))
        lo = links.get("lo")
        return InsideState(
            lo_up=lo is not None and lo.up,
            eth0_up=eth0 is not None and eth0.up,
            eth0_peer_index=eth0.peer_index if eth0 else 0,
            addresses=frozenset(
                str(ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
                for a in addrs
                if a["scope"] == _RT_SCOPE_UNIVERSE
            ),
            gateways=frozenset(
                str(ipaddress.ip_address(r.get_attr("RTA_GATEWAY")))
                for r in routes
                if r["dst_len"] == 0 and r.get_attr("RTA_GATEWAY")
            ),
        )

    # what hostaddr needs

    async def default_route_interfaces(self) -> list[int]:
        """Output interfaces of the IPv4 default routes of the main table, best metric first."""
        async with _translated("list", "routes"):
            routes = await _collect(self._ipr.route("dump", family=socket.AF_INET))
        defaults = [
            (int(r.get_attr("RTA_PRIORITY") or 0), int(r.get_attr("RTA_OIF") or 0))
            for r in routes
            if r["dst_len"] == 0 and r.get_attr("RTA_TABLE") == _RT_TABLE_MAIN
        ]
        return [oif for _, oif in sorted(defaults) if oif]

    async def global_addresses(self) -> list[HostAddress]:
        """Every address of global scope, in the kernel's order."""
        async with _translated("list", "addresses"):
            names = {i.index: i.name for i in await self.links()}
            found = await _collect(self._ipr.addr("dump"))
        result: list[HostAddress] = []
        for msg in found:
            if msg["scope"] != _RT_SCOPE_UNIVERSE:
                continue
            ip = ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            result.append(HostAddress(int(msg["index"]), names.get(msg["index"], ""), ip))
        return result


async def _indexes(ipr: Any, namespace: str, *names: str) -> list[int]:
    indexes: list[int] = []
    for name in names:
        async with _translated("find link", f"{namespace}/{name}"):
            found = await ipr.link_lookup(ifname=name)
        if not found:
            raise KernelError("find link", f"{namespace}/{name}", errno.ENODEV)
        indexes.append(int(found[0]))
    return indexes
