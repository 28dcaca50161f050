"""One allocation's runner: its network, its tasks, its services.  State.

In the shape of Nomad's allocrunner: an :class:`AllocRunner` runs a list of
hooks, `setup` (and `restore`, after an agent restart) in order, `destroy` in
reverse, past errors:

    NetworkHook   netsetup sets up the allocation's network (ports; in bridge mode
                  the namespace, veth and forwards); restore takes what netsetup
                  still has, or sets it up again; destroy tears it down.  A port
                  that serves DNS to bridge allocations (:class:`AllocDnsSource`,
                  discovery.netbridge) gives the network's DNS (Nomad: CNI's).
    TaskHook      the allocation and task directories, each task's runtime
                  environment (computed here, once, stored in the allocation), in
                  bridge mode the allocation's `alloc/resolv.conf` (the group's
                  `dns` block over the network's DNS, discovery.tasks.resolvconf;
                  the task driver mounts it over /etc/resolv.conf), a
                  TaskSupervisor per task; `start` starts or adopts the processes;
                  destroy stops them (kill signal, kill timeout, SIGKILL).
    ServiceHook   the registry instances of the group's and tasks' services, each
                  with its task check; destroy deregisters them.

So a stop deregisters the services first, then kills the tasks, then removes
the network.  The runner holds the live part (supervisors); the allocation's
record (discovery.workload.Allocation) is what it publishes: every task state
change goes out at once through `publish`, with the task checks of the
instances it concerns (an exited task's services leave DNS in that change).

Error handling: a hook that fails in `setup` undoes the hooks before it and
raises; `destroy` goes past every error and returns them; it runs once (a second
call waits for the first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from discovery.errors import ValidationError
from discovery.jobs import (
    GroupSpec,
    JobSpec,
    PlannedAlloc,
    plan_instances,
    service_id,
    service_tasks,
    task_check_id,
)
from discovery.model import CheckKind, Health, Instance
from discovery.tasks import process as proc
from discovery.tasks import resolvconf
from discovery.tasks.env import AllocDirs, TaskIdentity, alloc_dirs, runtime_env
from discovery.tasks.state import (
    DEAD,
    RECEIVED,
    RUNNING,
    TASK_SETUP,
    TaskEvent,
    TaskState,
    render_task_check,
)
from discovery.tasks.supervisor import TaskPlan, TaskSupervisor, fresh_state
from discovery.workload import Allocation
from netsetup.env import render_env
from netsetup.errors import AllocExists
from netsetup.spec import AllocNetwork, DnsConfig, NetworkSpec

log = logging.getLogger(__name__)

DIR_MODE = 0o755
SECRETS_MODE = 0o700
RESOLV_CONF_MODE = 0o644  # world-readable, as /etc/resolv.conf


class NetworkPort(Protocol):
    """What the runners need of netsetup's NetworkManager (discovery.netbridge)."""

    async def setup(self, alloc_id: str, spec: NetworkSpec) -> AllocNetwork: ...
    async def teardown(self, alloc_id: str) -> bool: ...
    async def get(self, alloc_id: str) -> AllocNetwork | None: ...
    async def list(self) -> tuple[AllocNetwork, ...]: ...


@runtime_checkable
class AllocDnsSource(Protocol):
    """A network port that serves DNS to bridge allocations (discovery.netbridge.LazyNetwork)."""

    def alloc_dns(self, network: AllocNetwork) -> DnsConfig | None:
        """The DNS of `network` (None: the network gives none, as in host mode)."""
        ...


@dataclass(frozen=True, slots=True)
class RunnerContext:
    """What every runner shares: the agent's node, paths and callbacks."""

    network: Callable[[], Awaitable[NetworkPort]]
    node: str
    datacenter: str
    alloc_root: Path
    host_env: Mapping[str, str]
    boot: str
    publish: Callable[[AllocRunner], None]  # a task state changed: put it in the registry
    deregister: Callable[[list[str]], None]  # instance ids out of the registry
    failed: Callable[[AllocRunner], None]  # a task will not run again: retire the allocation
    use_cgroups: bool = False
    is_root: bool = False


class Hook(Protocol):
    name: str

    async def setup(self, runner: AllocRunner) -> None: ...
    async def restore(self, runner: AllocRunner) -> None: ...
    async def destroy(self, runner: AllocRunner) -> None: ...


def initial_states(group: GroupSpec, now: int) -> tuple[tuple[str, TaskState], ...]:
    """Each task's state when its allocation is made (Nomad's Received, Task Setup)."""
    events = (
        TaskEvent(RECEIVED, now, "Task received by client"),
        TaskEvent(TASK_SETUP, now, "Building Task Directory"),
    )
    return tuple((t.name, TaskState(events=events)) for t in group.tasks)


