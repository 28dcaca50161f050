"""Setup, teardown and reconcile of allocations over their whole life.  Root.

All or nothing: a failure at each step of a setup (a real failing operation: a name
clash, a route the kernel refuses, an nft table that does not exist, a state write
for an unknown row) leaves nothing behind.  Teardown after the namespace vanished,
teardown that meets a failure and goes on.  Reconcile after a SIGKILL in the middle
of a setup, a simulated reboot, and twenty concurrent setups and teardowns.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netsetup import cli
from netsetup.firewall import Element, plan_elements, render_add, render_delete
from netsetup.links import veth_name
from netsetup.spec import parse_result
from tests.netns.conftest import (
    NETNS_DIR,
    ROOT,
    Driver,
    DriverError,
    EchoServer,
    Topology,
    ip_json,
    is_namespace,
    namespaces,
    nft,
    nft_elements,
    ns_socket,
    owned_links,
    run,
    tcp_ask,
    udp_ask,
)

pytestmark = pytest.mark.root

StartDriver = Callable[..., Driver]
PORTS = [{"label": "http", "to": 8080}, {"label": "dns", "static": 8053, "to": 53}]


def link_index(ns: str, name: str) -> int:
    [link] = ip_json(ns, "link", "show", name)
    return int(link["ifindex"])


def assert_nothing_of(topology: Topology, driver: Driver, alloc: str) -> None:
    """No trace of `alloc`: state, namespace, veth, nft elements."""
    assert driver.call("settle") == []
    assert driver.call("get", alloc=alloc) is None
    assert all(a["alloc_id"] != alloc for a in driver.call("list"))
    assert namespaces(alloc) == []
    assert veth_name("wp", alloc) not in owned_links(topology.host)
    assert [e for e in nft_elements(topology.host) if alloc in json.dumps(e)] == []


def assert_forwarding(topology: Topology, result: dict[str, Any]) -> None:
    """The allocation answers on its forwarded port from the external namespace."""
    alloc, mapping = result["alloc_id"], result["ports"][0]
    with EchoServer(alloc, "0.0.0.0", mapping["alloc_port"], name=alloc):
        port = mapping["host_port"]
        assert (
            tcp_ask(topology.external, topology.host_ip, port) == f"{alloc} {topology.external_ip}"
        )
        assert (
            udp_ask(topology.external, topology.host_ip, port) == f"{alloc} {topology.external_ip}"
        )


# --- all or nothing ----------------------------------------------------------------------------


def test_namespace_clash_rolls_back_and_leaves_the_other_namespace_alone(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    run("ip", "netns", "add", alloc)  # somebody else's namespace with that name
    with pytest.raises(DriverError) as failed:
        driver.setup(alloc, ports=PORTS)
    assert failed.value.type == "KernelError" and failed.value.errno == 17  # EEXIST
    assert failed.value.notes == []  # every undo worked
    assert namespaces(alloc) == [alloc] and is_namespace(alloc)
    assert driver.call("get", alloc=alloc) is None and owned_links(topology.host) == []
    assert nft_elements(topology.host) == []
    # the static port was given back
    assert driver.setup(topology.alloc_id(), ports=PORTS)["ports"][1]["host_port"] == 8053


def test_veth_clash_rolls_back_and_leaves_the_other_link_alone(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    clash = veth_name("wp", alloc)
    run("ip", "-n", topology.host, "link", "add", clash, "type", "bridge")  # not ours
    with pytest.raises(DriverError) as failed:
        driver.setup(alloc, ports=PORTS)
    assert failed.value.errno == 17 and failed.value.notes == []
    assert_nothing_of(topology, driver, alloc)
    assert (
        ip_json(topology.host, "-d", "link", "show", clash)[0]["linkinfo"]["info_kind"] == "bridge"
    )
    assert driver.setup(topology.alloc_id(), ports=PORTS)["ports"][1]["host_port"] == 8053


@pytest.mark.parametrize(
    ("step", "error"),
    [
        ("configure_inside", "KernelError"),  # default route via an off-subnet gateway
        ("add_alloc", "KernelError"),  # after the real elements: a table that is not there
        ("complete", "KeyError"),  # the state write fails after everything was built
    ],
)
def test_failure_at_a_step_undoes_every_earlier_one(
    topology: Topology, driver: Driver, step: str, error: str
) -> None:
    keep = driver.setup(topology.alloc_id(), ports=[{"label": "k"}])
    alloc = topology.alloc_id()
    driver.call("fault", step=step, action="fail", alloc=alloc)
    with pytest.raises(DriverError) as failed:
        driver.setup(alloc, ports=PORTS)
    assert failed.value.type == error and failed.value.notes == []
    assert_nothing_of(topology, driver, alloc)
    # the other allocation is untouched and the ports came back
    assert driver.call("list") == [keep]
    assert len(nft_elements(topology.host)) == 4
    assert driver.setup(topology.alloc_id(), ports=PORTS)["ports"][1]["host_port"] == 8053


@pytest.mark.parametrize("step", ["create_namespace", "create_veth", "add_alloc", "complete"])
def test_a_cancelled_setup_finishes_its_step_then_leaves_nothing(
    topology: Topology, driver: Driver, step: str
) -> None:
    alloc = topology.alloc_id()
    driver.call("fault", step=step, action="slow", alloc=alloc)
    spec = {"mode": "bridge", "ports": PORTS}
    assert driver.call("cancelled_setup", alloc=alloc, spec=spec) is True
    assert_nothing_of(topology, driver, alloc)
    assert driver.setup(topology.alloc_id(), ports=PORTS)["ports"][1]["host_port"] == 8053


def test_exhausted_subnet_and_ports_fail_with_nothing_held(
    topology: Topology, start_driver: StartDriver
) -> None:
    config = {"subnet": "172.26.64.0/29", "min_dynamic_port": 21000, "max_dynamic_port": 21001}
    driver = start_driver(topology, config=config)
    made = [driver.setup(topology.alloc_id()) for _ in range(5)]  # .2-.6: .1 is the gateway
    with pytest.raises(DriverError) as no_ip:
        driver.setup(topology.alloc_id())
    assert no_ip.value.type == "SubnetExhausted"
    driver.call("teardown", alloc=made[0]["alloc_id"])
    with pytest.raises(DriverError) as no_port:
        driver.setup(topology.alloc_id(), ports=[{"label": "a"}, {"label": "b"}, {"label": "c"}])
    assert no_port.value.type == "PortsExhausted"
    assert "dynamic port selection failed" in str(no_port.value)
    both = driver.setup(topology.alloc_id(), ports=[{"label": "a"}, {"label": "b"}])
    assert sorted(p["host_port"] for p in both["ports"]) == [21000, 21001]
    assert len(namespaces(topology.prefix + "-")) == 5


# --- teardown ------------------------------------------------------------------------------------


def test_teardown_after_the_namespace_was_deleted_behind_our_back(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    driver.setup(alloc, ports=PORTS)
    run("ip", "netns", "del", alloc)
    assert driver.call("teardown", alloc=alloc) is True
    assert_nothing_of(topology, driver, alloc)
    assert driver.call("teardown", alloc=alloc) is False  # again: nothing to do, no error


def test_teardown_detaches_at_once_and_the_same_id_can_come_back(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    driver.setup(alloc, ports=PORTS)
    assert driver.call("teardown", alloc=alloc) is True
    for link in ip_json(topology.host, "-d", "link", "show"):
        if link["ifname"] == veth_name("wp", alloc):  # its deletion may still be under way
            assert "UP" not in link["flags"]  # a disabled bridge port: no traffic
    again = driver.setup(alloc, ports=PORTS)  # waits for the old veth to be gone
    assert_forwarding(topology, again)


def test_a_process_left_in_a_torn_down_namespace_reaches_nothing(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    driver.setup(alloc)
    with (
        EchoServer(topology.host, "172.26.64.1", name="gw") as server,
        ns_socket(alloc, socket.SOCK_DGRAM) as held,  # keeps the namespace alive
    ):
        held.settimeout(1.0)
        held.sendto(b"before", ("172.26.64.1", server.port))
        assert held.recv(100).startswith(b"gw ")
        assert driver.call("teardown", alloc=alloc) is True
        with pytest.raises(OSError):  # unreachable (eth0 lost its peer), or no answer
            held.sendto(b"after", ("172.26.64.1", server.port))
            held.recv(100)
    assert driver.call("settle") == [] and owned_links(topology.host) == []


def test_teardown_goes_on_past_a_failure_and_reports_it(topology: Topology, driver: Driver) -> None:
    alloc = topology.alloc_id()
    driver.setup(alloc, ports=PORTS)
    path = NETNS_DIR / alloc
    run("umount", str(path))
    path.unlink()
    path.mkdir()
    (path / "occupied").write_text("a directory unlink() refuses\n")
    with pytest.raises(DriverError) as failed:
        driver.call("teardown", alloc=alloc)
    assert failed.value.type == "TeardownError" and "delete namespace" in str(failed.value)
    # the other steps ran: forwards, veth and reservation are gone
    assert driver.call("settle") == []
    assert driver.call("get", alloc=alloc) is None
    assert owned_links(topology.host) == [] and nft_elements(topology.host) == []
    assert driver.setup(topology.alloc_id(), ports=PORTS)["ports"][1]["host_port"] == 8053


def test_teardown_of_an_unknown_allocation_touches_nothing_foreign(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    run("ip", "netns", "add", alloc)  # not ours: no state row, no veth of ours
    assert driver.call("teardown", alloc=alloc) is False
    assert namespaces(alloc) == [alloc]


# --- reconcile ------------------------------------------------------------------------------------


def delete_forwards(topology: Topology, result: dict[str, Any]) -> None:
    """Delete the nft elements of one allocation behind netsetup's back."""
    nft(topology.host, render_delete("waypost", plan_elements(parse_result(result))))


