"""NetworkManager: the allocations of one host, set up and torn down as wholes.  State.

The owner of allocation networking in one host namespace (Nomad's
NetworkConfigurator{Setup, Teardown}), composed of the state (netsetup.state:
ports, IP leases, allocations in SQLite), the kernel (netsetup.links: bridge, veth,
namespace, addresses, routes) and the firewall (netsetup.firewall: nftables map
elements).  Every change runs under one asyncio.Lock per manager (one manager per
host namespace), so concurrent setups and teardowns never interleave.

    setup(alloc_id, spec)    reserve ports (+ an IP) in one transaction, then in bridge
                             mode: namespace, veth on the bridge (peer eth0 inside),
                             addresses, default route, lo, hairpin, port forwards; then
                             record the result.  All or nothing: a failing step undoes
                             the earlier ones in reverse and the error is raised with
                             the undo failures as notes.  A second setup of an
                             allocation that is set up returns what it has.
    teardown(alloc_id)       forwards, veth, namespace, reservation: every step runs even
                             when an earlier one fails; failures come back together in
                             TeardownError.  Unknown allocations are fine (False).  The
                             veth is detached at once and deleted in the background
                             (`settle()` waits for that; see _Reaper).
    list()                   the allocations that are set up.
    reconcile()              at start: adopt what is right without touching it, repair
                             what is broken (once), roll back setups a crash interrupted,
                             remove owned objects no allocation claims.

The state is written before the kernel is touched and released after it was cleaned,
so every namespace waypost creates is claimed by a state row while it exists: that row
is what makes a namespace "ours".  Owned links are the veths named `veth_prefix` +
hash (netsetup.links); owned forwards carry the allocation id (netsetup.firewall).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from netsetup import firewall as fw
from netsetup.errors import AllocExists, NetsetupError, NotRoot, TeardownError
from netsetup.hostaddr import resolve_host_address
from netsetup.ipam import plan_addresses, plan_pools
from netsetup.links import (
    InsideState,
    LinkInfo,
    Links,
    check_namespace_name,
    ensure_sysctl,
    host_sysctls,
    start_links,
)
from netsetup.ports import PortPolicy, plan_policy, plan_ports, probe_port_free, probe_static_port
from netsetup.spec import AllocNetwork, NetConfig, NetworkSpec
from netsetup.state import AllocRecord, Ledger, NetState, Reservation

log = logging.getLogger(__name__)

INSPECTIONS = 8  # allocation namespaces reconcile reads at once (a thread and a socket each)

Undo = Callable[[], Awaitable[object]]
# Aliases for annotations inside NetworkManager, where `list` is the method.
Undos = list[Undo]
Errors = list[NetsetupError]


class FirewallPort(Protocol):
    """What the manager needs of netsetup.firewall.Firewall (the seam tests wrap)."""

    async def ensure_base(self) -> None: ...
    async def add_alloc(self, alloc: AllocNetwork) -> None: ...
    async def remove_alloc(self, alloc: AllocNetwork) -> None: ...
    async def elements(self) -> list[fw.Element]: ...
    async def remove_unclaimed(self, claimed: Collection[str]) -> set[str]: ...


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What `reconcile` did, by allocation id (orphan links by name)."""

    adopted: tuple[str, ...] = ()  # right as found, untouched
    repaired: tuple[str, ...] = ()  # broken, fixed
    rolled_back: tuple[str, ...] = ()  # setups a crash interrupted, undone
    removed_links: tuple[str, ...] = ()  # owned veths no allocation claims
    removed_namespaces: tuple[str, ...] = ()  # their namespaces
    removed_forwards: tuple[str, ...] = ()  # owners of unclaimed nft elements
    failed: tuple[tuple[str, str], ...] = ()  # (alloc id, error) left as found


@dataclass(slots=True)
class _Report:
    """ReconcileReport while it is being filled in."""

    adopted: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    removed_links: list[str] = field(default_factory=list)
    removed_namespaces: list[str] = field(default_factory=list)
    removed_forwards: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def freeze(self) -> ReconcileReport:
        return ReconcileReport(
            adopted=tuple(self.adopted),
            repaired=tuple(self.repaired),
            rolled_back=tuple(self.rolled_back),
            removed_links=tuple(self.removed_links),
            removed_namespaces=tuple(self.removed_namespaces),
            removed_forwards=tuple(self.removed_forwards),
            failed=tuple(self.failed),
        )