class AllocRunner:
    """Runs one allocation (see the module docstring)."""

    def __init__(self, ctx: RunnerContext, job: JobSpec, alloc: Allocation) -> None:
        self.ctx = ctx
        self.job = job
        self.group = job.group(alloc.group)
        self.alloc = alloc
        self.dirs: AllocDirs = alloc_dirs(str(ctx.alloc_root), alloc.id)
        self.instances: tuple[Instance, ...] = ()
        self.network_dns: DnsConfig | None = None  # the network's DNS (NetworkHook)
        self.supervisors: dict[str, TaskSupervisor] = {}
        self._hooks: tuple[Hook, ...] = (NetworkHook(), TaskHook(), ServiceHook())
        self._destroyer: asyncio.Future[list[str]] | None = None
        self._retiring = False
        self._stopped: set[str] = set()  # tasks that stopped running since task_checks()
        self.reason = ""  # why it is destroyed, for the tasks' Killing events

    @property
    def id(self) -> str:
        return self.alloc.id

    @property
    def plan(self) -> PlannedAlloc:
        a = self.alloc
        return PlannedAlloc(a.id, a.name, a.job_id, a.group, a.index, self.group.network)

    @property
    def destroyed(self) -> bool:
        return self._destroyer is not None

    async def setup(self) -> None:
        """Every hook's setup in order; on a failure the ones done are destroyed."""
        await self._each("setup")

    async def restore(self) -> None:
        """Every hook's restore in order (an agent restart); undone on a failure."""
        await self._each("restore")

    async def _each(self, step: str) -> None:
        done: list[Hook] = []
        try:
            for hook in self._hooks:
                await getattr(hook, step)(self)
                done.append(hook)
        except BaseException as exc:
            for hook in reversed(done):
                try:
                    await hook.destroy(self)
                except Exception as err:
                    exc.add_note(f"undo of {hook.name} failed: {err}")
            raise

    def start(self) -> None:
        """Start (or adopt) every task; call once the allocation is published."""
        TaskHook.start(self)

    async def destroy(self, reason: str = "") -> list[str]:
        """Every hook's destroy in reverse, past errors; the errors.  Runs once, whole."""
        if self._destroyer is None:
            self._destroyer = asyncio.ensure_future(self._destroy(reason))
        work = self._destroyer
        try:
            return list(await asyncio.shield(work))
        except asyncio.CancelledError:
            await asyncio.wait([work])
            raise

    async def _destroy(self, reason: str) -> list[str]:
        self.reason = reason
        errors = []
        for hook in reversed(self._hooks):
            try:
                await hook.destroy(self)
            except Exception as exc:
                log.error("allocation %s: %s teardown failed: %s", self.id, hook.name, exc)
                errors.append(f"{self.id}: {hook.name}: {exc}")
        return errors

    async def detach(self) -> None:
        """Stop watching the tasks and leave them running (agent shutdown outside --dev)."""
        await asyncio.gather(*(s.detach() for s in self.supervisors.values()))

    # -- task states -------------------------------------------------------------

    def task_changed(self, name: str, state: TaskState) -> None:
        """A supervisor's publish: the new state into the record, then out."""
        now = time.time_ns()
        before = dict(self.alloc.tasks).get(name)
        if before is not None and before.state == RUNNING and state.state != RUNNING:
            self._stopped.add(name)  # its services' checks start again from critical
        tasks = tuple((n, state if n == name else s) for n, s in self.alloc.tasks)
        self.alloc = replace(self.alloc, tasks=tasks, modify_time=now)
        self.ctx.publish(self)
        if state.state == DEAD and state.failed and not self._retiring:
            self._retiring = True  # Nomad: the other tasks are killed, the allocation fails
            self.ctx.failed(self)

    def task_checks(self) -> dict[str, tuple[Health, str | None]]:
        """Each instance's task check from its tasks' states.

        When a task has stopped running since the last call, the HTTP and TCP
        checks of the services depending on it go back to critical too, as a
        service Nomad registers again when its task restarts: after a restart an
        instance is back in DNS once its checks pass again, not on the statuses
        of the process before.
        """
        states = dict(self.alloc.tasks)
        stopped, self._stopped = self._stopped, set()
        instances = {i.id: i for i in self.instances}
        out: dict[str, tuple[Health, str | None]] = {}
        for svc in self.group.services:
            ident = service_id(self.id, self.group.name, svc.name, svc.port_label, svc.task)
            names = service_tasks(self.group, svc)
            passing, output = render_task_check((n, states[n]) for n in names if n in states)
            out[task_check_id(ident)] = (Health.PASSING if passing else Health.CRITICAL, output)
            inst = instances.get(ident)
            if inst is not None and stopped & set(names):
                for check in inst.checks:
                    if check.kind in (CheckKind.HTTP, CheckKind.TCP):
                        out[check.id] = (Health.CRITICAL, "the task is not running")
        return out


