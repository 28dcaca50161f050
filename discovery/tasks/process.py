"""Starting, watching, signalling and finding task processes.  Adapter: the only module that spawns.

:func:`spawn` starts one task process: in its own session and process group
(`start_new_session`: a Ctrl-C on the agent's terminal does not reach it), with
no file descriptor of the agent's (`close_fds`), stdin on /dev/null, stdout and
stderr on the descriptors given (the task's log pipes), its working directory,
its environment, and, when the agent is root and a user is given, that user's
uid, gid and groups.  In bridge mode the process is forked from a thread that
has joined the allocation's network namespace (:func:`netsetup.netns.in_namespace`),
so it starts inside it; nothing else of the agent moves.

A bridge task also gets a mount namespace of its own in which the allocation's
resolv.conf is bind-mounted over /etc/resolv.conf, as `ip netns exec` does with
/etc/netns/<name>/resolv.conf.  The same thread does it before the fork
(:func:`netsetup.netns.private_binds`: unshare(CLONE_NEWNS | CLONE_FS), `/`
made a recursive slave, the bind), so the child inherits it and
nothing runs between fork and exec: no `preexec_fn` (unsafe with threads, and
it would run after Popen's setuid, when the task's user may no longer mount),
no wrapper process (exec failures stay OSErrors of the spawn, the task's pid is
the one forked).  The thread ends with the spawn, taking the namespace with it.
The file is `Launch.resolv_conf` ("" for none): the allocation runner passes
`<alloc dir>/alloc/resolv.conf` when it wrote one (discovery.tasks.resolvconf).  Nomad
writes it in the task dir; here the task's user owns that directory and could
swap the file for a symlink between the check and the mount, so it lives in
the allocation's shared directory, which only the agent may change
(:func:`check_resolv_conf`).  Host-mode
tasks keep the host's mounts and resolver.

A :class:`Process` is watched through a pidfd (pidfd_open(2)), readable once the
process has exited, with the loop's add_reader (asyncio and uvloop alike); the
agent's own children are reaped with waitid(P_PIDFD), so the exit code and
signal are exact and no other part of the process can reap them first (the
`subprocess.Popen` object is released at once: its own reaping would race ours).

A process is identified by :class:`~discovery.tasks.state.ProcessRef`: its pid,
its start time in clock ticks since boot (/proc/<pid>/stat field 22) and the boot
id, so :func:`adopt` (an agent restarted while its tasks ran) never takes a
recycled pid for the task.  An adopted process is not the agent's child: its
exit is seen, its exit status cannot be (`ExitStatus.known` is False).

Every task process carries NOMAD_ALLOC_ID and NOMAD_TASK_NAME in its
environment, and so do its descendants: :func:`find_marked` lists them from
/proc (a crash between a spawn and its record, descendants that left the
process group), which is how a stop leaves no process behind.

Error handling: a spawn that fails (no such command, permission, a resolv.conf
that cannot be mounted) raises OSError with the command in the message;
signalling a process that is gone is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import select
import signal
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from discovery.tasks.state import ProcessRef
from netsetup.netns import in_namespace, private_binds

PROC = Path("/proc")
MARKER_ALLOC = "NOMAD_ALLOC_ID"
MARKER_TASK = "NOMAD_TASK_NAME"
RESOLV_CONF = "/etc/resolv.conf"
_STARTTIME_FIELD = 19  # /proc/<pid>/stat field 22, counted after the ")" of comm (field 3 = 0)
_SESSION_FIELD = 3  # field 6


@dataclass(frozen=True, slots=True)
class UserIds:
    """A user a task runs as (resolved when the allocation is set up)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def resolve_user(name: str) -> UserIds:
    """The ids of user `name`.  Error handling: KeyError when there is no such user."""
    entry = pwd.getpwnam(name)
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    return UserIds(name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start one task process."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    stdout: int  # descriptors handed to the process as its stdout and stderr
    stderr: int
    user: UserIds | None = None
    netns: str = ""  # the namespace path to start in; "" is the agent's own
    # mounted over /etc/resolv.conf in bridge mode; "" none
    resolv_conf: str = ""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int
    signal: int = 0
    known: bool = True  # False for an adopted process (not the agent's child)

    @property
    def description(self) -> str:
        if not self.known:
            return "exit status unknown (the process was adopted after an agent restart)"
        if self.signal:
            return f"killed by signal {signal.Signals(self.signal).name}"
        return f"exited with code {self.code}"


def boot_id() -> str:
    return (PROC / "sys/kernel/random/boot_id").read_text().strip()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_ref(pid: int, boot: str, *, zombie: bool = False) -> ProcessRef | None:
    """The ref of the living process `pid` (None when there is none; `zombie`: or dead)."""
    fields = _stat_fields(pid)
    if fields is None or (fields[0] == "Z" and not zombie):
        return None
    return ProcessRef(pid, int(fields[_STARTTIME_FIELD]), boot)


class Process:
    """One task process: watch its exit, signal it and its group."""

    def __init__(self, ref: ProcessRef, pidfd: int, *, own: bool) -> None:
        self.ref = ref
        self.own = own  # the agent's child: reaped by us, exit status known
        self._pidfd = pidfd
        self._status: ExitStatus | None = None

    @property
    def pid(self) -> int:
        return self.ref.pid

    @property
    def exited(self) -> bool:
        if self._status is not None:
            return True
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(ready)

    async def wait(self) -> ExitStatus:
        """Until the process has exited; its status (reaped when it is our child)."""
        if self._status is not None:
            return self._status
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(self._pidfd, readable)
        try:
            await done
        finally:
            loop.remove_reader(self._pidfd)
        if self._status is None:
            self._status = self._reap()
            os.close(self._pidfd)
        return self._status

    def _reap(self) -> ExitStatus:
        if not self.own:
            return ExitStatus(0, known=False)
        try:
            info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        except ChildProcessError:  # reaped elsewhere (should not happen): say so
            return ExitStatus(0, known=False)
        if info is None:  # pragma: no cover - WEXITED without WNOHANG always returns
            return ExitStatus(0, known=False)
        if info.si_code == os.CLD_EXITED:
            return ExitStatus(info.si_status)
        return ExitStatus(128 + info.si_status, signal=info.si_status)

    def signal(self, sig: int, *, group: bool = True) -> None:
        """Send `sig` to the process (race-free, by pidfd) and, `group`, to its process group.

        The group is signalled only while the leader has not been reaped, so its
        id cannot belong to anyone else yet.  A process already gone is fine.
        """
        if self._status is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)
        if group and not self.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.ref.pid, sig)

    def close(self) -> None:
        """Stop watching without reaping (the agent leaves the process running)."""
        if self._status is None:
            self._status = ExitStatus(0, known=False)
            os.close(self._pidfd)


