"""One side of the netsetup benchmark, inside a throwaway host namespace.

Started by tests/bench/net_setup.py as

    python -m tests.bench.net_driver --netns /var/run/netns/<host> --side waypost|cni
                                     --prefix <run prefix> --work <temp dir> [--wrap CMD]

It joins the host namespace first (setns on the main thread, before any thread
exists), so netlink, `nft`, `iptables` and /proc/sys/net act on that namespace, while
it stays in the machine's mount namespace (the namespaces it bind-mounts under
/var/run/netns are visible to the orchestrator, which deletes them).  Both sides run
in such a process, so both pay the same for being there.

- `waypost`: a NetworkManager (default NetConfig except the bridge name and the data
  dir), timed in this process around `setup()`, `teardown()` and `settle()` (the
  background deletions a teardown leaves; waited for, untimed by the teardown,
  before the next cycle).
- `cni`: Nomad's bridge conflist (client/allocrunner/networking_bridge_linux.go:
  loopback, bridge, firewall, portmap; ipam host-local) run the way libcni runs it:
  one process per plugin with CNI_COMMAND / CNI_CONTAINERID / CNI_NETNS / CNI_IFNAME /
  CNI_PATH / CNI_ARGS in the environment and the plugin's config on stdin, with
  `name`, `cniVersion`, `prevResult` (the previous plugin's result on ADD, the cached
  final result on DEL, which runs the plugins in reverse) and `runtimeConfig`
  (portMappings, for the plugin that declares the capability) injected; the final ADD
  result is cached in a file as libcni does.  The plugins are children of this
  process, so they run in the host namespace as they do under a Nomad agent; `--wrap`
  prefixes each plugin call (e.g. "nsenter --net=/var/run/netns/<host>").  The
  allocation's namespace is created before ADD and deleted after DEL (Nomad's network
  hook does both around the CNI calls), with netsetup.links, timed separately.

Protocol, JSON lines.  Requests {"op": ..., ...} on stdin, answered in order on stdout
with {"ok": true, "result": ...} or {"ok": false, "error": "..."}; first {"ready": ...}.

    fill {n}        set up allocations until n are live; {"setup": [seconds, ...]}
    cycles {k}      k times: set up one more, tear it down, wait for the background,
                    then GAP seconds of quiet (the kernel frees a deleted namespace in a
                    work queue of its own; the next cycle should not pay for it);
                    named series of seconds (waypost: setup, teardown, background;
                    cni: add, del, netns_add, netns_del); waypost adds the seconds of
                    each call of its seams during the request ("step:links.create_veth")
    inventory       what the host namespace holds (to check the work was real)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from netsetup.firewall import Firewall
from netsetup.links import Links, start_links
from netsetup.network import NetworkManager, start_network_manager
from netsetup.spec import NetConfig, NetworkSpec, PortSpec
from netsetup.state import NetState, open_state
from tests.netns.driver import emit, join_namespace

CNI_PATH = "/usr/lib/cni"
CNI_VERSION = "0.4.0"  # Nomad's conflist
CNI_TIMEOUT = 60.0  # seconds per plugin call; they answer in milliseconds
CNI_SUBNET = "172.26.64.0/20"  # Nomad's default, inside the throwaway host namespace
ALLOC_PORT = 8080  # the one forwarded port: dynamic host port -> 8080 inside
FIRST_HOST_PORT = 20000  # CNI side: host ports handed out in order (Nomad's range)
SPEC = NetworkSpec("bridge", (PortSpec("http", None, ALLOC_PORT),))
Series = dict[str, list[float]]
GAP = 0.1  # seconds of quiet after each cycle (the kernel frees a namespace in the background)


# --- the CNI side -------------------------------------------------------------------------


def nomad_conflist(bridge: str, subnet: str, data_dir: str) -> dict[str, Any]:
    """Nomad's bridge conflist (nomadCNIConfigTemplate) with a per-run bridge name and a
    host-local dataDir of our own (Nomad leaves it at /var/lib/cni/networks)."""
    return {
        "cniVersion": CNI_VERSION,
        "name": "nomad",
        "plugins": [
            {"type": "loopback"},
            {
                "type": "bridge",
                "bridge": bridge,
                "ipMasq": True,
                "isGateway": True,
                "forceAddress": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir,
                },
            },
            {"type": "firewall", "backend": "iptables", "iptablesAdminChainName": "NOMAD-ADMIN"},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def plugin_config(
    conflist: dict[str, Any],
    plugin: dict[str, Any],
    prev: dict[str, Any] | None,
    capability_args: dict[str, Any],
) -> bytes:
    """What libcni writes to a plugin's stdin (buildOneConfig + injectRuntimeConfig)."""
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    if prev is not None:
        conf["prevResult"] = prev
    wanted = plugin.get("capabilities", {})
    runtime = {k: v for k, v in capability_args.items() if wanted.get(k)}
    if runtime:
        conf["runtimeConfig"] = runtime
    return json.dumps(conf).encode()