# -- hooks ---------------------------------------------------------------------------


class NetworkHook:
    name = "network"

    async def setup(self, runner: AllocRunner) -> None:
        network = await runner.ctx.network()
        result = await network.setup(runner.id, runner.group.network)
        runner.alloc = replace(runner.alloc, network=result)
        runner.network_dns = _network_dns(network, result)

    async def restore(self, runner: AllocRunner) -> None:
        network = await runner.ctx.network()
        result = await network.get(runner.id)
        if result is None:
            log.warning("allocation %s (%s) is gone; setting it up", runner.id, runner.alloc.name)
            try:
                result = await network.setup(runner.id, runner.group.network)
            except AllocExists:
                log.warning("allocation %s: a setup was interrupted; redoing it", runner.id)
                await network.teardown(runner.id)
                result = await network.setup(runner.id, runner.group.network)
        runner.alloc = replace(runner.alloc, network=result)
        runner.network_dns = _network_dns(network, result)

    async def destroy(self, runner: AllocRunner) -> None:
        network = await runner.ctx.network()
        await network.teardown(runner.id)


class TaskHook:
    name = "tasks"

    async def setup(self, runner: AllocRunner) -> None:
        users = resolve_users(runner)
        await asyncio.to_thread(_make_dirs, runner, users)
        network = runner.alloc.network
        ports = render_env(network) if network is not None else {}
        envs = []
        for task in runner.group.tasks:
            who = TaskIdentity(
                alloc_id=runner.id,
                alloc_name=runner.alloc.name,
                alloc_index=runner.alloc.index,
                job_id=runner.job.id,
                job_name=runner.job.name,
                group=runner.group.name,
                task=task.name,
                datacenter=runner.ctx.datacenter,
            )
            env = runtime_env(
                who,
                runner.dirs,
                cpu=task.cpu,
                memory=task.memory,
                memory_max=task.memory_max,
                ports=ports,
                meta=(dict(runner.job.meta), dict(runner.group.meta), dict(task.meta)),
                env=dict(task.env),
                host=runner.ctx.host_env,
            )
            envs.append((task.name, tuple(sorted(env.items()))))
        runner.alloc = replace(runner.alloc, env=tuple(envs))
        await asyncio.to_thread(_write_resolv_confs, runner)
        _make_supervisors(runner, users)

    async def restore(self, runner: AllocRunner) -> None:
        users = resolve_users(runner)
        await asyncio.to_thread(_make_dirs, runner, users)
        await asyncio.to_thread(_write_resolv_confs, runner)
        _make_supervisors(runner, users)

    @staticmethod
    def start(runner: AllocRunner) -> None:
        boot = runner.ctx.boot
        for name, sup in runner.supervisors.items():
            state = runner.alloc.task(name)
            found = _find_process(runner.id, name, state, boot)
            if found is not None:
                sup.start(found)
            elif state.state == RUNNING:
                sup.start_lost()
            else:
                sup.start()

    async def destroy(self, runner: AllocRunner) -> None:
        await asyncio.gather(*(s.stop(runner.reason) for s in runner.supervisors.values()))


class ServiceHook:
    name = "services"

    async def setup(self, runner: AllocRunner) -> None:
        network = runner.alloc.network
        if network is None:
            raise ValidationError("Job", f"allocation {runner.id} has no network")
        runner.instances = plan_instances(runner.plan, runner.group, network, runner.ctx.node)

    async def restore(self, runner: AllocRunner) -> None:
        await self.setup(runner)

    async def destroy(self, runner: AllocRunner) -> None:
        runner.ctx.deregister([i.id for i in runner.instances])


# -- helpers ---------------------------------------------------------------------------


def resolve_users(runner: AllocRunner) -> dict[str, proc.UserIds | None]:
    """The user each task runs as: its `user` when the agent is root, else the agent's.

    Error handling: ValidationError naming the task's User when there is no such user.
    """
    out: dict[str, proc.UserIds | None] = {}
    for i, task in enumerate(runner.group.tasks):
        if not task.user or not runner.ctx.is_root:
            if task.user:
                log.warning(
                    "task %s: user %r ignored: the agent is not root (it runs as the agent's user)",
                    task.name,
                    task.user,
                )
            out[task.name] = None
            continue
        try:
            out[task.name] = proc.resolve_user(task.user)
        except KeyError:
            group_index = runner.job.groups.index(runner.group)
            raise ValidationError(
                f"Job.TaskGroups[{group_index}].Tasks[{i}].User", f"no such user {task.user!r}"
            ) from None
    return out


