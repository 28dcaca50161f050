"""netsetup.firewall against the real nft, inside a throwaway host namespace per test.

Every test runs with both ways of running nft (the `host_ns` fixture's parameter):
"lib", the in-process libnftables context (the default), built by a thread that
entered the namespace, so its netlink socket and its thread live there; and "nft",
the binary through `ip netns exec <ns> nft`.  Either way the table lives in that
namespace only; the fixture closes the contexts and deletes the namespace (and with
it every nft object) afterwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from netsetup.errors import InvalidName, KernelError, NotRoot, SpecError, ToolMissing
from netsetup.firewall import Firewall, NftLibrary, plan_elements, render_add, render_base
from netsetup.spec import AllocNetwork, NetConfig, PortMapping
from tests.netns.access_topo import (
    HOST_IP,
    SKIP_REASON,
    Namespaces,
    is_root,
    nft_in,
    nft_json,
    set_forward_drop,
    sh,
    sweep,
)

pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason=SKIP_REASON)]

_TAGS = itertools.count()
OTHER_HOST_IP = "203.0.113.7"  # a second host address (a `host_network`)
ROOT = Path(__file__).resolve().parents[2]
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")
# namespace -> (how nft runs there, the in-process firewalls to close)
_RUNNERS: dict[str, tuple[str, list[Firewall]]] = {}


@pytest.fixture(scope="module", autouse=True)
def _no_namespace_left() -> Iterator[None]:
    yield
    assert sweep() == [], "namespaces of this run were left behind"


@pytest.fixture(params=["lib", "nft"])
def host_ns(request: pytest.FixtureRequest) -> Iterator[str]:
    spaces = Namespaces(f"f{next(_TAGS)}")
    made: list[Firewall] = []
    try:
        ns = spaces.add("h")
        _RUNNERS[ns] = (request.param, made)
        yield ns
    finally:
        for fw in made:
            fw.close()
        spaces.close()


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def in_namespace(ns: str, make: Callable[[], T]) -> T:
    """`make()` called by a thread that entered namespace `ns` (the threads and sockets it
    starts stay there); the thread comes back or dies."""
    made: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                made.append(make())
            finally:
                _setns(original)
        except BaseException as exc:
            failed.append(exc)
        finally:
            os.close(original)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    if failed:
        raise failed[0]
    if not made:
        raise TimeoutError(f"{ns}: the thread did not finish")
    return made[0]


def firewall(ns: str, config: NetConfig | None = None) -> Firewall:
    """A Firewall for the table in `ns`, run the way the test's parameter says."""
    how, made = _RUNNERS[ns]
    if how == "nft":
        return Firewall(config or NetConfig(), nft_command=nft_in(ns))
    fw = in_namespace(ns, lambda: Firewall(config or NetConfig()))
    made.append(fw)
    return fw


def alloc(
    alloc_id: str, ip: str, *ports: tuple[str, int, int], host_ip: str = HOST_IP, ip6: str = ""
) -> AllocNetwork:
    """A bridge allocation; ports are (host_ip, host_port, alloc_port)."""
    return AllocNetwork(
        alloc_id=alloc_id,
        mode="bridge",
        host_ip=host_ip,
        ports=tuple(PortMapping(f"p{i}", h, hp, ap) for i, (h, hp, ap) in enumerate(ports)),
        alloc_ip=ip,
        alloc_ip6=ip6,
    )


def elements(ns: str, name: str = "ports") -> set[tuple[str, str, int, str, int, str]]:
    """(host ip, proto, host port, alloc ip, alloc port, comment) read with nft -j."""
    out = set()
    doc = nft_json(ns, "list", "map", "inet", "waypost", name)
    for item in doc["nftables"]:
        for key, value in item.get("map", {}).get("elem", []):
            comment = key["elem"].get("comment", "") if "elem" in key else ""
            concat = key["elem"]["val"]["concat"] if "elem" in key else key["concat"]
            out.add((*concat, *value["concat"], comment))
    return out


