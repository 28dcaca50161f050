"""A task's state and events, as Nomad's API shows them.  Pure: no I/O.

:class:`TaskState` is Nomad's TaskState (api/tasks.go: `State` pending|running|dead,
`Failed`, `Restarts`, `LastRestart`, `StartedAt`, `FinishedAt`, `Events`) plus the
handle of its process (:class:`ProcessRef`: pid, the process's start time in clock
ticks since boot, and the boot id), which is what lets a restarted agent adopt the
process and never a recycled pid.  Events are Nomad's TaskEvent (`Type`, `Time` in
Unix nanoseconds, `DisplayMessage`, `Details`, `ExitCode`, `Signal`...), at most
:data:`MAX_EVENTS` (Nomad's defaultMaxEvents), the oldest dropped first.

    with_event(state, event)     append an event, keep the last MAX_EVENTS
    client_status(states)        an allocation's ClientStatus from its tasks'
    render_task_state(state)     Nomad's JSON (times as RFC 3339 strings, as Go prints them)
    render_state / parse_state   the persisted form (JSON-able dict) and back
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

# Nomad's event types (api/tasks.go).
RECEIVED = "Received"
TASK_SETUP = "Task Setup"
SETUP_FAILURE = "Setup Failure"
DRIVER_FAILURE = "Driver Failure"
STARTED = "Started"
TERMINATED = "Terminated"
RESTARTING = "Restarting"
NOT_RESTARTING = "Not Restarting"
KILLING = "Killing"
KILLED = "Killed"
SIBLING_FAILED = "Sibling Task Failed"

PENDING, RUNNING, DEAD = "pending", "running", "dead"
MAX_EVENTS = 10  # Nomad's taskrunner defaultMaxEvents
GO_ZERO_TIME = "0001-01-01T00:00:00Z"  # how Go's encoding/json prints a zero time.Time


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """Which process a task is: pid, its start time (ticks since boot) and the boot."""

    pid: int
    start_ticks: int
    boot_id: str


@dataclass(frozen=True, slots=True)
class TaskEvent:
    type: str
    time: int  # Unix nanoseconds
    message: str = ""  # DisplayMessage
    exit_code: int = 0
    signal: int = 0
    kill_timeout: int = 0  # nanoseconds
    start_delay: int = 0  # nanoseconds
    details: tuple[tuple[str, str], ...] = ()
    fails_task: bool = False


@dataclass(frozen=True, slots=True)
class TaskState:
    state: str = PENDING
    failed: bool = False
    restarts: int = 0
    last_restart: int = 0  # Unix nanoseconds; 0 is Go's zero time
    started_at: int = 0
    finished_at: int = 0
    events: tuple[TaskEvent, ...] = ()
    process: ProcessRef | None = None  # while its process may be alive

    @property
    def running(self) -> bool:
        return self.state == RUNNING


def with_event(current: TaskState, event: TaskEvent, /, **changes: Any) -> TaskState:
    """`current` with `event` appended (the last MAX_EVENTS kept) and `changes` applied."""
    events = (*current.events, event)[-MAX_EVENTS:]
    return replace(current, events=events, **changes)


def client_status(states: Iterable[TaskState]) -> str:
    """Nomad's ClientStatus of an allocation whose tasks are in `states`
    (client/allocrunner getClientStatus).

    failed if any task failed; else running if any task runs (a restarting sibling
    does not make a serving allocation pending); else pending if any task is yet to
    run; else complete once all are dead.
    """
    states = list(states)
    if any(s.failed for s in states):
        return "failed"
    if any(s.state == RUNNING for s in states):
        return "running"
    if not states or any(s.state != DEAD for s in states):
        return "pending"
    return "complete"


def go_time(nanos: int) -> str:
    """Unix nanoseconds as Go's time.Time JSON (RFC 3339, nanoseconds kept)."""
    if nanos <= 0:
        return GO_ZERO_TIME
    whole = datetime.fromtimestamp(nanos // 10**9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = nanos % 10**9
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") + "Z"


def render_event(event: TaskEvent) -> dict[str, Any]:
    """Nomad's TaskEvent JSON (the deprecated fields clients still read included)."""
    return {
        "Type": event.type,
        "Time": event.time,
        "DisplayMessage": event.message,
        "Message": event.message,
        "Details": dict(event.details),
        "FailsTask": event.fails_task,
        "ExitCode": event.exit_code,
        "Signal": event.signal,
        "KillTimeout": event.kill_timeout,
        "StartDelay": event.start_delay,
        "RestartReason": dict(event.details).get("restart_reason", ""),
    }


def render_task_state(state: TaskState) -> dict[str, Any]:
    """Nomad's TaskState JSON, plus waypost's `Pid` of the running process (0 if none)."""
    return {
        "State": state.state,
        "Failed": state.failed,
        "Restarts": state.restarts,
        "LastRestart": go_time(state.last_restart),
        "StartedAt": go_time(state.started_at),
        "FinishedAt": go_time(state.finished_at),
        "Events": [render_event(e) for e in state.events],
        "Pid": state.process.pid if state.process is not None and state.running else 0,
    }


# -- persistence ---------------------------------------------------------------------


def render_state(state: TaskState) -> dict[str, Any]:
    """The persisted form of `state` (inverse of :func:`parse_state`)."""
    process = state.process
    return {
        "state": state.state,
        "failed": state.failed,
        "restarts": state.restarts,
        "last_restart": state.last_restart,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "events": [
            [
                *(e.type, e.time, e.message, e.exit_code, e.signal, e.kill_timeout),
                *(e.start_delay, [list(d) for d in e.details], e.fails_task),
            ]
            for e in state.events
        ],
        "process": None if process is None else [process.pid, process.start_ticks, process.boot_id],
    }


def parse_state(raw: Mapping[str, Any]) -> TaskState:
    """A persisted TaskState back.  Error handling: KeyError, TypeError, ValueError."""
    process = raw.get("process")
    events = tuple(
        TaskEvent(
            type=str(e[0]),
            time=int(e[1]),
            message=str(e[2]),
            exit_code=int(e[3]),
            signal=int(e[4]),
            kill_timeout=int(e[5]),
            start_delay=int(e[6]),
            details=tuple((str(k), str(v)) for k, v in e[7]),
            fails_task=bool(e[8]),
        )
        for e in raw["events"]
    )
    state = str(raw["state"])
    if state not in (PENDING, RUNNING, DEAD):
        raise ValueError(f"unknown task state {state!r}")
    return TaskState(
        state=state,
        failed=bool(raw["failed"]),
        restarts=int(raw["restarts"]),
        last_restart=int(raw["last_restart"]),
        started_at=int(raw["started_at"]),
        finished_at=int(raw["finished_at"]),
        events=events[-MAX_EVENTS:],
        process=None
        if process is None
        else ProcessRef(int(process[0]), int(process[1]), str(process[2])),
    )


def render_task_check(tasks: Iterable[tuple[str, TaskState]]) -> tuple[bool, str]:
    """(passing, output) of a task check over `tasks` (discovery.jobs.task_check).

    Passing while every task runs; the output names each task that does not and
    its last event, as `nomad alloc status` would show it.
    """
    running, down = [], []
    for name, state in tasks:
        if state.running:
            pid = state.process.pid if state.process is not None else 0
            running.append(f'task "{name}" is running' + (f" (pid {pid})" if pid else ""))
        else:
            last = state.events[-1] if state.events else None
            why = f": {last.type}: {last.message}" if last is not None and last.message else ""
            down.append(f'task "{name}" is {state.state}{why}')
    if down:
        return False, "; ".join(down + running)
    return True, "; ".join(running)