def add_ghost_forward(topology: Topology) -> None:
    """An element in waypost's map that no allocation claims."""
    ghost = Element("ip", topology.host_ip, "tcp", 31999, "172.26.64.250", 80, "ghost")
    nft(topology.host, render_add("waypost", [ghost]))


def test_reconcile_after_a_crash_adopts_repairs_rolls_back_and_removes(
    topology: Topology, start_driver: StartDriver
) -> None:
    first = start_driver(topology)
    made = {tag: first.setup(topology.alloc_id(tag), ports=[{"label": "p"}]) for tag in "abcd"}
    host_mode = first.setup(topology.alloc_id("h"), mode="host", ports=[{"label": "p"}])
    a, b, c, d = (made[t]["alloc_id"] for t in "abcd")
    index_a = link_index(topology.host, veth_name("wp", a))
    # break b (veth gone), c (namespace gone), d (forwards gone); leave orphans around
    run("ip", "-n", topology.host, "link", "del", veth_name("wp", b))
    run("ip", "netns", "del", c)
    delete_forwards(topology, made["d"])
    ghost_link = veth_name("wp", "ghost")
    run("ip", "-n", topology.host, "link", "add", ghost_link, "type", "veth", "peer", "gp0")
    add_ghost_forward(topology)
    # crash in the middle of a setup: namespace, veth and inside done, forwards not yet
    crashed = topology.alloc_id("x")
    first.call("fault", step="add_alloc", action="pause", alloc=crashed)
    first.send("setup", alloc=crashed, spec={"mode": "bridge", "ports": [{"label": "p"}]})
    first.wait_event("paused")
    first.kill()
    assert namespaces(crashed) == [crashed]

    second = start_driver(topology)
    report = second.call("reconcile")
    assert sorted(report["adopted"]) == sorted([a, host_mode["alloc_id"]])
    assert sorted(report["repaired"]) == sorted([b, c, d])
    assert report["rolled_back"] == [crashed]
    assert report["removed_links"] == [ghost_link]
    assert report["removed_forwards"] == ["ghost"]
    assert report["failed"] == []
    assert link_index(topology.host, veth_name("wp", a)) == index_a  # untouched
    assert namespaces(crashed) == [] and owned_links(topology.host) == sorted(
        veth_name("wp", x) for x in (a, b, c, d)
    )
    for tag in "abcd":
        assert_forwarding(topology, made[tag])
    assert second.call("list") == [*made.values(), host_mode]
    # a second reconcile finds everything right
    again = second.call("reconcile")
    assert sorted(again["adopted"]) == sorted([a, b, c, d, host_mode["alloc_id"]])
    assert again["repaired"] == again["rolled_back"] == again["removed_links"] == []


