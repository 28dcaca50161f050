"""The layering rules of STYLE.md and DESIGN.md, checked on the import graph.

- one module per third-party library: each library is imported by exactly the
  adapter module listed here, nowhere else in the packages;
- `netsetup` never imports `discovery`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("discovery", "netsetup")

# library -> the only modules (paths relative to the repository) allowed to import it
ADAPTERS: dict[str, set[str]] = {
    "aiohttp": {"discovery/httpapi.py"},
    "consul": {"discovery/mirror.py"},  # py-consul's asyncio client
    "dnslib": {"discovery/dns/codec.py"},
    "hcl2": {"discovery/hclfile.py"},
    "lark": {"discovery/hclfile.py"},
    "immutables": {"discovery/registry.py"},  # hcl2's parser: its syntax errors carry the line
    "prometheus_client": {"discovery/metrics.py"},
    "pyroute2": {"netsetup/links.py"},  # hostaddr and network reach netlink through links
    "regex": {"discovery/filter.py"},  # `matches` in filters: a regex search with a timeout
    "sqlite3": {"discovery/store.py", "netsetup/state.py"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_there_are_modules_to_check() -> None:
    assert len(_modules()) > 5


@pytest.mark.parametrize("library", sorted(ADAPTERS))
def test_library_is_imported_by_its_adapter_only(library: str) -> None:
    importers = {str(p.relative_to(ROOT)) for p in _modules() if library in _imports(p)}
    assert importers <= ADAPTERS[library], f"{library} imported outside its adapter"
    assert importers, f"{library}'s adapter no longer imports it: update ADAPTERS"


def test_netsetup_never_imports_discovery() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "netsetup").rglob("*.py")
        if "discovery" in _imports(p)
    ]
    assert offenders == []
