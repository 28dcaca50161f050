"""nftables for allocation networking: port forwards, masquerade, forward accept.

Adapter: runs nftables scripts, one script per change, so every change is one
atomic transaction, and reads with `list ...` as JSON.  The pure half (`plan_*`,
`render_*`, `parse_*`) builds the scripts and reads the JSON; the :class:`Firewall`
runs them under one lock per event loop (Nomad holds one global lock around its
iptables changes; nft transactions are atomic, but read-then-write sequences are
not).  Two ways to run a script, the same text either way:

- in process, through libnftables (Debian libnftables1, what the `nft` binary is
  built on) over ctypes: one `nft_ctx` per Firewall, kept open, driven by one thread
  of its own.  An element change costs ~0.1 ms instead of the 2-16 ms of an `nft`
  process: its start, and, after a transaction that deleted something, the close of
  its netlink socket, which waits for the kernel's deferred destruction of what was
  deleted (~10 ms; a socket kept open never waits).  The default.
- the `nft` binary (`nft -f -`, `nft -j list ...`), one process per change: when
  libnftables cannot be loaded, and when `nft_command` is given (tests drive a
  throwaway namespace with `ip netns exec NS nft`).

Namespaces: the `nft` binary acts where it runs; the in-process context acts in the
network namespace of the thread that constructs the Firewall (its netlink socket and
its thread are made there; a test may construct one in a thread that entered a
throwaway namespace).

What waypost owns: the table `inet <config.nft_table>` (default `inet waypost`) and,
only when another tool filters forwarding with iptables-nft, two rules in that tool's
`FORWARD` chain whose comment starts with "<table>:".  Nothing else is touched.

    table inet waypost
      map ports   (host ip . l4proto . host port) -> (alloc ip . alloc port)   IPv4
      map ports6  the same for IPv6, when the bridge has a v6 subnet
      chain prerouting  nat    dnat through the maps: from outside, from allocations
      chain output      nat    dnat through the maps: from the host itself, 127.0.0.1 too
      chain postrouting nat    masquerade: 127.0.0.0/8 -> bridge (needs route_localnet),
                               subnet -> bridge after dnat (hairpin, alloc -> alloc via
                               the host port: replies come back through the host),
                               subnet -> elsewhere (egress)
      chain forward     filter accept from the bridge; to the bridge only replies and
                               forwarded ports; drop the rest to the bridge (a service on
                               0.0.0.0 without a forwarded port is reachable from the host
                               only: Nomad's scope, enforced even when a route exists)

Per allocation, each port mapping becomes map ELEMENTS, never rules: TCP and UDP on
`host_ip:host_port`, and on 127.0.0.1 when `host_ip` is the allocation's host address
(the port ledger keeps those unique; a port on another host network is not also mapped
on 127.0.0.1, where two host networks could hold the same port number).  Each element
carries the allocation id as its comment: `owned_elements` reads them back.  Adding
or removing an allocation is one `nft` run whose cost does not grow with the number of
allocations.

FORWARD policy DROP (Docker, ufw): nftables runs every base chain of a hook and a drop
anywhere wins, so an accept in our table cannot undo another table's drop.  Like the
CNI firewall plugin and Docker's DOCKER-USER advice, `ensure_base` therefore inserts
`iifname <bridge> accept` and `oifname <bridge> accept` at the top of the iptables-nft
`FORWARD` chains (`ip filter`, and `ip6 filter` with a v6 subnet) when those chains
exist; our own forward chain still applies the host-only drop.  iptables-legacy rules
are invisible to nft: a legacy FORWARD DROP must be opened by the operator.

Error handling: a failed script raises `KernelError(op, object, errno, stderr)` (the
error text nft prints, from either runner); EPERM raises `NotRoot`; no binary raises
`ToolMissing("nft")`; an allocation id that cannot be a comment raises `InvalidName`,
a mapping of a family the allocation has no address of `SpecError`.  Removing what
is not there is not an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno as errno_
import functools
import ipaddress
import json
import os
import re
import shutil
import socket
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from netsetup.errors import InvalidName, KernelError, NotRoot, SpecError, ToolMissing
from netsetup.spec import AllocNetwork, NetConfig

Family = Literal["ip", "ip6"]
PROTOCOLS = ("tcp", "udp")  # a port mapping forwards both, as Nomad's does
LOOPBACK4 = "127.0.0.1"
NFT_TIMEOUT = 30.0  # seconds; nft answers in milliseconds, a hang means a wedged kernel
# nft's limit on comments (NFT_USERDATA_MAXLEN is larger; the parser stops at 128).
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# The texts nft prints for kernel errnos, to give KernelError its errno back.
_ERRNOS = {
    os.strerror(e): e
    for e in (errno_.EEXIST, errno_.ENOENT, errno_.EPERM, errno_.EBUSY, errno_.EINVAL)
}
# The iptables-nft chains a foreign FORWARD policy lives in.
_FOREIGN_FORWARD = {"ip": ("filter", "FORWARD"), "ip6": ("filter", "FORWARD")}
LIBNFTABLES = "libnftables.so.1"
_NETLINK_NETFILTER = 12  # linux/netlink.h
_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4  # enum nft_output_flags


@dataclass(frozen=True, slots=True)
class Element:
    """One element of a ports map: (host_ip, proto, host_port) -> (alloc_ip, alloc_port)."""

    family: Family
    host_ip: str
    proto: str
    host_port: int
    alloc_ip: str
    alloc_port: int
    owner: str  # the allocation id, kept as the element's comment

    @property
    def key(self) -> str:
        return f"{self.host_ip} . {self.proto} . {self.host_port}"

    @property
    def value(self) -> str:
        return f"{self.alloc_ip} . {self.alloc_port}"


# --- pure: plans and scripts ---------------------------------------------------------


def map_name(family: Family) -> str:
    return "ports" if family == "ip" else "ports6"


def check_owner(alloc_id: str) -> str:
    """`alloc_id` if it can be an element comment (it goes into an nft script verbatim)."""
    if not _OWNER.fullmatch(alloc_id):
        raise InvalidName("allocation", alloc_id, "1-128 of [A-Za-z0-9_.:-] for an nft comment")
    return alloc_id


def check_table(name: str) -> str:
    if not _TABLE.fullmatch(name):
        raise InvalidName("nft table", name, "1-32 of [A-Za-z0-9_], not starting with a digit")
    return name


def plan_elements(alloc: AllocNetwork, *, strict: bool = True) -> tuple[Element, ...]:
    """The map elements of `alloc`'s port mappings (none in host mode).

    A mapping of a family the allocation has no address of raises SpecError, or is
    skipped when not `strict` (removal).
    """
    if alloc.mode != "bridge" or not alloc.ports:
        return ()
    owner = check_owner(alloc.alloc_id)
    out: list[Element] = []
    for mapping in alloc.ports:
        host = ipaddress.ip_address(mapping.host_ip)
        family: Family = "ip" if host.version == 4 else "ip6"
        target = alloc.alloc_ip if family == "ip" else alloc.alloc_ip6
        if not target and not strict:
            continue
        if not target:
            raise SpecError(
                f"ports[{mapping.label}].host_ip",
                f"{mapping.host_ip} is IPv{host.version} but allocation {alloc.alloc_id}"
                f" has no IPv{host.version} address to forward to",
            )
        hosts = [str(host)]
        if family == "ip" and mapping.host_ip == alloc.host_ip and str(host) != LOOPBACK4:
            hosts.append(LOOPBACK4)
        for host_ip in hosts:
            for proto in PROTOCOLS:
                out.append(
                    Element(
                        family,
                        host_ip,
                        proto,
                        mapping.host_port,
                        str(ipaddress.ip_address(target)),
                        mapping.alloc_port,
                        owner,
                    )
                )
    return tuple(out)


def render_add(table: str, elements: Iterable[Element]) -> str:
    """`add element` lines: re-adding an identical element is a no-op; a key held by
    another value fails with EEXIST (a port held by someone else)."""
    return "".join(
        f"add element inet {table} {map_name(e.family)} "
        f'{{ {e.key} comment "{e.owner}" : {e.value} }}\n'
        for e in elements
    )


def render_remove(table: str, elements: Iterable[Element]) -> str:
    """Delete `elements` whether or not they exist: add (a no-op when present with the
    same value) then delete, in one transaction.  A key held by another value fails
    with EEXIST and nothing is removed."""
    lines = []
    for e in elements:
        lines.append(render_add(table, [e]))
        lines.append(f"delete element inet {table} {map_name(e.family)} {{ {e.key} }}\n")
    return "".join(lines)


def render_delete(table: str, elements: Iterable[Element]) -> str:
    """Plain `delete element` lines (the elements are known to exist)."""
    return "".join(
        f"delete element inet {table} {map_name(e.family)} {{ {e.key} }}\n" for e in elements
    )


def _chain(table: str, name: str, kind: str, hook: str, priority: str) -> str:
    return (
        f"add chain inet {table} {name} "
        f"{{ type {kind} hook {hook} priority {priority} ; policy accept ; }}\n"
        f"flush chain inet {table} {name}\n"
    )


def render_base(config: NetConfig) -> str:
    """The whole table except the map elements: maps are added (kept with their
    elements when they exist), chains are flushed and refilled in the same transaction,
    so re-running it repairs a tampered table and packets never see a half state."""
    t = check_table(config.nft_table)
    br = config.bridge
    families: list[tuple[Family, str, str, str]] = [("ip", "ipv4_addr", config.subnet, "ip")]
    if config.subnet6:
        families.append(("ip6", "ipv6_addr", config.subnet6, "ip6"))
    out = [f"add table inet {t}\n"]
    for family, addr_type, _, _ in families:
        out.append(
            f"add map inet {t} {map_name(family)} {{ type {addr_type} . inet_proto . "
            f"inet_service : {addr_type} . inet_service ; "
            f'comment "waypost port forwards ({family})" ; }}\n'
        )
    out += [
        _chain(t, "prerouting", "nat", "prerouting", "dstnat"),
        _chain(t, "output", "nat", "output", "-100"),
        _chain(t, "postrouting", "nat", "postrouting", "srcnat"),
        _chain(t, "forward", "filter", "forward", "filter"),
    ]
    rule = f"add rule inet {t}"
    for family, _, _, match in families:
        dnat = (
            f"meta l4proto {{ tcp, udp }} dnat {match} to "
            f"{match} daddr . meta l4proto . th dport map @{map_name(family)}"
        )
        out.append(f"{rule} prerouting {dnat}\n")
        out.append(f"{rule} output {dnat}\n")
    out.append(f'{rule} postrouting oifname "{br}" ip saddr 127.0.0.0/8 masquerade\n')
    for family, _, subnet, match in families:
        multicast = "224.0.0.0/4" if family == "ip" else "ff00::/8"
        out.append(
            f'{rule} postrouting oifname "{br}" {match} saddr {subnet} ct status dnat masquerade\n'
        )
        out.append(
            f'{rule} postrouting oifname != "{br}" {match} saddr {subnet} '
            f"{match} daddr != {multicast} masquerade\n"
        )
    out += [
        f'{rule} forward iifname "{br}" accept\n',
        f'{rule} forward oifname "{br}" ct state established,related accept\n',
        f'{rule} forward oifname "{br}" ct status dnat accept\n',
        f'{rule} forward oifname "{br}" counter drop\n',
    ]
    return "".join(out)


def foreign_rules(config: NetConfig) -> dict[str, str]:
    """comment -> match of the accept rules waypost keeps in a foreign FORWARD chain."""
    t, br = config.nft_table, config.bridge
    return {
        f"{t}: accept forwarding from bridge {br}": f'iifname "{br}"',
        f"{t}: accept forwarding to bridge {br}": f'oifname "{br}"',
    }


def render_foreign(
    family: Family, present: Sequence[tuple[int, str]], wanted: dict[str, str], prefix: str
) -> str:
    """The script that turns our rules in a foreign FORWARD chain into `wanted`
    ("" when they already are); `present` is (handle, comment) of every rule there."""
    table, chain = _FOREIGN_FORWARD[family]
    ours = [(handle, comment) for handle, comment in present if comment.startswith(prefix)]
    if sorted(comment for _, comment in ours) == sorted(wanted):
        return ""
    lines = [f"delete rule {family} {table} {chain} handle {handle}\n" for handle, _ in ours]
    lines += [
        f'insert rule {family} {table} {chain} {match} accept comment "{comment}"\n'
        for comment, match in reversed(wanted.items())  # each insert goes on top
    ]
    return "".join(lines)


def parse_rules(doc: dict[str, Any]) -> list[tuple[int, str]]:
    """(handle, comment) of each rule in `nft -j list chain ...` output."""
    out = []
    for item in doc.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict):
            out.append((int(rule["handle"]), str(rule.get("comment", ""))))
    return out


def parse_elements(doc: dict[str, Any], family: Family) -> list[Element]:
    """The elements of a ports map in `nft -j list map ...` output."""
    out = []
    for item in doc.get("nftables", []):
        found = item.get("map") if isinstance(item, dict) else None
        if not isinstance(found, dict):
            continue
        for key, value in found.get("elem", []):
            owner = ""
            if isinstance(key, dict) and "elem" in key:
                owner = str(key["elem"].get("comment", ""))
                key = key["elem"]["val"]
            host_ip, proto, host_port = key["concat"]
            alloc_ip, alloc_port = value["concat"]
            out.append(
                Element(
                    family,
                    str(host_ip),
                    str(proto),
                    int(host_port),
                    str(alloc_ip),
                    int(alloc_port),
                    owner,
                )
            )
    return out


# --- adapter ---------------------------------------------------------------------------

_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _lock() -> asyncio.Lock:
    """The one lock around firewall changes (per event loop: a Lock binds to one loop)."""
    loop = asyncio.get_running_loop()
    lock = _LOCKS.get(loop)
    if lock is None:
        lock = _LOCKS[loop] = asyncio.Lock()
    return lock


def _errno_of(stderr: str) -> int | None:
    for text, number in _ERRNOS.items():
        if text in stderr:
            return number
    return None


class NftRunner(Protocol):
    """Runs nftables text: a script (one transaction) or a `list` command (JSON out)."""

    async def run(self, script: str, *, json_out: bool) -> tuple[int, str, str]:
        """(return code, output, error text)."""
        ...


class NftProcess:
    """`nft -f -` per script, `nft -j <words>` per listing: one process each."""

    def __init__(self, command: Sequence[str] = ()) -> None:
        self._command = tuple(command)

    def _argv(self) -> tuple[str, ...]:
        if not self._command:
            found = shutil.which("nft") or shutil.which("nft", path=os.pathsep.join(_SBIN))
            if found is None:
                raise ToolMissing("nft", "apt-get install nftables")
            self._command = (found,)
        return self._command

    async def run(self, script: str, *, json_out: bool) -> tuple[int, str, str]:
        argv = self._argv()
        args = ["-j", *script.split()] if json_out else ["-f", "-"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                *args,
                stdin=asyncio.subprocess.DEVNULL if json_out else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise ToolMissing(argv[0], "apt-get install nftables") from None
        try:
            out, err = await proc.communicate(None if json_out else script.encode())
        except BaseException:  # a timeout or a cancellation: the process goes too
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode(errors="replace")


@functools.cache
def load_libnftables() -> Any | None:
    """libnftables with its prototypes, or None when it cannot be loaded."""
    try:
        lib = ctypes.CDLL(LIBNFTABLES)
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    for getter in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
        getter.argtypes = [ctypes.c_void_p]
        getter.restype = ctypes.c_char_p
    return lib


def _netfilter_socket_opens() -> bool:
    """Whether a NETLINK_NETFILTER socket opens here (libnftables calls exit() when it
    cannot open one, so that is tried first)."""
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER).close()
    except OSError:
        return False
    return True


class NftLibrary:
    """One libnftables context, kept open, used by one thread of its own.

    The thread and the context's netlink socket are made in the network namespace of
    the thread that constructs this object.  `close()` frees both (collection does too).
    """

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nftables")
        try:  # the worker thread starts here, in the constructing thread's namespace
            self._ctx: int = self._thread.submit(self._open).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            raise
        self._finalizer = weakref.finalize(self, _free_context, lib, self._ctx, self._thread)

    def _open(self) -> int:
        ctx = self._lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise KernelError("open", "nftables context", stderr="nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        return int(ctx)

    def _run(self, script: str, json_out: bool) -> tuple[int, str, str]:
        lib, ctx = self._lib, self._ctx
        lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON if json_out else 0)
        code = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = lib.nft_ctx_get_output_buffer(ctx) or b""  # reading rewinds the buffers
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        return int(code), out.decode(), err.decode(errors="replace")

    async def run(self, script: str, *, json_out: bool) -> tuple[int, str, str]:
        if not self._finalizer.alive:
            raise KernelError("run", "nftables context", stderr="closed")
        return await asyncio.wrap_future(self._thread.submit(self._run, script, json_out))

    def close(self) -> None:
        self._finalizer()


def _free_context(lib: Any, ctx: int, thread: concurrent.futures.ThreadPoolExecutor) -> None:
    try:
        thread.submit(lib.nft_ctx_free, ctx)
    except RuntimeError:  # at interpreter exit, after the worker thread has ended
        lib.nft_ctx_free(ctx)
    thread.shutdown(wait=False)


def start_nft_runner(nft_command: Sequence[str] = ()) -> NftRunner:
    """`nft_command` (or the `nft` binary when libnftables is unusable), else an
    in-process context (see the module docstring; an NftLibrary wants close())."""
    if not nft_command and _netfilter_socket_opens():
        lib = load_libnftables()
        if lib is not None:
            return NftLibrary(lib)
    return NftProcess(nft_command)


class Firewall:
    """waypost's nftables table in the current network namespace.

    One instance per host namespace; every method is idempotent.  `nft_command`
    replaces the in-process libnftables with that command (tests pass
    `("ip", "netns", "exec", NS, "nft")` to drive a throwaway namespace); `runner`
    replaces both.  `close()` releases an in-process context (collection does too).
    """

    def __init__(
        self,
        config: NetConfig,
        *,
        nft_command: Sequence[str] = (),
        runner: NftRunner | None = None,
    ) -> None:
        self._config = config
        self._table = check_table(config.nft_table)
        self._runner = runner or start_nft_runner(nft_command)

    def close(self) -> None:
        if isinstance(self._runner, NftLibrary):
            self._runner.close()

    # -- API -------------------------------------------------------------------------

    async def ensure_base(self) -> None:
        """The table, maps, chains and rules; accept rules in foreign FORWARD chains."""
        async with _lock():
            await self._apply("ensure base", f"table inet {self._table}", render_base(self._config))
        await self.ensure_forward_accept()

    async def ensure_forward_accept(self) -> None:
        """Only the accept rules in foreign FORWARD chains: cheap (one read per family),
        for a caller that wants to catch a firewall (Docker) started after waypost."""
        families: list[Family] = ["ip", "ip6"] if self._config.subnet6 else ["ip"]
        async with _lock():
            for family in families:
                await self._ensure_foreign(family, foreign_rules(self._config))

    async def add_alloc(self, alloc: AllocNetwork) -> None:
        """The map elements of `alloc`'s port mappings (one transaction)."""
        elements = plan_elements(alloc)
        if elements:
            async with _lock():
                await self._apply(
                    "add port forwards",
                    self._obj(alloc.alloc_id),
                    render_add(self._table, elements),
                )

    async def remove_alloc(self, alloc: AllocNetwork) -> None:
        """Delete `alloc`'s elements; those already gone are fine.  An element of the
        same key that belongs to another allocation (another value) is left alone."""
        elements = plan_elements(alloc, strict=False)
        if not elements:
            return
        async with _lock():
            try:
                script = render_remove(self._table, elements)
                await self._apply("remove port forwards", self._obj(alloc.alloc_id), script)
                return
            except KernelError:
                pass  # no table, or a key held by another value: delete what is ours
            mine = {(e.family, e.key, e.value) for e in elements}
            await self._delete_where(
                "remove port forwards",
                lambda e: e.owner == alloc.alloc_id or (e.family, e.key, e.value) in mine,
            )

    async def owned_elements(self) -> set[str]:
        """The allocation ids that have elements ("" for elements without an owner)."""
        return {e.owner for e in await self.elements()}

    async def remove_unclaimed(self, claimed: Collection[str]) -> set[str]:
        """Delete every element whose owner is not in `claimed` (reconcile after a crash:
        the state no longer knows those allocations); the owners removed."""
        async with _lock():
            gone = await self._delete_where(
                "remove unclaimed port forwards", lambda e: e.owner not in claimed
            )
        return {e.owner for e in gone}

    async def remove_all(self) -> None:
        """Drop waypost's table and its rules in foreign FORWARD chains."""
        async with _lock():
            t = self._table
            await self._apply(
                "remove table", f"table inet {t}", f"add table inet {t}\ndelete table inet {t}\n"
            )
            for family in ("ip", "ip6"):
                await self._ensure_foreign(family, {})

    async def elements(self) -> list[Element]:
        """Every element of the ports maps ([] when the table does not exist)."""
        out: list[Element] = []
        for family in ("ip", "ip6"):
            name = map_name(family)
            doc = await self._read(f"list {name}", "list", "map", "inet", self._table, name)
            if doc is not None:
                out += parse_elements(doc, family)
        return out

    # -- helpers -----------------------------------------------------------------------

    def _obj(self, alloc_id: str) -> str:
        return f"inet {self._table} ports of allocation {alloc_id}"

    async def _delete_where(self, op: str, doomed: Callable[[Element], bool]) -> list[Element]:
        gone = [e for e in await self.elements() if doomed(e)]
        if gone:
            await self._apply(op, f"table inet {self._table}", render_delete(self._table, gone))
        return gone

    async def _ensure_foreign(self, family: Family, wanted: dict[str, str]) -> None:
        table, chain = _FOREIGN_FORWARD[family]
        doc = await self._read("list foreign FORWARD", "list", "chain", family, table, chain)
        if doc is None:
            return  # nobody filters forwarding with iptables-nft here
        script = render_foreign(family, parse_rules(doc), wanted, f"{self._table}: ")
        if script:
            await self._apply("ensure forward accept", f"{family} {table} {chain}", script)

    async def _apply(self, op: str, obj: str, script: str) -> None:
        await self._nft(op, obj, script, json_out=False)

    async def _read(self, op: str, *words: str) -> dict[str, Any] | None:
        """`<words>` (a `list` command) as JSON; None when the object does not exist."""
        try:
            out = await self._nft(op, " ".join(words[1:]), " ".join(words), json_out=True)
        except KernelError as exc:
            if exc.errno == errno_.ENOENT:
                return None
            raise
        doc = json.loads(out)
        assert isinstance(doc, dict)
        return doc

    async def _nft(self, op: str, obj: str, script: str, *, json_out: bool) -> str:
        try:
            async with asyncio.timeout(NFT_TIMEOUT):
                code, out, err = await self._runner.run(script, json_out=json_out)
        except TimeoutError:
            raise KernelError(
                op, obj, stderr=f"nft did not answer in {NFT_TIMEOUT:.0f} s"
            ) from None
        if code != 0:
            number = _errno_of(err)
            if number == errno_.EPERM:
                raise NotRoot(f"nft {op}")
            raise KernelError(op, obj, number, err)
        return out