def test_reconcile_repairs_hairpin_and_inside_config(topology: Topology, driver: Driver) -> None:
    hairpin = driver.setup(topology.alloc_id())["alloc_id"]
    inside = driver.setup(topology.alloc_id())["alloc_id"]
    veth = veth_name("wp", hairpin)
    run("ip", "-n", topology.host, "link", "set", veth, "type", "bridge_slave", "hairpin", "off")
    run("ip", "-n", inside, "route", "del", "default")
    index = link_index(topology.host, veth)
    report = driver.call("reconcile")
    assert sorted(report["repaired"]) == sorted([hairpin, inside])
    assert link_index(topology.host, veth) == index  # set in place, not recreated
    hairpin_mode = run(
        "ip", "netns", "exec", topology.host, "cat", f"/sys/class/net/{veth}/brport/hairpin_mode"
    )
    assert hairpin_mode.strip() == "1"
    assert ip_json(inside, "route", "show", "default")[0]["gateway"] == "172.26.64.1"


def test_reboot_keeps_every_reservation_and_gives_no_collision(
    topology: Topology, start_driver: StartDriver
) -> None:
    before = start_driver(topology)
    old = [before.setup(topology.alloc_id("o"), ports=[{"label": "p"}]) for _ in range(5)]
    old.append(before.setup(topology.alloc_id("s"), ports=[{"label": "s", "static": 8053}]))
    before.stop()
    topology.reboot()  # namespaces, bridge, veths and nft table gone; the state file kept

    after = start_driver(topology)
    report = after.call("reconcile")
    assert sorted(report["repaired"]) == sorted(r["alloc_id"] for r in old)
    assert report["failed"] == []
    new = [after.setup(topology.alloc_id("n"), ports=[{"label": "p"}]) for _ in range(5)]
    with pytest.raises(DriverError, match="8053"):
        after.setup(topology.alloc_id("n"), ports=[{"label": "s", "static": 8053}])
    everything = old + new
    ips = [r["alloc_ip"] for r in everything]
    ports = [p["host_port"] for r in everything for p in r["ports"]]
    assert len(set(ips)) == len(ips) and len(set(ports)) == len(ports)
    assert after.call("list") == everything
    assert_forwarding(topology, old[0])
    assert_forwarding(topology, new[0])