def table_text(ns: str) -> str:
    return sh(*nft_in(ns), "list", "table", "inet", "waypost").stdout


def table_items(ns: str) -> list[dict[str, Any]]:
    return [item for item in nft_json(ns, "list", "table", "inet", "waypost")["nftables"] if item]


# --- the base table ---------------------------------------------------------------------


async def test_ruleset_shape(host_ns: str) -> None:
    await firewall(host_ns).ensure_base()
    items = table_items(host_ns)
    chains = {
        i["chain"]["name"]: (i["chain"]["type"], i["chain"]["hook"], i["chain"]["prio"])
        for i in items
        if "chain" in i
    }
    assert chains == {
        "prerouting": ("nat", "prerouting", -100),
        "output": ("nat", "output", -100),
        "postrouting": ("nat", "postrouting", 100),
        "forward": ("filter", "forward", 0),
    }
    assert all(i["chain"]["policy"] == "accept" for i in items if "chain" in i)
    maps = {i["map"]["name"]: i["map"] for i in items if "map" in i}
    assert set(maps) == {"ports"}
    assert maps["ports"]["type"] == ["ipv4_addr", "inet_proto", "inet_service"]
    assert maps["ports"]["map"] in ("ipv4_addr . inet_service", ["ipv4_addr", "inet_service"])
    rules: dict[str, int] = {}
    for i in items:
        if "rule" in i:
            rules[i["rule"]["chain"]] = rules.get(i["rule"]["chain"], 0) + 1
    assert rules == {"prerouting": 1, "output": 1, "postrouting": 3, "forward": 4}
    text = table_text(host_ns)
    dnat = "dnat ip to ip daddr . meta l4proto . th dport map @ports"
    assert text.count(dnat) == 2
    for line in (
        'oifname "nomad" ip saddr 127.0.0.0/8 masquerade',
        'oifname "nomad" ip saddr 172.26.64.0/20 ct status dnat masquerade',
        'oifname != "nomad" ip saddr 172.26.64.0/20 ip daddr != 224.0.0.0/4 masquerade',
        'iifname "nomad" accept',
        'oifname "nomad" ct state established,related accept',
        'oifname "nomad" ct status dnat accept',
        'oifname "nomad" counter packets 0 bytes 0 drop',
    ):
        assert line in text


async def test_ruleset_follows_config(host_ns: str) -> None:
    config = NetConfig(bridge="wpbr0", subnet="10.99.0.0/24", subnet6="fd00:99::/64")
    await firewall(host_ns, config).ensure_base()
    text = table_text(host_ns)
    assert 'oifname "wpbr0" ip saddr 10.99.0.0/24 ct status dnat masquerade' in text
    assert 'oifname != "wpbr0" ip6 saddr fd00:99::/64 ip6 daddr != ff00::/8 masquerade' in text
    assert "dnat ip6 to ip6 daddr . meta l4proto . th dport map @ports6" in text
    assert "nomad" not in text
    maps = {i["map"]["name"]: i["map"]["type"] for i in table_items(host_ns) if "map" in i}
    assert maps["ports6"] == ["ipv6_addr", "inet_proto", "inet_service"]