def _make_dirs(runner: AllocRunner, users: Mapping[str, proc.UserIds | None]) -> None:
    dirs = runner.dirs
    for path in dirs.all_for([t.name for t in runner.group.tasks]):
        Path(path).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for name, user in users.items():
        secrets = Path(dirs.task(name) / "secrets")
        os.chmod(secrets, SECRETS_MODE)
        if user is not None:
            for sub in ("", "local", "secrets", "tmp"):
                os.chown(Path(dirs.task(name)) / sub, user.uid, user.gid)
    if any(u is not None for u in users.values()):
        for sub in ("data", "tmp"):  # shared: writable by every task's user
            os.chmod(Path(dirs.shared / sub), 0o1777)


def _network_dns(network: NetworkPort, result: AllocNetwork) -> DnsConfig | None:
    return network.alloc_dns(result) if isinstance(network, AllocDnsSource) else None


def _write_resolv_confs(runner: AllocRunner) -> None:
    """The allocation's `alloc/resolv.conf` in bridge mode (none when there is no DNS to give).

    Written in place (truncated, not replaced), so a running task's mount of it
    sees the new text; anything else found there (a symlink, a hard link) is
    removed first, never written through.
    """
    network = runner.alloc.network
    if network is None or network.mode != "bridge":
        return
    dns = resolvconf.task_dns(runner.network_dns, runner.group.network.dns)
    text = resolvconf.render_resolv_conf(dns, resolvconf.read_host_resolv_conf())
    if text is None:
        return
    _write_private(Path(runner.dirs.shared) / resolvconf.FILE_NAME, text)


def _write_private(path: Path, text: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, RESOLV_CONF_MODE)
    except OSError:  # ELOOP: a symlink; anything else: let the fresh create say why
        path.unlink(missing_ok=True)
        fd = os.open(path, flags | os.O_EXCL, RESOLV_CONF_MODE)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
        os.close(fd)
        path.unlink()
        fd = os.open(path, flags | os.O_EXCL, RESOLV_CONF_MODE)
    os.fchmod(fd, RESOLV_CONF_MODE)
    with os.fdopen(fd, "w") as out:
        out.truncate(0)
        out.write(text)


def _make_supervisors(runner: AllocRunner, users: Mapping[str, proc.UserIds | None]) -> None:
    ctx, alloc = runner.ctx, runner.alloc
    network = alloc.network
    netns = network.netns if network is not None and network.mode == "bridge" else ""
    runner.supervisors = {}
    resolv = Path(runner.dirs.shared) / resolvconf.FILE_NAME
    resolv_conf = str(resolv) if netns and resolv.is_file() else ""
    for task in runner.group.tasks:
        plan = TaskPlan(
            alloc_id=alloc.id,
            task=task,
            restart=runner.group.restart_of(task),
            env=alloc.task_env(task.name),
            task_dir=Path(runner.dirs.task(task.name)),
            log_dir=Path(runner.dirs.logs),
            netns=netns,
            user=users.get(task.name),
            resolv_conf=resolv_conf,
        )
        state = alloc.task(task.name)
        if state.state == DEAD and not state.failed:
            state = fresh_state(state)
        runner.supervisors[task.name] = TaskSupervisor(
            plan,
            state,
            runner.task_changed,
            host_env=ctx.host_env,
            boot=ctx.boot,
            use_cgroups=ctx.use_cgroups,
        )


def _find_process(alloc_id: str, task: str, state: TaskState, boot: str) -> proc.Process | None:
    """The task's process if it still runs: by its recorded ref, else by its marker.

    The marker search covers a crash between a start and its record; a second
    process found that way (it cannot be ours twice) is killed.
    """
    if state.process is not None:
        found = proc.adopt(state.process, boot)
        if found is not None:
            return found
    if state.state not in (RUNNING, "pending"):
        return None
    leaders = proc.find_marked(alloc_id, task, leaders_only=True)
    adopted = None
    for pid in leaders:
        ref = proc.process_ref(pid, boot)
        candidate = proc.adopt(ref, boot) if ref is not None else None
        if candidate is None:
            continue
        if adopted is None:
            adopted = candidate
        else:
            log.warning("task %s of %s: a second process %d is killed", task, alloc_id, pid)
            candidate.signal(9)
            candidate.close()
    return adopted