# --- concurrency -------------------------------------------------------------------------------


def test_twenty_concurrent_setups_and_teardowns_never_collide(
    topology: Topology, driver: Driver
) -> None:
    keep = [driver.setup(topology.alloc_id("k"), ports=[{"label": "p"}]) for _ in range(10)]
    allocs = [topology.alloc_id("c") for _ in range(20)]
    pending = [
        driver.send("setup", alloc=a, spec={"mode": "bridge", "ports": PORTS[:1]}) for a in allocs
    ]
    pending += [driver.send("teardown", alloc=r["alloc_id"]) for r in keep]
    answers = [driver.wait(i) for i in pending]
    results = answers[:20]
    assert answers[20:] == [True] * 10
    ips = {r["alloc_ip"] for r in results}
    ports = {r["ports"][0]["host_port"] for r in results}
    assert len(ips) == 20 and len(ports) == 20
    assert namespaces(topology.prefix + "-c") == sorted(allocs)
    assert driver.call("settle") == []  # the torn-down veths are deleted in the background
    assert owned_links(topology.host) == sorted(veth_name("wp", a) for a in allocs)
    assert len(nft_elements(topology.host)) == 20 * 4
    assert_forwarding(topology, results[7])

    gone = [driver.wait(i) for i in [driver.send("teardown", alloc=a) for a in allocs]]
    assert gone == [True] * 20
    assert driver.call("settle") == []
    assert namespaces(topology.prefix + "-") == [] and owned_links(topology.host) == []
    assert nft_elements(topology.host) == [] and driver.call("list") == []


# --- the operator CLI (waypost net) ---------------------------------------------------------------


