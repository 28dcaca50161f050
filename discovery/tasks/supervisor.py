"""One task's life: start it, watch it, restart it by its policy, stop it.  State.

A :class:`TaskSupervisor` owns one task of one allocation: its process (through
discovery.tasks.process), its log pipes and rotated files (discovery.tasks.logs),
its cgroup where there are any (discovery.tasks.cgroups) and its
:class:`~discovery.tasks.state.TaskState`.  Every change of the state is handed to
`publish` at once (the allocation runner puts it in the registry), with Nomad's
events: Started, Terminated, Restarting, Not Restarting, Driver Failure, Killing,
Killed.

    start(process)   run the task: adopt `process` (an agent restart) or start it,
                     then restart it on every exit as the restart tracker decides
                     (discovery.tasks.restarts), until it does not restart (dead,
                     failed) or is stopped.
    start_lost()     the task was running when the agent went away and is gone now:
                     a Terminated event (status unknown), then the restart policy.
    stop(reason)     the kill signal to its process group, SIGKILL after
                     kill_timeout, then every process still marked with the task's
                     allocation and name (descendants that left the group), its
                     cgroup, its pipes; dead, not failed.  Never cut short.
    detach()         stop watching and leave the process running (agent shutdown
                     outside --dev); its output waits in the pipes for the next agent.

Error handling: a start that fails is a Driver Failure event and counts as a
failed run; a failure inside the loop is logged and ends it with the task dead
and failed (it never takes the agent down); a cancelled `stop` finishes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from discovery.durations import format_duration
from discovery.tasks import cgroups
from discovery.tasks.env import interpolate, process_env
from discovery.tasks.logs import (
    KINDS,
    LogNotifier,
    LogPipe,
    LogRotator,
    ensure_fifo,
    fifo_path,
    open_null,
    open_task_end,
)
from discovery.tasks.process import (
    ExitStatus,
    Launch,
    Process,
    UserIds,
    kill_marked,
    spawn,
)
from discovery.tasks.restarts import RestartTracker
from discovery.tasks.spec import RestartPolicy, TaskSpec
from discovery.tasks.state import (
    DEAD,
    DRIVER_FAILURE,
    KILLED,
    KILLING,
    NOT_RESTARTING,
    PENDING,
    RESTARTING,
    RUNNING,
    STARTED,
    TERMINATED,
    TaskEvent,
    TaskState,
    with_event,
)

log = logging.getLogger(__name__)

FORCE_WAIT = 10.0  # seconds for a SIGKILLed process to be reaped (it always is, but bounded)
Publish = Callable[[str, TaskState], None]


@dataclass(frozen=True, slots=True)
class TaskPlan:
    """Everything a task is run with, fixed when its allocation is set up."""

    alloc_id: str
    task: TaskSpec
    restart: RestartPolicy
    env: Mapping[str, str]  # the runtime environment (discovery.tasks.env.runtime_env)
    task_dir: Path
    log_dir: Path
    netns: str = ""  # the allocation's namespace (bridge mode); "" is the host's
    user: UserIds | None = None
    resolv_conf: str = ""  # bridge mode: mounted over /etc/resolv.conf; "" none

    @property
    def argv(self) -> tuple[str, ...]:
        """command and args with `${...}` interpolated from the runtime environment."""
        env = self.env
        return (interpolate(self.task.command, env), *(interpolate(a, env) for a in self.task.args))


def _ns(seconds: float) -> int:
    return round(seconds * 10**9)


class TaskSupervisor:
    """Runs one task (see the module docstring)."""

    def __init__(
        self,
        plan: TaskPlan,
        state: TaskState,
        publish: Publish,
        *,
        host_env: Mapping[str, str],
        boot: str,
        use_cgroups: bool = False,
        now_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.plan = plan
        self._state = state
        self._publish = publish
        self._host_env = host_env
        self._boot = boot
        self._cgroups = use_cgroups
        self._cgroup: Path | None = None
        self._now = now_ns
        self._tracker = RestartTracker(plan.restart, monotonic, rand)
        self._task: asyncio.Task[None] | None = None
        self._process: Process | None = None
        self._rotators: dict[str, LogRotator] = {}
        self._pipes: dict[str, LogPipe] = {}
        self._stopping = False
        self._stopper: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return self.plan.task.name

    @property
    def state(self) -> TaskState:
        return self._state

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else 0

    def notifier(self, kind: str) -> LogNotifier | None:
        rotator = self._rotators.get(kind)
        return None if rotator is None else rotator.notifier

    def _set(self, state: TaskState) -> None:
        self._state = state
        self._publish(self.name, state)

    def _event(self, kind: str, message: str, **fields: Any) -> TaskEvent:
        return TaskEvent(kind, self._now(), message, **fields)

    # -- running -----------------------------------------------------------------

    def start(self, process: Process | None = None) -> None:
        """Run the task, adopting `process` when given (it must be the task's)."""
        if process is not None:
            self._open_logs()
            self._process = process
            if self._state.process != process.ref or not self._state.running:
                self._set(replace(self._state, state=RUNNING, process=process.ref))
        self._spawn_loop(self._run(process))

    def start_lost(self) -> None:
        """The task ran when the agent stopped and is gone now: follow the restart policy."""
        ended = self._event(
            TERMINATED,
            'Exit Code: 0, Exit Message: "exit status unknown: the task ended while the agent'
            ' was not running"',
        )
        self._set(
            with_event(self._state, ended, state=PENDING, process=None, finished_at=ended.time)
        )
        self._spawn_loop(self._after_exit_then_run())

    def _spawn_loop(self, work: object) -> None:
        assert asyncio.iscoroutine(work)
        self._task = asyncio.get_running_loop().create_task(
            work, name=f"task {self.plan.alloc_id[:8]}/{self.name}"
        )

    async def _after_exit_then_run(self) -> None:
        if await self._decide_and_wait():
            await self._run(None)

    async def _run(self, process: Process | None) -> None:
        """Error handling: anything unexpected ends the task dead and failed, logged."""
        try:
            while not self._stopping:
                if process is None:
                    process = await self._launch()
                if process is not None:
                    status = await self._watch(process)
                    process = None
                    self._terminated(status)
                if not await self._decide_and_wait():
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task %s of allocation %s failed", self.name, self.plan.alloc_id)
            failed = self._event(NOT_RESTARTING, f"waypost error: {exc}", fails_task=True)
            self._set(with_event(self._state, failed, state=DEAD, failed=True, process=None))

    async def _decide_and_wait(self) -> bool:
        """After an exit: publish the decision; sleep out the delay; False when done."""
        decision = self._tracker.decide()
        now = self._now()
        if not decision.restart:
            event = self._event(NOT_RESTARTING, decision.reason, fails_task=True)
            self._set(
                with_event(
                    self._state, event, state=DEAD, failed=True, finished_at=now, process=None
                )
            )
            self._close_logs()
            return False
        message = f"Task restarting in {format_duration(decision.delay)}"
        if decision.reason and decision.reason != "Restart within policy":
            message = f"{decision.reason} - {message}"
        event = self._event(RESTARTING, message, start_delay=_ns(decision.delay))
        self._set(
            with_event(
                self._state,
                event,
                state=PENDING,
                restarts=self._state.restarts + 1,
                last_restart=now,
                process=None,
            )
        )
        await asyncio.sleep(decision.delay)
        return True

    def _terminated(self, status: ExitStatus) -> None:
        parts = [f"Exit Code: {status.code}"]
        if status.signal:
            parts.append(f"Signal: {status.signal}")
        if not status.known:
            parts.append(f'Exit Message: "{status.description}"')
        event = self._event(
            TERMINATED, ", ".join(parts), exit_code=status.code, signal=status.signal
        )
        self._state = with_event(self._state, event, finished_at=event.time, process=None)
        # Published together with the restart decision, in the same loop iteration.

    async def _launch(self) -> Process | None:
        """Start the process; a failure is a Driver Failure event (None)."""
        plan = self.plan
        try:
            self._open_logs()
            out, err = self._task_ends()
        except OSError as exc:
            self._driver_failure(f"failed to set up the task's logs: {exc}")
            return None
        env = process_env(plan.env, self._host_env)
        if plan.user is not None:
            own = {"USER": plan.user.name, "LOGNAME": plan.user.name, "HOME": plan.user.home}
            env.update((k, v) for k, v in own.items() if k not in plan.env)
        launch = Launch(
            plan.argv, env, str(plan.task_dir), out, err, plan.user, plan.netns, plan.resolv_conf
        )
        starting = asyncio.ensure_future(spawn(launch, self._boot))
        try:
            process = await asyncio.shield(starting)
        except asyncio.CancelledError:  # a fork cannot be taken back: keep it to stop it
            with contextlib.suppress(Exception):
                self._process = await starting
            raise
        except OSError as exc:
            self._driver_failure(f"failed to launch command with executor: {exc}")
            return None
        finally:
            os.close(out)
            if err != out:
                os.close(err)
        self._process = process
        self._join_cgroup(process.pid)
        started = self._event(STARTED, "Task started by client")
        self._set(
            with_event(
                self._state,
                started,
                state=RUNNING,
                failed=False,
                started_at=started.time,
                process=process.ref,
            )
        )
        return process

    def _driver_failure(self, message: str) -> None:
        log.error("task %s of allocation %s: %s", self.name, self.plan.alloc_id, message)
        self._state = with_event(self._state, self._event(DRIVER_FAILURE, message))

    async def _watch(self, process: Process) -> ExitStatus:
        self._process = process
        status = await process.wait()
        self._process = None
        return status

    # -- logs and cgroups --------------------------------------------------------

    def _open_logs(self) -> None:
        plan = self.plan
        if plan.task.logs.disabled:
            return
        for kind in KINDS:
            if kind not in self._rotators:
                self._rotators[kind] = LogRotator(
                    plan.log_dir,
                    f"{self.name}.{kind}",
                    plan.task.logs.max_files,
                    plan.task.logs.max_file_size,
                )
            pipe = self._pipes.get(kind)
            if pipe is None or not pipe.is_open:
                path = fifo_path(plan.log_dir, self.name, kind)
                ensure_fifo(path)
                pipe = LogPipe(path, self._rotators[kind])
                pipe.open()
                self._pipes[kind] = pipe

    def _task_ends(self) -> tuple[int, int]:
        if self.plan.task.logs.disabled:
            null = open_null()
            return null, null
        out = open_task_end(fifo_path(self.plan.log_dir, self.name, "stdout"))
        try:
            err = open_task_end(fifo_path(self.plan.log_dir, self.name, "stderr"))
        except OSError:
            os.close(out)
            raise
        return out, err

    def _close_logs(self) -> None:
        for pipe in self._pipes.values():
            pipe.drain()
            pipe.close()
        self._pipes.clear()
        for rotator in self._rotators.values():
            rotator.close()
        self._rotators.clear()

    def _join_cgroup(self, pid: int) -> None:
        if not self._cgroups:
            return
        task = self.plan.task
        try:
            if self._cgroup is None:
                limit = task.memory_max or task.memory
                self._cgroup = cgroups.create(self.plan.alloc_id, self.name, limit)
            cgroups.add(self._cgroup, pid)
        except OSError as exc:
            log.warning("task %s: no cgroup (%s); its memory is not limited", self.name, exc)
            self._cgroups = False

    # -- stopping ----------------------------------------------------------------

    async def stop(self, reason: str = "") -> None:
        """Kill the task (see the module docstring).  Never cut short by a cancellation."""
        if self._stopper is None:
            self._stopper = asyncio.ensure_future(self._stop(reason))
        work = self._stopper
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            raise

    async def _stop(self, reason: str) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        process, task = self._process, self.plan.task
        if process is not None and not process.exited:
            why = f"{reason}: " if reason else ""
            message = f"{why}Sent interrupt. Waiting {format_duration(task.kill_timeout)}"
            message += " before force killing"
            killing = self._event(KILLING, message, kill_timeout=_ns(task.kill_timeout))
            self._set(with_event(self._state, killing))
            process.signal(task.signal_number)
            try:
                await asyncio.wait_for(process.wait(), task.kill_timeout)
            except TimeoutError:
                process.signal(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), FORCE_WAIT)
        self._process = None
        left = await asyncio.to_thread(kill_marked, self.plan.alloc_id, self.name, self._boot)
        if self._cgroup is not None:
            await asyncio.to_thread(cgroups.remove, self._cgroup)
        self._close_logs()
        if self._state.state == DEAD and process is None:
            return  # it had ended on its own already: nothing was killed
        message = "Task successfully killed"
        if left:
            message += f" (and {len(left)} left-over processes: {', '.join(map(str, left))})"
        killed = self._event(KILLED, message)
        self._set(
            with_event(self._state, killed, state=DEAD, finished_at=killed.time, process=None)
        )

    async def detach(self) -> None:
        """Stop watching; the process runs on (see the module docstring)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._process is not None:
            self._process.close()
            self._process = None
        self._close_logs()


def fresh_state(state: TaskState) -> TaskState:
    """A state to start again from (a new run of an allocation whose task was stopped)."""
    return replace(state, failed=False, process=None)
