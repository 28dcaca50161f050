"""A cgroup v2 per task with its memory limit, where the host has one.  Adapter.

Where /sys/fs/cgroup is cgroup v2 with the memory controller and the agent is
root, each task runs in `<root>/waypost.slice/<alloc id>.<task>.scope` with
`memory.max` set to its `memory_max` (or `memory`) MB, as Nomad's cgroup v2
isolation does (its `nomad.slice`).  The process is moved in right after it is
started (Python cannot clone into a cgroup); a stop kills the whole cgroup
(`cgroup.kill`) and removes it.  Elsewhere (cgroup v1, no memory controller, not
root) :func:`unavailable` says why and the limits are only in the environment.

Error handling: OSError from the cgroup files, for the caller to log; a task
is never refused because its cgroup could not be made.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SLICE = "waypost.slice"
KILL_WAIT = 2.0  # seconds for a killed cgroup to empty before it is removed


def unavailable(root: Path = ROOT) -> str:
    """ "" when task cgroups can be used here, else the reason they cannot."""
    controllers = root / "cgroup.controllers"
    if not controllers.exists():
        return f"{root} is not cgroup v2"
    if "memory" not in controllers.read_text().split():
        return f"{root} has no memory controller"
    if os.geteuid() != 0:
        return "the agent is not root"
    return ""


def scope_path(alloc_id: str, task: str, root: Path = ROOT) -> Path:
    return root / SLICE / f"{alloc_id}.{task}.scope"


def _enable_memory(directory: Path) -> None:
    control = directory / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory")


def create(alloc_id: str, task: str, memory_mb: int, root: Path = ROOT) -> Path:
    """The task's cgroup with memory.max set (made, or reused after a restart)."""
    _enable_memory(root)
    parent = root / SLICE
    parent.mkdir(exist_ok=True)
    _enable_memory(parent)
    path = scope_path(alloc_id, task, root)
    path.mkdir(exist_ok=True)
    (path / "memory.max").write_text(str(memory_mb << 20))
    return path


def add(path: Path, pid: int) -> None:
    (path / "cgroup.procs").write_text(str(pid))


def remove(path: Path) -> None:
    """Kill what is left in the cgroup and remove it."""
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if not (path / "cgroup.procs").read_text().strip():
                break
        time.sleep(0.01)
    with contextlib.suppress(OSError):
        path.rmdir()