def waypost_net(topology: Topology, *argv: str) -> tuple[int, str, str]:
    """`waypost net <argv>` inside the host namespace: exit code, stdout, stderr."""
    command = [sys.executable, "-m", "tests.netns.driver"]
    command += ["--netns", str(NETNS_DIR / topology.host), "--cli", *argv]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    return done.returncode, done.stdout, done.stderr


def test_cli_up_list_down_share_the_agents_state(
    topology: Topology, start_driver: StartDriver, tmp_path: Path
) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    alloc = topology.alloc_id("cli")
    code, out, err = waypost_net(
        topology, "up", "--alloc", alloc, "--port", "http::80", "--port", "dns:8053:53", *data
    )
    assert code == 0, err
    made = json.loads(out)
    assert [(p["label"], p["alloc_port"]) for p in made["ports"]] == [("http", 80), ("dns", 53)]
    assert made["ports"][1]["host_port"] == 8053
    assert made["env"]["NOMAD_HOST_PORT_dns"] == "8053" and made["env"]["NOMAD_PORT_dns"] == "53"
    assert made["env"]["NOMAD_ALLOC_IP_http"] == made["alloc_ip"]
    assert_forwarding(topology, made)

    agent = start_driver(topology)  # the agent sees it, and reconcile leaves it alone
    assert [a["alloc_id"] for a in agent.call("list")] == [alloc]
    assert agent.call("reconcile")["adopted"] == [alloc]
    agent.stop()
    code, out, _ = waypost_net(topology, "list", *data)
    assert code == 0 and [a["alloc_id"] for a in json.loads(out)] == [alloc]
    code, out, _ = waypost_net(topology, "reconcile", *data)
    assert code == 0 and json.loads(out)["adopted"] == [alloc]
    code, out, _ = waypost_net(topology, "down", "--alloc", alloc, *data)
    assert code == 0 and json.loads(out) == {"alloc_id": alloc, "known": True}
    assert namespaces(alloc) == [] and owned_links(topology.host) == []
    assert nft_elements(topology.host) == []


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["up", "--alloc", "x", "--port", "a:b"], 2, "not a port number"),
        (["up", "--alloc", "x", "--port", "a:1:2:3"], 2, "LABEL[:STATIC][:TO]"),
        (["up", "--alloc", "a/b"], 2, "invalid namespace name"),
        (["up", "--alloc", "x", "--mode", "nat"], 2, "invalid choice"),
        (["down"], 2, "--alloc"),
    ],
)
def test_cli_usage_errors_change_nothing(
    topology: Topology, tmp_path: Path, argv: list[str], code: int, message: str
) -> None:
    returned, out, err = waypost_net(topology, *argv, "--data-dir", str(tmp_path / "d"))
    assert (returned, out) == (code, "") and message in err
    assert owned_links(topology.host) == [] and namespaces(topology.prefix + "-") == []


def test_cli_config_file_and_its_errors(topology: Topology, tmp_path: Path) -> None:
    config = tmp_path / "net.json"
    config.write_text(json.dumps({"bridge": "wpbr0", "subnet": "10.99.0.0/24"}))
    data = ["--data-dir", str(tmp_path / "d"), "--config", str(config)]
    code, out, err = waypost_net(topology, "up", "--alloc", topology.alloc_id(), *data)
    assert code == 0, err
    assert json.loads(out)["bridge"] == "wpbr0" and json.loads(out)["alloc_ip"] == "10.99.0.2"
    config.write_text(json.dumps({"bridge": "wpbr0", "subnet": "10.99.0.0/24", "nope": 1}))
    code, _, err = waypost_net(topology, "list", *data)
    assert code == 2 and "nope: unknown NetConfig field" in err


def test_cli_needs_root_for_kernel_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # as another uid (the interpreter under /root is not runnable by nobody here)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 65534)
    for verb in (["down", "--alloc", "x"], ["reconcile"], ["up", "--alloc", "x"]):
        assert cli.main([*verb, "--data-dir", str(tmp_path / "d")]) == 3
        out, err = capsys.readouterr()
        assert out == "" and "needs root" in err
    assert not (tmp_path / "d").exists()  # refused before the state was opened
