"""The guard of tests/conftest.py: what it calls a change of the machine's namespace.

It runs around every test outside tests/netns; these are its readings compared
by hand, so that a guard that could never fire would fail here.
"""

from __future__ import annotations

from dataclasses import replace

from tests.conftest import (
    ROOT_RUN_NAMESPACE,
    TESTS,
    HostNamespace,
    describe_change,
    nft_per_test,
    read_host_namespace,
)

CLEAN = HostNamespace(
    links=frozenset({"lo", "eth0"}),
    namespaces=frozenset(),
    sysctls=(("net/ipv4/ip_forward", "0"), ("net/ipv6/conf/all/forwarding", "0")),
    nft_tables="table inet filter\n",
)


def test_a_clean_reading_has_nothing_of_waypost_and_no_change() -> None:
    assert CLEAN.owned() == [] and describe_change(CLEAN, CLEAN) == []


def test_waypost_objects_are_found_by_their_default_names() -> None:
    dirty = replace(
        CLEAN,
        links=CLEAN.links | {"nomad", "wp0123456789abc", "wpnot-a-veth"},
        nft_tables="table inet filter\ntable inet waypost\n",
    )
    assert dirty.owned() == ["link nomad", "link wp0123456789abc", "nft table waypost"]


def test_every_kind_of_change_is_named() -> None:
    after = replace(
        CLEAN,
        links=frozenset({"lo", "nomad"}),
        namespaces=frozenset({"0b7e2a4c-1d1e-4c1e-9a51-6f0e3c2d1b00"}),
        sysctls=(("net/ipv4/ip_forward", "1"), ("net/ipv6/conf/all/forwarding", "0")),
        nft_tables="",
    )
    assert describe_change(CLEAN, after) == [
        "link nomad appeared",
        "link eth0 disappeared",
        "namespace 0b7e2a4c-1d1e-4c1e-9a51-6f0e3c2d1b00 appeared",
        "sysctl net/ipv4/ip_forward: 0 -> 1",
        "nft tables: 'table inet filter\\n' -> ''",
    ]


def test_only_the_namespaces_of_a_root_test_run_are_left_out() -> None:
    assert ROOT_RUN_NAMESPACE.match("wpt1a2b-3h") and ROOT_RUN_NAMESPACE.match("wptbabfe4-s5-a")
    assert not ROOT_RUN_NAMESPACE.match("0b7e2a4c-1d1e-4c1e-9a51-6f0e3c2d1b00")
    assert not ROOT_RUN_NAMESPACE.match("wpt-web")


def test_two_readings_of_an_untouched_namespace_agree() -> None:
    assert describe_change(read_host_namespace(), read_host_namespace()) == []


def test_nft_tables_are_read_per_test_outside_the_pure_unit_modules() -> None:
    assert nft_per_test(TESTS / "integration" / "test_jobs_agent.py")
    assert nft_per_test(TESTS / "integration" / "test_http_api.py")
    assert nft_per_test(TESTS / "unit" / "test_jobs_runner.py")
    assert not nft_per_test(TESTS / "unit" / "test_dns_answer.py")  # read per module


def test_a_reading_without_nft_compares_the_rest() -> None:
    unread = replace(CLEAN, nft_tables=None)
    assert unread.owned() == [] and describe_change(CLEAN, unread) == []
    after = replace(unread, sysctls=(("net/ipv4/ip_forward", "1"), *CLEAN.sysctls[1:]))
    assert describe_change(unread, after) == ["sysctl net/ipv4/ip_forward: 0 -> 1"]
    assert read_host_namespace(nft=False).nft_tables is None