@dataclass(slots=True)
class _Findings:
    """Problems of one allocation, by what repairs them."""

    namespace: bool = False  # missing: recreate everything
    veth: bool = False  # missing, off the bridge, down or not paired: recreate the veth
    hairpin: bool = False
    inside: bool = False  # lo / eth0 / address / route
    forwards: bool = False
    veth_index: int = 0  # for a hairpin repair
    notes: list[str] = field(default_factory=list)

    def flag(self, what: str, note: str) -> None:
        setattr(self, what, True)
        self.notes.append(note)

    def __bool__(self) -> bool:
        return bool(self.notes)


def plan_result(
    config: NetConfig,
    alloc_id: str,
    spec: NetworkSpec,
    reservation: Reservation,
    host_ip: str,
    host_veth: str,
) -> AllocNetwork:
    """Pure: the AllocNetwork of a reservation (what setup returns and the state keeps)."""
    if spec.mode == "host":
        return AllocNetwork(alloc_id, "host", host_ip, reservation.ports)
    ips = reservation.ips
    return AllocNetwork(
        alloc_id=alloc_id,
        mode="bridge",
        host_ip=host_ip,
        ports=reservation.ports,
        netns=os.path.join(config.netns_dir, alloc_id),
        alloc_ip=ips[0] if ips else "",
        alloc_ip6=ips[1] if len(ips) > 1 else "",
        interface=config.alloc_interface,
        host_veth=host_veth,
        bridge=config.bridge,
    )


def _prefixlen(subnet: str) -> int:
    return ipaddress.ip_network(subnet).prefixlen


async def _run_undo(alloc_id: str, undo: list[Undo], error: BaseException) -> None:
    """Run the undo steps in reverse; their failures become notes of `error`."""
    for step in reversed(undo):
        try:
            await step()
        except Exception as exc:  # every step runs; the original error is what is raised
            log.error("setup of %s: undo failed: %s", alloc_id, exc)
            error.add_note(f"undo failed, possibly left behind: {exc}")


class _Reaper:
    """Deletes detached veths off the caller's path.

    Unregistering a network device makes the kernel wait for RCU grace periods (tens
    of ms on a busy host), longer than all the rest of a teardown.  A detached veth
    (down: a disabled bridge port) carries no traffic, so teardown hands its deletion
    to the reaper as its last step and returns; the request goes out from a thread of
    netsetup.links (the event loop goes on) and concurrent deletions overlap their
    waits.  A setup of the same allocation waits for its old veth to be gone;
    `settle()` waits for all of them.  A crash leaves detached veths behind, which
    reconcile removes (owned, claimed by nobody).
    """

    def __init__(self, links: Links) -> None:
        self._links = links
        self._pending: dict[str, asyncio.Task[None]] = {}
        self.errors: list[NetsetupError] = []

    def schedule(self, name: str, index: int) -> None:
        task = asyncio.create_task(self._delete(name, index), name=f"delete link {name}")
        self._pending[name] = task
        task.add_done_callback(lambda done: self._forget(name, done))

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._pending.get(name) is task:
            del self._pending[name]

    async def _delete(self, name: str, index: int) -> None:
        try:
            await self._links.delete_link_index(index, name)
        except NetsetupError as exc:  # left detached; reconcile removes it
            log.error("deleting detached link %s failed: %s", name, exc)
            self.errors.append(exc)

    async def wait_for(self, name: str) -> None:
        task = self._pending.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def wait_all(self) -> None:
        """Wait for every pending deletion; failures stay for `settle()`."""
        while self._pending:
            await asyncio.shield(asyncio.gather(*self._pending.values()))

    async def settle(self) -> list[NetsetupError]:
        """Wait for every pending deletion; the failures since the last call."""
        while self._pending:
            await asyncio.gather(*self._pending.values())
        errors, self.errors = self.errors, []
        return errors


