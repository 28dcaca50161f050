"""A guard around every test outside tests/netns: the machine's own namespace stays as it was.

The hard rule (DESIGN.md, "Tests touch only what they create"): only tests/netns do
kernel work, and only inside namespaces they create.  CI runs as root, so a test that
started an agent with a bridge job, or an agent that reconciled persisted bridge
allocations, would build the `nomad` bridge, turn on forwarding and add the `waypost`
nft table in the namespace this process runs in.  This fixture reads that namespace
before and after each test and fails the test when anything waypost owns is there,
or when anything changed: links, forwarding sysctls, nft tables, and the named
namespaces (other than the run-prefixed ones of a root test run, which may be running
in parallel and which clean up after themselves).

It only reads (/sys, /proc, /var/run/netns and `nft list tables`), so it runs as any
user; without root, `nft` cannot list and that part is what `nft` said, compared
the same way.

Cost: `nft list tables` takes ~2 ms, and reading it before and after each of the
~1,550 unit tests cost 5.2 s of a 17.3 s `pytest tests/unit` (12.1 s without the
guard; `time .venv/bin/pytest -q tests/unit`, with and `--noconftest`).  So the nft
tables are read around every test outside tests/unit and every unit test of the
jobs (test_jobs*: they start a JobRunner), and around each other module of
tests/unit as a whole: a change there fails the module's last test, naming the
module.  Links, namespaces and sysctls (reads of /sys and /proc, microseconds)
are compared around every test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netsetup.links import is_owned_link_name
from netsetup.spec import NetConfig

TESTS = Path(__file__).resolve().parent
ROOT_TESTS = TESTS / "netns"  # they build their own namespaces; their conftest guards them
UNIT_TESTS = TESTS / "unit"  # pure: nft tables read per module, except for JOB_MODULES
JOB_MODULES = "test_jobs"  # unit modules that start a JobRunner: nft tables read per test
DEFAULTS = NetConfig()
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
)
# The run prefixes of root tests ("wpt" + 4 or 6 hex, tests/netns): maybe a parallel run.
ROOT_RUN_NAMESPACE = re.compile(r"^wpt[0-9a-f]{4}(?:[0-9a-f]{2})?-")
NFT_TIMEOUT = 10.0


@dataclass(frozen=True)
class HostNamespace:
    """What a test could change in the machine's own network namespace."""

    links: frozenset[str]
    namespaces: frozenset[str]
    sysctls: tuple[tuple[str, str], ...]
    nft_tables: str | None  # None: not read this time (see the module docstring)

    def owned(self) -> list[str]:
        """The objects of waypost's default names that are present."""
        found = [f"link {n}" for n in sorted(self.links) if _ours(n)]
        return found + nft_owned(self.nft_tables)


def nft_owned(tables: str | None) -> list[str]:
    if tables is not None and re.search(rf"\btable \w+ {DEFAULTS.nft_table}\b", tables):
        return [f"nft table {DEFAULTS.nft_table}"]
    return []


def _ours(link: str) -> bool:
    return link == DEFAULTS.bridge or is_owned_link_name(DEFAULTS.veth_prefix, link)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:  # absent (br_netfilter not loaded): that is a state too
        return f"<{exc.strerror}>"


def _nft_tables() -> str:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        return "<no nft>"
    done = subprocess.run(
        [nft, "list", "tables"], capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
    )
    return done.stdout if done.returncode == 0 else f"<nft: {done.stderr.strip()}>"


def read_host_namespace(*, nft: bool = True) -> HostNamespace:
    netns = Path(DEFAULTS.netns_dir)
    names = os.listdir(netns) if netns.is_dir() else []
    return HostNamespace(
        links=frozenset(os.listdir("/sys/class/net")),
        namespaces=frozenset(n for n in names if not ROOT_RUN_NAMESPACE.match(n)),
        sysctls=tuple((k, _read(Path("/proc/sys") / k)) for k in SYSCTLS),
        nft_tables=_nft_tables() if nft else None,
    )


def describe_change(before: HostNamespace, after: HostNamespace) -> list[str]:
    """What differs between two readings, one line per difference."""
    changes = [f"link {n} appeared" for n in sorted(after.links - before.links)]
    changes += [f"link {n} disappeared" for n in sorted(before.links - after.links)]
    changes += [f"namespace {n} appeared" for n in sorted(after.namespaces - before.namespaces)]
    changes += [f"namespace {n} vanished" for n in sorted(before.namespaces - after.namespaces)]
    changes += [
        f"sysctl {k}: {was} -> {now}"
        for (k, was), (_, now) in zip(before.sysctls, after.sysctls, strict=True)
        if was != now
    ]
    changes += describe_nft_change(before.nft_tables, after.nft_tables)
    return changes


def describe_nft_change(before: str | None, after: str | None) -> list[str]:
    if before is None or after is None or before == after:
        return []
    return [f"nft tables: {before!r} -> {after!r}"]


def nft_per_test(path: Path) -> bool:
    """Whether the test in `path` gets the nft tables read around it (else its module does)."""
    return UNIT_TESTS not in path.parents or path.name.startswith(JOB_MODULES)


@pytest.fixture(scope="module", autouse=True)
def _nft_tables_untouched_by_module(request: pytest.FixtureRequest) -> Iterator[None]:
    path = Path(request.node.path)
    if ROOT_TESTS in path.parents or nft_per_test(path):
        yield
        return
    before = _nft_tables()
    owned = nft_owned(before)
    assert not owned, f"waypost's objects are in this machine's namespace before {path}: {owned}"
    yield
    after = _nft_tables()
    changed = describe_nft_change(before, after) + nft_owned(after)
    assert not changed, f"a test of {path.name} changed this machine's nft tables: {changed}"


@pytest.fixture(autouse=True)
def _host_namespace_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    path = Path(request.node.path)
    if ROOT_TESTS in path.parents:
        yield
        return
    nft = nft_per_test(path)
    before = read_host_namespace(nft=nft)
    owned = before.owned()
    assert not owned, f"waypost's objects are in this machine's namespace before the test: {owned}"
    yield
    after = read_host_namespace(nft=nft)
    changed = describe_change(before, after) + after.owned()
    assert not changed, f"the test changed this machine's network namespace: {changed}"