def _spawn_here(launch: Launch) -> int:
    user = launch.user
    proc = subprocess.Popen(
        launch.argv,
        env=launch.env,
        cwd=launch.cwd,
        stdin=subprocess.DEVNULL,
        stdout=launch.stdout,
        stderr=launch.stderr,
        close_fds=True,
        start_new_session=True,
        user=None if user is None else user.uid,
        group=None if user is None else user.gid,
        extra_groups=None if user is None else list(user.groups),
    )
    # Ours to reap (waitid on the pidfd): Popen would reap it from its __del__ or
    # from _cleanup() at the next Popen of the process, taking the exit status.
    proc.returncode = 0
    return proc.pid


async def spawn(launch: Launch, boot: str) -> Process:
    """Start the process of `launch`.  Error handling: OSError naming the command."""
    try:
        if launch.netns:
            pid = await in_namespace(launch.netns, lambda: _spawn_bridged(launch))
        else:
            pid = await asyncio.to_thread(_spawn_here, launch)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}") from exc
    pidfd = os.pidfd_open(pid)
    ref = process_ref(pid, boot, zombie=True) or ProcessRef(pid, 0, boot)
    return Process(ref, pidfd, own=True)


def _spawn_bridged(launch: Launch) -> int:
    """In the thread that joined the allocation's namespace: mount resolv.conf, then fork."""
    path = launch.resolv_conf
    if not path:
        return _spawn_here(launch)
    check_resolv_conf(path)
    private_binds(((path, RESOLV_CONF),))
    return _spawn_here(launch)


def check_resolv_conf(path: str) -> None:
    """`path` is a regular file with one link, in a directory only the agent's user may change.

    A bind mount follows symlinks and reads whatever the path names at that
    moment, so neither the file nor its directory may belong to anyone else.
    Error handling: OSError naming the file.
    """
    try:
        info = os.lstat(path)
        parent = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise OSError(exc.errno, f"resolv.conf {path}: {exc.strerror}") from exc
    me = os.geteuid()
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != me:
        raise OSError(errno.EINVAL, f"resolv.conf {path}: not a regular file of the agent's")
    if parent.st_uid != me or parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(errno.EPERM, f"resolv.conf {path}: its directory is writable by others")


def adopt(ref: ProcessRef, boot: str) -> Process | None:
    """The process `ref` names when it is still that process (same start and boot)."""
    if ref.boot_id != boot:
        return None
    try:
        pidfd = os.pidfd_open(ref.pid)
    except (ProcessLookupError, PermissionError):
        return None
    current = process_ref(ref.pid, boot)  # read after the pidfd pins the pid
    if current is None or current.start_ticks != ref.start_ticks:
        os.close(pidfd)
        return None
    own = _is_child(ref.pid)
    return Process(ref, pidfd, own=own)


def _is_child(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and int(fields[1]) == os.getpid()


def find_marked(alloc_id: str, task: str = "", *, leaders_only: bool = False) -> list[int]:
    """Pids of the processes whose environment names allocation `alloc_id` (and `task`).

    Only processes this agent may read are seen (all of them when it is root).
    `leaders_only` keeps session leaders (the task processes themselves).
    """
    wanted = [f"{MARKER_ALLOC}={alloc_id}".encode()]
    if task:
        wanted.append(f"{MARKER_TASK}={task}".encode())
    me = os.getpid()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        names = environ.split(b"\x00")
        if all(w in names for w in wanted):
            pid = int(entry.name)
            if leaders_only:
                fields = _stat_fields(pid)
                if fields is None or int(fields[_SESSION_FIELD]) != pid:
                    continue
            found.append(pid)
    return sorted(found)


def kill_marked(alloc_id: str, task: str, boot: str) -> list[int]:
    """SIGKILL every process marked with `alloc_id` and `task`; the pids killed."""
    killed = []
    for pid in find_marked(alloc_id, task):
        ref = process_ref(pid, boot)
        proc = adopt(ref, boot) if ref is not None else None
        if proc is None:
            continue
        proc.signal(signal.SIGKILL, group=False)
        proc.close()
        killed.append(pid)
    return killed


def argv_of(command: str, args: Sequence[str]) -> tuple[str, ...]:
    return (command, *args)