async def start_network_manager(
    config: NetConfig, state: NetState, firewall: FirewallPort, *, links: Links | None = None
) -> NetworkManager:
    """A manager for the current host namespace; close() it (it closes `links` too)."""
    own = links or await start_links(config)
    try:
        host_ip = await resolve_host_address(config, own)
    except BaseException:
        own.close()
        raise
    return NetworkManager(config, state, firewall, own, host_ip)


class NetworkManager:
    """The allocations of one host namespace.  Build it with `start_network_manager`."""

    def __init__(
        self,
        config: NetConfig,
        state: NetState,
        firewall: FirewallPort,
        links: Links,
        host_ip: str,
    ) -> None:
        self.config = config
        self.host_ip = host_ip
        self._state = state
        self._firewall = firewall
        self._links = links
        self._lock = asyncio.Lock()
        self._policy: PortPolicy = plan_policy(config, host_ip)
        self._pools = plan_pools(config)
        self._bridge: int | None = None  # index, once bridge, sysctls and nft base are ensured
        self._reaper = _Reaper(links)

    async def settle(self) -> list[NetsetupError]:
        """Wait until detached veths are deleted (see _Reaper); what failed meanwhile."""
        return await self._reaper.settle()

    async def close(self) -> None:
        """Finish pending deletions, then release the netlink socket."""
        try:
            await self._reaper.settle()
        finally:
            self._links.close()

    # -- reads ------------------------------------------------------------------------

    async def list(self) -> tuple[AllocNetwork, ...]:
        """The allocations that are set up, oldest first."""
        records = await asyncio.to_thread(self._state.allocations)
        return tuple(r.result for r in records if r.result is not None)

    async def get(self, alloc_id: str) -> AllocNetwork | None:
        record = await asyncio.to_thread(self._state.get, alloc_id)
        return None if record is None else record.result

    # -- setup ------------------------------------------------------------------------

    async def setup(self, alloc_id: str, spec: NetworkSpec) -> AllocNetwork:
        """Set up `alloc_id` as `spec` asks, all or nothing (see the module docstring).

        Cancelling the caller does not cut a kernel step in half: the setup runs to its
        end in a task of its own and what it made is then torn down.
        """
        check_namespace_name(alloc_id)
        work = asyncio.ensure_future(self._setup(alloc_id, spec))
        try:
            alloc, _ = await asyncio.shield(work)
        except asyncio.CancelledError:
            await self._abandon(alloc_id, work)
            raise
        return alloc

    async def _abandon(
        self, alloc_id: str, work: asyncio.Future[tuple[AllocNetwork, bool]]
    ) -> None:
        try:
            _, created = await work
        except Exception:
            return  # it failed and undid itself
        if created:
            with contextlib.suppress(NetsetupError):
                await self.teardown(alloc_id)

    async def _setup(self, alloc_id: str, spec: NetworkSpec) -> tuple[AllocNetwork, bool]:
        """The allocation and whether this call created it."""
        async with self._lock:
            existing = await asyncio.to_thread(self._state.get, alloc_id)
            if existing is not None:
                if existing.result is not None and existing.spec == spec:
                    return existing.result, False
                raise AllocExists(alloc_id)
            bridge = await self._ensure_base() if spec.mode == "bridge" else 0
            undo: Undos = []
            try:
                alloc = await self._reserve(alloc_id, spec)
                undo.append(lambda: asyncio.to_thread(self._state.release, alloc_id))
                if spec.mode == "bridge":
                    await self._build(alloc, bridge, undo)
                await asyncio.to_thread(self._state.complete, alloc_id, alloc)
            except BaseException as exc:
                self._bridge = None  # a vanished bridge or table is ensured again next time
                await _run_undo(alloc_id, undo, exc)
                raise
            return alloc, True

    async def _reserve(self, alloc_id: str, spec: NetworkSpec) -> AllocNetwork:
        bridge = spec.mode == "bridge"
        v4, v6 = self._pools

        def plan(ledger: Ledger) -> Reservation:
            ports = plan_ports(
                spec.ports,
                self._policy,
                ledger.ports,
                is_free=probe_port_free,
                static_free=probe_static_port,
            )
            ips = plan_addresses(v4, v6, ledger.leases, ledger.last_ip4, ledger.last_ip6)
            return Reservation(ports, ips if bridge else ())

        reservation = await asyncio.to_thread(self._state.reserve, alloc_id, spec, plan)
        veth = self._links.veth_name(alloc_id) if bridge else ""
        return plan_result(self.config, alloc_id, spec, reservation, self.host_ip, veth)

    async def _build(self, alloc: AllocNetwork, bridge: int, undo: Undos) -> None:
        """The kernel and firewall side of a bridge allocation; each step pushes its undo."""
        links, name = self._links, alloc.alloc_id
        await links.create_namespace(name)
        undo.append(lambda: links.delete_namespace(name))
        await self._reaper.wait_for(alloc.host_veth)  # a teardown of the same id just ran
        await links.create_veth(alloc.host_veth, name, bridge, hairpin=self.config.hairpin)
        undo.append(lambda: links.delete_link(alloc.host_veth))
        await self._configure_inside(alloc)
        if alloc.ports:
            # Undo first: removing forwards that are not there is fine, and an add that
            # failed half-way (a timeout) may still have added some.
            undo.append(lambda: self._firewall.remove_alloc(alloc))
            await self._firewall.add_alloc(alloc)

    async def _configure_inside(self, alloc: AllocNetwork) -> None:
        config = self.config
        await self._links.configure_inside(
            alloc.alloc_id,
            ipaddress.IPv4Interface(f"{alloc.alloc_ip}/{_prefixlen(config.subnet)}"),
            ipaddress.IPv4Address(config.gateway),
            ipaddress.IPv6Interface(f"{alloc.alloc_ip6}/{_prefixlen(config.subnet6)}")
            if alloc.alloc_ip6
            else None,
            ipaddress.IPv6Address(config.gateway6) if alloc.alloc_ip6 else None,
        )

    async def _ensure_base(self) -> int:
        """The bridge, the host sysctls and the nft base (once; again after a failure)."""
        if self._bridge is not None:
            return self._bridge
        if os.geteuid() != 0:
            raise NotRoot("bridge networking")
        config = self.config
        gateway6 = (
            ipaddress.IPv6Interface(f"{config.gateway6}/{_prefixlen(config.subnet6)}")
            if config.subnet6
            else None
        )
        index = await self._links.ensure_bridge(
            config.bridge,
            ipaddress.IPv4Interface(f"{config.gateway}/{_prefixlen(config.subnet)}"),
            gateway6,
        )
        wanted = host_sysctls(
            config.bridge, ipv6=bool(config.subnet6), bridge_nf=config.bridge_nf_call_iptables
        )
        for key, value in wanted:
            ensure_sysctl(key, value)
        await self._firewall.ensure_base()
        self._bridge = index
        return index

    # -- teardown ---------------------------------------------------------------------

    async def teardown(self, alloc_id: str) -> bool:
        """Remove everything of `alloc_id`; False when the state did not know it.

        Every step runs; the failures are raised together as TeardownError, after the
        reservation was released (what is left behind is unclaimed: reconcile removes it).
        Of an allocation the state does not know, only its owned veth and its forwards
        are removed, and its namespace only when that veth proved it was ours.
        """
        check_namespace_name(alloc_id)
        work = asyncio.ensure_future(self._teardown(alloc_id))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:  # a teardown always finishes
            with contextlib.suppress(Exception):
                await work
            raise

    async def _teardown(self, alloc_id: str) -> bool:
        async with self._lock:
            record = await asyncio.to_thread(self._state.get, alloc_id)
            errors: Errors = []
            alloc = self._network_of(alloc_id, record)
            detached = await self._dismantle(alloc_id, alloc, errors)
            try:
                if record is not None:
                    await _step(errors, asyncio.to_thread(self._state.release, alloc_id))
            finally:
                self._reap(alloc, detached)
            if errors:
                raise TeardownError(alloc_id, errors)
            return record is not None

    def _network_of(self, alloc_id: str, record: AllocRecord | None) -> AllocNetwork | None:
        """What `record` set up (or was setting up when a crash stopped it)."""
        if record is None:
            return None
        if record.result is not None:
            return record.result
        veth = self._links.veth_name(alloc_id) if record.spec.mode == "bridge" else ""
        return plan_result(
            self.config, alloc_id, record.spec, record.reservation, self.host_ip, veth
        )

    async def _dismantle(
        self, alloc_id: str, alloc: AllocNetwork | None, errors: Errors
    ) -> int | None:
        """Forwards, veth, namespace of one allocation; failures appended to `errors`.

        The index of the veth it detached, for `_reap` to delete once the caller's work
        is done (the deletion is slow and busies the kernel: it waits for the rest).
        """
        links = self._links
        if alloc is None:  # unknown: only what is provably ours
            veth = links.veth_name(alloc_id)
            stray = AllocNetwork(alloc_id, "bridge", self.host_ip, host_veth=veth)
            await _step(errors, self._firewall.remove_alloc(stray))
            if await _step(errors, links.delete_link(veth)):
                await _step(errors, links.delete_namespace(alloc_id))
            return None
        if alloc.mode != "bridge":
            return None
        if alloc.ports:
            await _step(errors, self._firewall.remove_alloc(alloc))
        index = await _step(errors, links.detach_link(alloc.host_veth))
        await _step(errors, links.delete_namespace(alloc_id))
        return index if isinstance(index, int) else None

    def _reap(self, alloc: AllocNetwork | None, detached: int | None) -> None:
        """Hand the veth `_dismantle` detached to the reaper."""
        if alloc is not None and detached is not None:
            self._reaper.schedule(alloc.host_veth, detached)

    # -- reconcile --------------------------------------------------------------------

    async def reconcile(self) -> ReconcileReport:
        """Bring the kernel and the firewall in line with the state (at start).

        Correct allocations are not touched; each broken one gets one repair and is
        reported as failed when that does not work; setups a crash interrupted are rolled
        back; veths, their namespaces and nft elements no allocation claims are removed.
        """
        async with self._lock:
            records = await asyncio.to_thread(self._state.allocations)
            done = [r.result for r in records if r.result is not None]
            report = _Report()
            for record in records:
                if record.result is None:
                    await self._roll_back(record, report)
            bridged = [a for a in done if a.mode == "bridge"]
            report.adopted += [a.alloc_id for a in done if a.mode != "bridge"]
            if bridged:
                await self._reconcile_bridged(bridged, report)
            await self._remove_orphans({a.alloc_id for a in done}, bridged, report)
            return report.freeze()

    async def _roll_back(self, record: AllocRecord, report: _Report) -> None:
        errors: Errors = []
        alloc = self._network_of(record.alloc_id, record)
        detached = await self._dismantle(record.alloc_id, alloc, errors)
        try:
            await _step(errors, asyncio.to_thread(self._state.release, record.alloc_id))
        finally:
            self._reap(alloc, detached)
        if errors:
            report.failed.append((record.alloc_id, str(TeardownError(record.alloc_id, errors))))
        else:
            report.rolled_back.append(record.alloc_id)

    async def _reconcile_bridged(self, allocs: Sequence[AllocNetwork], report: _Report) -> None:
        bridge = await self._ensure_base()
        by_name = {link.name: link for link in await self._links.links()}
        present: set[tuple[str, str, str]] = {
            (e.family, e.key, e.value) for e in await self._firewall.elements()
        }
        gate = asyncio.Semaphore(INSPECTIONS)

        async def inspect(alloc: AllocNetwork) -> _Findings | NetsetupError:
            async with gate:
                try:
                    return await self._inspect(alloc, bridge, by_name, present)
                except NetsetupError as exc:
                    return exc

        found = await asyncio.gather(*(inspect(a) for a in allocs))
        for alloc, findings in zip(allocs, found, strict=True):
            try:
                if isinstance(findings, NetsetupError):
                    raise findings
                if not findings:
                    report.adopted.append(alloc.alloc_id)
                    continue
                log.warning("allocation %s is broken: %s", alloc.alloc_id, findings.notes)
                await self._repair(alloc, bridge, findings)
                report.repaired.append(alloc.alloc_id)
            except NetsetupError as exc:
                log.error("allocation %s could not be repaired: %s", alloc.alloc_id, exc)
                report.failed.append((alloc.alloc_id, str(exc)))

    async def _inspect(
        self,
        alloc: AllocNetwork,
        bridge: int,
        by_name: dict[str, LinkInfo],
        present: set[tuple[str, str, str]],
    ) -> _Findings:
        """What is wrong with one bridge allocation (nothing: an empty _Findings)."""
        found = _Findings()
        inside = await self._links.inspect_inside(alloc.alloc_id)
        veth = by_name.get(alloc.host_veth)
        if inside is None:
            found.flag("namespace", "namespace missing")
        if veth is None or veth.kind != "veth" or veth.master != bridge or not veth.up:
            found.flag("veth", "veth missing, off the bridge or down")
        elif inside is not None and inside.eth0_peer_index != veth.index:
            found.flag("veth", f"{alloc.interface} is not the veth's peer")
        elif veth.hairpin != self.config.hairpin:
            found.flag("hairpin", "hairpin mode differs from the config")
            found.veth_index = veth.index
        if inside is not None and not found.veth and not self._inside_ok(alloc, inside):
            found.flag("inside", "lo, eth0, address or default route wrong")
        wanted = {(e.family, e.key, e.value) for e in fw.plan_elements(alloc, strict=False)}
        if not wanted <= present:
            found.flag("forwards", "port forwards missing")
        return found

    def _inside_ok(self, alloc: AllocNetwork, inside: InsideState) -> bool:
        config = self.config
        addresses = {f"{alloc.alloc_ip}/{_prefixlen(config.subnet)}"}
        gateways = {config.gateway}
        if alloc.alloc_ip6:
            addresses.add(
                str(ipaddress.ip_interface(f"{alloc.alloc_ip6}/{_prefixlen(config.subnet6)}"))
            )
            gateways.add(str(ipaddress.ip_address(config.gateway6)))
        return (
            inside.lo_up
            and inside.eth0_up
            and addresses <= inside.addresses
            and gateways <= inside.gateways
        )

    async def _repair(self, alloc: AllocNetwork, bridge: int, found: _Findings) -> None:
        links, name = self._links, alloc.alloc_id
        if found.namespace:
            await links.delete_link(alloc.host_veth)
            await links.delete_namespace(name)  # a file left without a namespace on it
            await links.create_namespace(name)
        if found.namespace or found.veth:
            await links.delete_link(alloc.host_veth)
            await links.create_veth(alloc.host_veth, name, bridge, hairpin=self.config.hairpin)
        elif found.hairpin:
            await links.set_hairpin(found.veth_index, alloc.host_veth, on=self.config.hairpin)
        if found.namespace or found.veth or found.inside:
            await self._configure_inside(alloc)
        if found.forwards:
            await self._firewall.add_alloc(alloc)

    async def _remove_orphans(
        self, claimed: set[str], bridged: Sequence[AllocNetwork], report: _Report
    ) -> None:
        """Owned veths no allocation claims (with their namespaces), unclaimed forwards."""
        await self._reaper.wait_all()  # a detached veth on its way out is no orphan
        mine = {a.host_veth for a in bridged}
        namespaces: dict[str, str] = {}
        for name in self._links.namespaces():
            with contextlib.suppress(NetsetupError):
                namespaces[self._links.veth_name(check_namespace_name(name))] = name
        for link in await self._links.links():
            if not self._links.owns_link(link) or link.name in mine:
                continue
            errors: Errors = []
            if await _step(errors, self._links.delete_link(link.name)):
                report.removed_links.append(link.name)
            orphan_ns = namespaces.get(link.name)
            if (
                orphan_ns is not None
                and orphan_ns not in claimed
                and await _step(errors, self._links.delete_namespace(orphan_ns))
            ):
                report.removed_namespaces.append(orphan_ns)
            report.failed += [(link.name, str(e)) for e in errors]
        try:
            gone = await self._firewall.remove_unclaimed(claimed)
        except NetsetupError as exc:
            report.failed.append(("firewall", str(exc)))
        else:
            report.removed_forwards += sorted(gone)


async def _step(errors: list[NetsetupError], action: Awaitable[object]) -> object:
    """Await one teardown step; a NetsetupError is collected, not raised."""
    try:
        return await action
    except NetsetupError as exc:
        errors.append(exc)
        return None