async def test_ensure_base_is_idempotent_and_keeps_elements(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    first = table_text(host_ns)
    await fw.ensure_base()
    await fw.ensure_base()
    assert table_text(host_ns) == first
    await fw.add_alloc(alloc("a1", "172.26.64.2", (HOST_IP, 20000, 8080)))
    before = elements(host_ns)
    await fw.ensure_base()
    assert elements(host_ns) == before
    assert len(before) == 4


async def test_ensure_base_repairs_a_tampered_table(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    first = table_text(host_ns)
    sh(*nft_in(host_ns), "flush", "chain", "inet", "waypost", "forward")
    sh(*nft_in(host_ns), "add", "rule", "inet", "waypost", "prerouting", "accept")
    assert table_text(host_ns) != first
    await fw.ensure_base()
    assert table_text(host_ns) == first


# --- elements ---------------------------------------------------------------------------


async def test_add_alloc_maps_tcp_udp_and_loopback(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    a1 = alloc("a1", "172.26.64.2", (HOST_IP, 20000, 8080), (OTHER_HOST_IP, 20001, 9090))
    await fw.add_alloc(a1)
    await fw.add_alloc(a1)  # again: nothing changes, no error
    assert elements(host_ns) == {
        (HOST_IP, "tcp", 20000, "172.26.64.2", 8080, "a1"),
        (HOST_IP, "udp", 20000, "172.26.64.2", 8080, "a1"),
        ("127.0.0.1", "tcp", 20000, "172.26.64.2", 8080, "a1"),
        ("127.0.0.1", "udp", 20000, "172.26.64.2", 8080, "a1"),
        # another host network's port is not mapped on 127.0.0.1 (it could collide)
        (OTHER_HOST_IP, "tcp", 20001, "172.26.64.2", 9090, "a1"),
        (OTHER_HOST_IP, "udp", 20001, "172.26.64.2", 9090, "a1"),
    }
    assert await fw.owned_elements() == {"a1"}


async def test_host_mode_and_no_ports_add_nothing(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    host_mode = AllocNetwork("h1", "host", HOST_IP, (PortMapping("http", HOST_IP, 20000, 20000),))
    await fw.add_alloc(host_mode)
    await fw.add_alloc(alloc("b1", "172.26.64.2"))
    assert elements(host_ns) == set()
    await fw.remove_alloc(host_mode)


async def test_ipv6_mappings_go_to_ports6(host_ns: str) -> None:
    fw = firewall(host_ns, NetConfig(subnet6="fd00:26::/64"))
    await fw.ensure_base()
    a1 = alloc("a6", "172.26.64.2", ("2001:db8::1", 20000, 80), ip6="fd00:26::2")
    await fw.add_alloc(a1)
    assert elements(host_ns, "ports6") == {
        ("2001:db8::1", "tcp", 20000, "fd00:26::2", 80, "a6"),
        ("2001:db8::1", "udp", 20000, "fd00:26::2", 80, "a6"),
    }
    assert elements(host_ns) == set()
    assert await fw.owned_elements() == {"a6"}
    await fw.remove_alloc(a1)
    assert await fw.owned_elements() == set()


async def test_remove_alloc_removes_only_its_elements(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    a1 = alloc("a1", "172.26.64.2", (HOST_IP, 20000, 8080))
    a2 = alloc("a2", "172.26.64.3", (HOST_IP, 20001, 8080))
    await fw.add_alloc(a1)
    await fw.add_alloc(a2)
    assert await fw.owned_elements() == {"a1", "a2"}
    await fw.remove_alloc(a1)
    assert await fw.owned_elements() == {"a2"}
    assert {e[2] for e in elements(host_ns)} == {20001}
    await fw.remove_alloc(a1)  # again: missing is fine
    assert await fw.owned_elements() == {"a2"}


async def test_remove_of_missing_is_fine(host_ns: str) -> None:
    fw = firewall(host_ns)
    never = alloc("n1", "172.26.64.9", (HOST_IP, 20000, 80))
    await fw.remove_alloc(never)  # no table at all
    await fw.ensure_base()
    await fw.remove_alloc(never)  # table, no element
    # half there (a crash between two changes): what is there goes, no error
    sh(
        *nft_in(host_ns),
        "add element inet waypost ports "
        '{ 198.51.100.1 . tcp . 20000 comment "n1" : 172.26.64.9 . 80 }',
    )
    await fw.remove_alloc(never)
    assert elements(host_ns) == set()


async def test_remove_leaves_a_key_held_by_another_allocation(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    owner = alloc("own", "172.26.64.2", (HOST_IP, 20000, 8080))
    stale = alloc("stale", "172.26.64.3", (HOST_IP, 20000, 8080), (HOST_IP, 20005, 80))
    await fw.add_alloc(owner)
    sh(
        *nft_in(host_ns),
        "add element inet waypost ports "
        '{ 198.51.100.1 . tcp . 20005 comment "stale" : 172.26.64.3 . 80 }',
    )
    await fw.remove_alloc(stale)  # its 20000 belongs to "own" now: left alone
    assert await fw.owned_elements() == {"own"}
    assert len(elements(host_ns)) == 4


async def test_remove_alloc_by_id_when_state_is_lost(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    await fw.add_alloc(alloc("lost", "172.26.64.2", (HOST_IP, 20000, 8080)))
    await fw.add_alloc(alloc("kept", "172.26.64.3", (HOST_IP, 20001, 8080)))
    # reconcile knows only the ids it still has: the others' elements go
    assert await fw.remove_unclaimed({"kept"}) == {"lost"}
    assert await fw.owned_elements() == {"kept"}


async def test_remove_unclaimed(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    for i in range(5):
        await fw.add_alloc(alloc(f"u{i}", f"172.26.64.{i + 2}", (HOST_IP, 20000 + i, 80)))
    removed = await fw.remove_unclaimed({"u1", "u3"})
    assert removed == {"u0", "u2", "u4"}
    assert await fw.owned_elements() == {"u1", "u3"}
    assert await fw.remove_unclaimed({"u1", "u3"}) == set()


async def test_owned_elements_without_table(host_ns: str) -> None:
    assert await firewall(host_ns).owned_elements() == set()


async def test_concurrent_changes_do_not_collide(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    allocs = [alloc(f"c{i}", f"172.26.64.{i + 2}", (HOST_IP, 21000 + i, 80)) for i in range(20)]
    await asyncio.gather(*(fw.add_alloc(a) for a in allocs), fw.ensure_base())
    assert await fw.owned_elements() == {a.alloc_id for a in allocs}
    assert len(elements(host_ns)) == 80
    await asyncio.gather(*(fw.remove_alloc(a) for a in allocs[::2]))
    assert await fw.owned_elements() == {a.alloc_id for a in allocs[1::2]}


async def test_remove_all(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    await fw.add_alloc(alloc("a1", "172.26.64.2", (HOST_IP, 20000, 8080)))
    sh(*nft_in(host_ns), "add", "table", "inet", "someone_else")
    await fw.remove_all()
    tables = [
        i["table"]["name"] for i in nft_json(host_ns, "list", "tables")["nftables"] if "table" in i
    ]
    assert tables == ["someone_else"]
    await fw.remove_all()  # again: nothing there, no error
    assert await fw.owned_elements() == set()


# --- errors -----------------------------------------------------------------------------


async def test_bad_element_error_carries_op_object_and_stderr(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    with pytest.raises(KernelError) as info:
        await fw.add_alloc(alloc("bad", "172.26.64.2", (HOST_IP, 20000, 70000)))
    assert info.value.op == "add port forwards"
    assert "bad" in info.value.obj
    assert "out of range" in info.value.stderr
    assert "out of range" in str(info.value)
    assert await fw.owned_elements() == set()  # atomic: nothing of it is there


async def test_port_held_by_another_allocation_is_eexist(host_ns: str) -> None:
    fw = firewall(host_ns)
    await fw.ensure_base()
    await fw.add_alloc(alloc("a1", "172.26.64.2", (HOST_IP, 20000, 8080)))
    with pytest.raises(KernelError) as info:
        await fw.add_alloc(alloc("a2", "172.26.64.3", (HOST_IP, 20001, 80), (HOST_IP, 20000, 80)))
    assert info.value.errno == errno.EEXIST
    assert "File exists" in info.value.stderr
    assert await fw.owned_elements() == {"a1"}  # a2 got nothing, not even its free port


async def test_add_before_ensure_base_is_enoent(host_ns: str) -> None:
    with pytest.raises(KernelError) as info:
        await firewall(host_ns).add_alloc(alloc("a1", "172.26.64.2", (HOST_IP, 20000, 80)))
    assert info.value.errno == errno.ENOENT


async def test_names_that_cannot_go_into_a_script(host_ns: str) -> None:
    fw = firewall(host_ns)
    with pytest.raises(InvalidName):
        await fw.add_alloc(alloc('x" ; flush ruleset ; "', "172.26.64.2", (HOST_IP, 1, 1)))
    with pytest.raises(InvalidName):
        Firewall(NetConfig(nft_table="a b"))
    with pytest.raises(SpecError, match="no IPv6 address"):
        plan_elements(alloc("v6", "172.26.64.2", ("2001:db8::1", 20000, 80)))


async def test_nft_missing_is_tool_missing() -> None:
    fw = Firewall(NetConfig(), nft_command=("/nonexistent/nft",))
    with pytest.raises(ToolMissing):
        await fw.ensure_base()


# Run by a process without capabilities: the in-process context gets EPERM.
_WITHOUT_CAPS = """
import asyncio
from netsetup.errors import NotRoot
from netsetup.firewall import Firewall, NftLibrary
from netsetup.spec import NetConfig
fw = Firewall(NetConfig())
assert isinstance(fw._runner, NftLibrary)
try:
    asyncio.run(fw.ensure_base())
except NotRoot as exc:
    print("NotRoot:", exc)
"""


def test_not_root_is_notroot(host_ns: str) -> None:
    if _RUNNERS[host_ns][0] == "nft":
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "nft")
        fw = Firewall(NetConfig(), nft_command=("ip", "netns", "exec", host_ns, *nobody))
        with pytest.raises(NotRoot):
            asyncio.run(fw.ensure_base())
        return
    # uid 0 without capabilities (nobody cannot run the interpreter under /root)
    argv = ["ip", "netns", "exec", host_ns, "setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    done = subprocess.run(
        [*argv, sys.executable, "-c", _WITHOUT_CAPS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("NotRoot: ") and "nft ensure base" in done.stdout


@pytest.mark.parametrize("host_ns", ["lib"], indirect=True)
async def test_the_in_process_context_acts_in_its_namespace_only(host_ns: str) -> None:
    ours = sh("nft", "list", "tables").stdout  # the machine's own namespace: read only
    fw = firewall(host_ns)
    assert isinstance(fw._runner, NftLibrary)
    await fw.ensure_base()
    await fw.add_alloc(alloc("a1", "172.26.64.2", (HOST_IP, 20000, 8080)))
    assert len(elements(host_ns)) == 4
    assert sh("nft", "list", "tables").stdout == ours
    fw.close()
    with pytest.raises(KernelError, match="closed"):
        await fw.add_alloc(alloc("a2", "172.26.64.3", (HOST_IP, 20001, 8080)))


# --- a foreign FORWARD policy DROP ------------------------------------------------------


def forward_chain(ns: str) -> list[tuple[str, str]]:
    """(comment, verdict-ish text) of the rules in `ip filter FORWARD`."""
    text = sh(*nft_in(ns), "list", "chain", "ip", "filter", "FORWARD").stdout
    return [
        (line.split('comment "')[1].rstrip('"'), line)
        for line in text.splitlines()
        if "comment" in line
    ]


async def test_foreign_forward_drop_gets_our_accepts(host_ns: str) -> None:
    how = set_forward_drop(host_ns)
    sh(*nft_in(host_ns), 'add rule ip filter FORWARD tcp dport 25 drop comment "user\'s rule"')
    fw = firewall(host_ns)
    await fw.ensure_base()
    await fw.ensure_base()
    rules = forward_chain(host_ns)
    assert [c for c, _ in rules] == [
        "waypost: accept forwarding from bridge nomad",
        "waypost: accept forwarding to bridge nomad",
        "user's rule",
    ], how
    if how == "iptables-nft":
        listed = sh("ip", "netns", "exec", host_ns, "iptables-nft", "-S", "FORWARD").stdout
        assert '-A FORWARD -i nomad -m comment --comment "waypost: accept' in listed
        assert "-P FORWARD DROP" in listed
    # a renamed bridge replaces our rules instead of adding more
    await firewall(host_ns, NetConfig(bridge="wpbr1")).ensure_base()
    assert [c for c, _ in forward_chain(host_ns)][:2] == [
        "waypost: accept forwarding from bridge wpbr1",
        "waypost: accept forwarding to bridge wpbr1",
    ]
    assert len(forward_chain(host_ns)) == 3
    await fw.remove_all()
    assert [c for c, _ in forward_chain(host_ns)] == ["user's rule"]


async def test_no_foreign_chain_is_not_created(host_ns: str) -> None:
    await firewall(host_ns).ensure_base()
    tables = [
        i["table"]["name"] for i in nft_json(host_ns, "list", "tables")["nftables"] if "table" in i
    ]
    assert tables == ["waypost"]


def test_render_base_is_one_transaction_without_elements() -> None:
    script = render_base(NetConfig())
    assert "element" not in script
    assert script.count("flush chain") == 4


# --- cost per allocation ----------------------------------------------------------------

HELD = (10, 1000)  # allocations in the map while an allocation is added and removed
SAMPLES = 60  # timed add/remove pairs at each size, the two sizes taking turns


def held(table: str, count: int) -> str:
    """A script adding `count` allocations' elements to `table` (one transaction)."""
    allocs = [
        alloc(f"h{i}", f"172.26.{64 + i // 250}.{i % 250 + 2}", (HOST_IP, 20000 + i, 8080))
        for i in range(count)
    ]
    return render_add(table, [e for a in allocs for e in plan_elements(a)])


def count_elements(ns: str, table: str) -> int:
    doc = nft_json(ns, "list", "map", "inet", table, "ports")
    return sum(len(item.get("map", {}).get("elem", [])) for item in doc["nftables"])


async def test_element_changes_stay_flat(host_ns: str) -> None:
    """Adding and removing an allocation costs the same with 10 or 1000 held.

    The held elements go in with one script per table (not timed); two tables in the
    namespace hold 10 and 1000, and the timed changes alternate between them, so a
    change in the machine's load hits both sizes alike.
    """
    tables = {size: f"wpflat{size}" for size in HELD}
    walls = {size: firewall(host_ns, NetConfig(nft_table=t)) for size, t in tables.items()}
    for size, fw in walls.items():
        await fw.ensure_base()
        sh(*nft_in(host_ns), "-f", "-", stdin=held(tables[size], size))
    adds: dict[int, list[float]] = {size: [] for size in HELD}
    removes: dict[int, list[float]] = {size: [] for size in HELD}
    for i in range(SAMPLES):
        for size, fw in walls.items():
            one = alloc(f"t{i}", f"172.26.79.{i + 2}", (HOST_IP, 31000 + i, 8080))
            start = time.perf_counter()
            await fw.add_alloc(one)
            adds[size].append(time.perf_counter() - start)
            start = time.perf_counter()
            await fw.remove_alloc(one)
            removes[size].append(time.perf_counter() - start)
    for size in HELD:
        assert count_elements(host_ns, tables[size]) == 4 * size
    small, large = HELD
    for name, series in (("add", adds), ("remove", removes)):
        early, late = statistics.median(series[small]), statistics.median(series[large])
        print(
            f"{name}: median {early * 1000:.2f} ms ({small} held), {late * 1000:.2f} ms ({large})"
        )
        assert late < 2.0 * early, f"{name} cost grows: {early:.4f}s -> {late:.4f}s"