class CniError(Exception):
    """A plugin that failed: which one, the command, its output."""


class CniChain:
    """libcni's AddNetworkList / DelNetworkList for one conflist."""

    def __init__(self, conflist: dict[str, Any], cache_dir: Path, wrap: list[str]) -> None:
        self.conflist = conflist
        self.cache_dir = cache_dir
        self.wrap = wrap
        cache_dir.mkdir(parents=True, exist_ok=True)

    def _call(
        self, command: str, plugin: dict[str, Any], container: str, netns: str, stdin: bytes
    ) -> bytes:
        env = dict(os.environ)
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=container,
            CNI_NETNS=netns,
            CNI_IFNAME="eth0",
            CNI_PATH=CNI_PATH,
            CNI_ARGS="IgnoreUnknown=1",  # go-cni's default argument
        )
        argv = [*self.wrap, os.path.join(CNI_PATH, plugin["type"])]
        done = subprocess.run(
            argv, input=stdin, capture_output=True, env=env, timeout=CNI_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise CniError(
                f"{plugin['type']} {command} {container}: exit {done.returncode}: "
                f"{done.stdout.decode(errors='replace')} {done.stderr.decode(errors='replace')}"
            )
        return done.stdout

    def _cache(self, container: str) -> Path:
        return self.cache_dir / f"{self.conflist['name']}-{container}-eth0"

    def add(self, container: str, netns: str, capability_args: dict[str, Any]) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            stdin = plugin_config(self.conflist, plugin, prev, capability_args)
            prev = json.loads(self._call("ADD", plugin, container, netns, stdin))
        assert prev is not None
        self._cache(container).write_text(json.dumps({"result": prev}))
        return prev

    def delete(self, container: str, netns: str, capability_args: dict[str, Any]) -> None:
        cache = self._cache(container)
        cached = json.loads(cache.read_text())["result"] if cache.exists() else None
        for plugin in reversed(self.conflist["plugins"]):
            stdin = plugin_config(self.conflist, plugin, cached, capability_args)
            self._call("DEL", plugin, container, netns, stdin)
        cache.unlink(missing_ok=True)


class CniSide:
    """Allocations set up with the CNI plugins (see the module docstring)."""

    def __init__(self, links: Links, chain: CniChain, prefix: str, host_ip: str) -> None:
        self._links = links
        self._chain = chain
        self._prefix = prefix
        self._host_ip = host_ip
        self._serial = 0
        self.live: list[tuple[str, int]] = []

    def _ports(self, port: int) -> dict[str, Any]:
        # Nomad's getPortMapping: one mapping per protocol, HostIP set
        mapping = {"hostPort": port, "containerPort": ALLOC_PORT, "hostIP": self._host_ip}
        return {"portMappings": [{**mapping, "protocol": p} for p in ("tcp", "udp")]}

    async def setup(self) -> tuple[float, float]:
        """(netns create, ADD) seconds of one new allocation."""
        self._serial += 1
        name, port = f"{self._prefix}c{self._serial}", FIRST_HOST_PORT + self._serial
        start = time.perf_counter()
        await self._links.create_namespace(name)
        made = time.perf_counter()
        path = str(self._links.namespace_path(name))
        await asyncio.to_thread(self._chain.add, name, path, self._ports(port))
        done = time.perf_counter()
        self.live.append((name, port))
        return made - start, done - made

    async def teardown(self) -> tuple[float, float]:
        """(DEL, netns delete) seconds of the newest allocation."""
        name, port = self.live.pop()
        path = str(self._links.namespace_path(name))
        start = time.perf_counter()
        await asyncio.to_thread(self._chain.delete, name, path, self._ports(port))
        deleted = time.perf_counter()
        await self._links.delete_namespace(name)
        return deleted - start, time.perf_counter() - deleted

    async def fill(self, n: int) -> Series:
        series: Series = {"add": [], "netns_add": []}
        while len(self.live) < n:
            netns, add = await self.setup()
            series["add"].append(add)
            series["netns_add"].append(netns)
        return series

    async def cycles(self, k: int) -> Series:
        series: Series = defaultdict(list)
        for _ in range(k):
            netns_add, add = await self.setup()
            delete, netns_del = await self.teardown()
            await asyncio.sleep(GAP)
            for key, value in (
                ("add", add),
                ("del", delete),
                ("netns_add", netns_add),
                ("netns_del", netns_del),
            ):
                series[key].append(value)
        return dict(series)

    async def inventory(self) -> dict[str, Any]:
        nat = await asyncio.to_thread(
            subprocess.run, ["iptables", "-t", "nat", "-S"], capture_output=True, check=True
        )
        lines = nat.stdout.decode().splitlines()
        return {
            "live": len(self.live),
            "namespaces": sum(self._links.namespace_alive(n) for n, _ in self.live),
            "hostport_dnat_rules": sum(line.startswith("-A CNI-HOSTPORT-DNAT") for line in lines),
            "nat_rules": sum(line.startswith("-A") for line in lines),
        }


# --- the waypost side -----------------------------------------------------------------------


class StepTimes:
    """Seconds per awaited method of the objects it wraps (the manager's seams)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def take(self) -> Series:
        """What was recorded since the last take, as "step:<object>.<method>" series."""
        taken, self.seconds = self.seconds, defaultdict(list)
        return {f"step:{name}": xs for name, xs in taken.items()}

    def wrap(self, target: Any, label: str) -> Any:
        times = self

        class Timed:
            def __getattr__(self, name: str) -> Any:
                value = getattr(target, name)
                if not asyncio.iscoroutinefunction(value):
                    return value

                @functools.wraps(value)
                async def timed(*args: Any, **kwargs: Any) -> Any:
                    start = time.perf_counter()
                    try:
                        return await value(*args, **kwargs)
                    finally:
                        times.seconds[f"{label}.{name}"].append(time.perf_counter() - start)

                return timed

        return Timed()


class TimedState:
    """NetState with its (synchronous, threaded) writes timed."""

    def __init__(self, state: NetState, times: StepTimes) -> None:
        self._state = state
        self._times = times

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._state, name)
        if name not in ("reserve", "complete", "release"):
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self._times.seconds[f"state.{name}"].append(time.perf_counter() - start)

        return timed


class WaypostSide:
    """Allocations set up with netsetup's NetworkManager."""

    def __init__(self, manager: NetworkManager, prefix: str, times: StepTimes) -> None:
        self._manager = manager
        self._prefix = prefix
        self._serial = 0
        self.times = times
        self.live: list[str] = []

    async def _timed(self, work: Awaitable[object]) -> float:
        start = time.perf_counter()
        await work
        return time.perf_counter() - start

    async def setup(self) -> float:
        self._serial += 1
        alloc = f"{self._prefix}w{self._serial}"
        seconds = await self._timed(self._manager.setup(alloc, SPEC))
        self.live.append(alloc)
        return seconds

    async def fill(self, n: int) -> Series:
        self.times.take()
        series: Series = {"setup": []}
        while len(self.live) < n:
            series["setup"].append(await self.setup())
        return series | self.times.take()

    async def cycles(self, k: int) -> Series:
        self.times.take()
        series: Series = defaultdict(list)
        for _ in range(k):
            series["setup"].append(await self.setup())
            series["teardown"].append(await self._timed(self._manager.teardown(self.live.pop())))
            start = time.perf_counter()
            errors = await self._manager.settle()
            series["background"].append(time.perf_counter() - start)
            if errors:
                raise RuntimeError(f"background work failed: {errors}")
            await asyncio.sleep(GAP)
        return dict(series) | self.times.take()

    async def inventory(self) -> dict[str, Any]:
        listed = await self._manager.list()
        return {"live": len(self.live), "allocations": len(listed)}


# --- the process ---------------------------------------------------------------------------


async def _serve(handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        request = json.loads(line)
        try:
            result = await handlers[request["op"]](request)
        except Exception as exc:  # answered, the orchestrator decides
            emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        else:
            emit({"ok": True, "result": result})


async def run_waypost(args: argparse.Namespace) -> None:
    config = NetConfig(bridge=args.bridge, data_dir=str(Path(args.work) / "waypost"))
    times = StepTimes()
    state = open_state(config.data_dir)
    links = await start_links(config)
    manager = await start_network_manager(
        config,
        cast(NetState, TimedState(state, times)),
        times.wrap(Firewall(config), "firewall"),
        links=times.wrap(links, "links"),
    )
    side = WaypostSide(manager, args.prefix, times)
    try:
        emit({"ready": {"side": "waypost", "host_ip": manager.host_ip, "pid": os.getpid()}})
        await _serve(
            {
                "fill": lambda r: side.fill(int(r["n"])),
                "cycles": lambda r: side.cycles(int(r["k"])),
                "inventory": lambda r: side.inventory(),
            }
        )
    finally:
        await manager.close()
        state.close()


async def run_cni(args: argparse.Namespace) -> None:
    config = NetConfig(data_dir=str(Path(args.work) / "cni-links"))  # namespaces only
    links = await start_links(config)
    try:
        work = Path(args.work)
        conflist = nomad_conflist(args.bridge, CNI_SUBNET, str(work / "cni-ipam"))
        chain = CniChain(conflist, work / "cni-cache", args.wrap.split() if args.wrap else [])
        side = CniSide(links, chain, args.prefix, args.host_ip)
        emit({"ready": {"side": "cni", "host_ip": args.host_ip, "pid": os.getpid()}})
        await _serve(
            {
                "fill": lambda r: side.fill(int(r["n"])),
                "cycles": lambda r: side.cycles(int(r["k"])),
                "inventory": lambda r: side.inventory(),
            }
        )
    finally:
        links.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", required=True, help="the host namespace file to join")
    parser.add_argument("--side", choices=("waypost", "cni"), required=True)
    parser.add_argument("--prefix", required=True, help="allocation names start with it")
    parser.add_argument("--work", required=True, help="a temp dir for state and caches")
    parser.add_argument("--bridge", required=True, help="the bridge's name (per run)")
    parser.add_argument("--host-ip", default="", help="the host address (CNI's port hostIP)")
    parser.add_argument("--wrap", default="", help="command prefixed to each plugin call")
    args = parser.parse_args()
    join_namespace(args.netns)
    asyncio.run(run_waypost(args) if args.side == "waypost" else run_cni(args))


if __name__ == "__main__":
    main()
