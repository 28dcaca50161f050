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
    nft_tables: str

    def owned(self) -> list[str]:
        """The objects of waypost's default names that are present."""
        found = [f"link {n}" for n in sorted(self.links) if _ours(n)]
        if re.search(rf"\btable \w+ {DEFAULTS.nft_table}\b", self.nft_tables):
            found.append(f"nft table {DEFAULTS.nft_table}")
        return found


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


def read_host_namespace() -> HostNamespace:
    netns = Path(DEFAULTS.netns_dir)
    names = os.listdir(netns) if netns.is_dir() else []
    return HostNamespace(
        links=frozenset(os.listdir("/sys/class/net")),
        namespaces=frozenset(n for n in names if not ROOT_RUN_NAMESPACE.match(n)),
        sysctls=tuple((k, _read(Path("/proc/sys") / k)) for k in SYSCTLS),
        nft_tables=_nft_tables(),
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
    if before.nft_tables != after.nft_tables:
        changes.append(f"nft tables: {before.nft_tables!r} -> {after.nft_tables!r}")
    return changes


@pytest.fixture(autouse=True)
def _host_namespace_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    if ROOT_TESTS in Path(request.node.path).parents:
        yield
        return
    before = read_host_namespace()
    owned = before.owned()
    assert not owned, f"waypost's objects are in this machine's namespace before the test: {owned}"
    yield
    after = read_host_namespace()
    changed = describe_change(before, after) + after.owned()
    assert not changed, f"the test changed this machine's network namespace: {changed}"
