"""discovery.tasks.state: TaskState and TaskEvent in Nomad's shape, and persisted.  Pure.

Times are checked against Go's encoding/json of a time.Time in UTC (RFC 3339 with
nanoseconds, trailing zeros trimmed, as time.RFC3339Nano prints), written out by
hand; the allocation status against Nomad's allocrunner getClientStatus.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from discovery.tasks.state import (
    DEAD,
    PENDING,
    RUNNING,
    ProcessRef,
    TaskEvent,
    TaskState,
    client_status,
    go_time,
    parse_state,
    render_event,
    render_state,
    render_task_check,
    render_task_state,
    with_event,
)

T = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z in Unix nanoseconds
REF = ProcessRef(pid=4242, start_ticks=123456, boot_id="9a1c4e3e-boot")


def event(n: int, kind: str = "Started", message: str = "") -> TaskEvent:
    return TaskEvent(type=kind, time=T + n, message=message)


# -- events --------------------------------------------------------------------------


@pytest.mark.parametrize("before", [0, 1, 9, 10, 11, 25])
def test_with_event_keeps_the_last_10(before: int) -> None:
    state = TaskState(events=tuple(event(i) for i in range(before)))
    new = event(1000, "Terminated")
    after = with_event(state, new)
    assert len(after.events) == min(before + 1, 10)
    assert after.events[-1] == new
    assert after.events[:-1] == state.events[len(state.events) - len(after.events) + 1 :]


def test_with_event_drops_the_oldest_first() -> None:
    state = TaskState()
    for i in range(12):
        state = with_event(state, event(i))
    assert [e.time - T for e in state.events] == list(range(2, 12))


def test_with_event_applies_the_changes() -> None:
    before = TaskState(restarts=1)
    after = with_event(before, event(5, "Started"), state=RUNNING, started_at=T + 5)
    assert after == TaskState(
        state=RUNNING, restarts=1, started_at=T + 5, events=(event(5, "Started"),)
    )
    assert before == TaskState(restarts=1)  # not changed


# -- the allocation's status ---------------------------------------------------------


RUN = TaskState(state=RUNNING)
WAIT = TaskState(state=PENDING)
DONE = TaskState(state=DEAD)
FAILED = TaskState(state=DEAD, failed=True)


@pytest.mark.parametrize(
    ("states", "status"),
    [
        ([WAIT], "pending"),
        ([WAIT, WAIT], "pending"),
        ([RUN], "running"),
        ([RUN, RUN, RUN], "running"),
        ([DONE], "complete"),
        ([DONE, DONE], "complete"),
        ([FAILED], "failed"),
        ([RUN, FAILED], "failed"),
        ([WAIT, FAILED], "failed"),
        ([DONE, FAILED], "failed"),
        ([WAIT, DONE], "pending"),
    ],
)
def test_client_status(states: list[TaskState], status: str) -> None:
    assert client_status(states) == status
    assert client_status(reversed(states)) == status


@pytest.mark.parametrize(
    "states", [[RUN, WAIT], [RUN, DONE], [RUN, WAIT, DONE]], ids=["pending", "dead", "both"]
)
def test_client_status_is_running_while_any_task_runs(states: list[TaskState]) -> None:
    assert client_status(states) == "running"


# -- Go's time format ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0001-01-01T00:00:00Z"),  # Go's zero time.Time: never happened
        (1, "1970-01-01T00:00:00.000000001Z"),
        (10**9, "1970-01-01T00:00:01Z"),
        (T, "2023-11-14T22:13:20Z"),  # whole seconds: no fraction at all
        (T + 500_000_000, "2023-11-14T22:13:20.5Z"),
        (T + 120_000_000, "2023-11-14T22:13:20.12Z"),
        (T + 100_000_000, "2023-11-14T22:13:20.1Z"),
        (T + 1_000, "2023-11-14T22:13:20.000001Z"),
        (T + 10, "2023-11-14T22:13:20.00000001Z"),
        (T + 123_456_789, "2023-11-14T22:13:20.123456789Z"),
        (T + 123_456_780, "2023-11-14T22:13:20.12345678Z"),
        (1_704_067_199_999_999_999, "2023-12-31T23:59:59.999999999Z"),
        (1_704_067_200_000_000_000, "2024-01-01T00:00:00Z"),
        (951_782_400_000_000_000, "2000-02-29T00:00:00Z"),
    ],
)
def test_go_time(nanos: int, text: str) -> None:
    assert go_time(nanos) == text


# -- Nomad's JSON --------------------------------------------------------------------


FULL = TaskState(
    state=RUNNING,
    failed=False,
    restarts=2,
    last_restart=T + 500_000_000,
    started_at=T + 1_000_000_000,
    finished_at=0,
    events=(
        TaskEvent(type="Received", time=T, message="Task received by client"),
        TaskEvent(
            type="Terminated",
            time=T + 100,
            message="Exit Code: 137, Signal: 9",
            exit_code=137,
            signal=9,
        ),
        TaskEvent(
            type="Restarting",
            time=T + 200,
            message="Task restarting in 16.2s",
            start_delay=16_200_000_000,
            details=(("restart_reason", "Restart within policy"), ("start_delay", "16200000000")),
        ),
        TaskEvent(
            type="Killing",
            time=T + 300,
            message="Sent interrupt. Waiting 5s before force killing",
            kill_timeout=5_000_000_000,
            fails_task=True,
        ),
    ),
    process=REF,
)


def test_render_task_state_is_nomads_shape() -> None:
    rendered = render_task_state(FULL)
    assert {k: v for k, v in rendered.items() if k != "Events"} == {
        "State": "running",
        "Failed": False,
        "Restarts": 2,
        "LastRestart": "2023-11-14T22:13:20.5Z",
        "StartedAt": "2023-11-14T22:13:21Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
        "Pid": 4242,
    }
    assert [e["Type"] for e in rendered["Events"]] == [
        "Received",
        "Terminated",
        "Restarting",
        "Killing",
    ]
    assert rendered["Events"][1] == {
        "Type": "Terminated",
        "Time": T + 100,
        "DisplayMessage": "Exit Code: 137, Signal: 9",
        "Message": "Exit Code: 137, Signal: 9",
        "Details": {},
        "FailsTask": False,
        "ExitCode": 137,
        "Signal": 9,
        "KillTimeout": 0,
        "StartDelay": 0,
        "RestartReason": "",
    }
    json.dumps(rendered)  # JSON as it is


def test_render_event_restart_reason_and_details() -> None:
    rendered = render_event(FULL.events[2])
    assert rendered["RestartReason"] == "Restart within policy"
    assert rendered["Details"] == {
        "restart_reason": "Restart within policy",
        "start_delay": "16200000000",
    }
    assert rendered["StartDelay"] == 16_200_000_000


def test_render_event_kill_fields() -> None:
    rendered = render_event(FULL.events[3])
    assert (rendered["KillTimeout"], rendered["FailsTask"], rendered["Time"]) == (
        5_000_000_000,
        True,
        T + 300,
    )


@pytest.mark.parametrize(
    ("state", "pid"),
    [
        (TaskState(state=RUNNING, process=REF), 4242),
        (TaskState(state=RUNNING), 0),  # running, process not known (yet)
        (TaskState(state=DEAD, process=REF), 0),  # a ref left behind is not a running pid
        (TaskState(state=PENDING, process=REF), 0),
    ],
)
def test_pid_only_while_running(state: TaskState, pid: int) -> None:
    assert render_task_state(state)["Pid"] == pid


def test_a_new_task_state_renders_zero_times() -> None:
    assert render_task_state(TaskState()) == {
        "State": "pending",
        "Failed": False,
        "Restarts": 0,
        "LastRestart": "0001-01-01T00:00:00Z",
        "StartedAt": "0001-01-01T00:00:00Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
        "Events": [],
        "Pid": 0,
    }


# -- persistence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        TaskState(),
        FULL,
        TaskState(state=DEAD, failed=True, restarts=3, finished_at=T, events=FULL.events[:2]),
        TaskState(state=RUNNING, process=ProcessRef(1, 0, "")),
        TaskState(events=tuple(event(i) for i in range(10))),
    ],
    ids=["new", "full", "failed", "pid-1", "ten-events"],
)
def test_render_parse_state_round_trip(state: TaskState) -> None:
    stored = json.loads(json.dumps(render_state(state)))  # as the store keeps it
    assert parse_state(stored) == state


def test_render_state_is_the_persisted_shape() -> None:
    state = TaskState(state=DEAD, restarts=1, events=(FULL.events[2],), process=REF)
    assert render_state(state) == {
        "state": "dead",
        "failed": False,
        "restarts": 1,
        "last_restart": 0,
        "started_at": 0,
        "finished_at": 0,
        "events": [
            [
                "Restarting",
                T + 200,
                "Task restarting in 16.2s",
                0,
                0,
                0,
                16_200_000_000,
                [["restart_reason", "Restart within policy"], ["start_delay", "16200000000"]],
                False,
            ]
        ],
        "process": [4242, 123456, "9a1c4e3e-boot"],
    }


def test_parse_state_keeps_the_last_10_events() -> None:
    stored = render_state(TaskState(events=tuple(event(i) for i in range(15))))
    assert [e.time - T for e in parse_state(stored).events] == list(range(5, 15))


def _stored(**changes: Any) -> dict[str, Any]:
    return render_state(FULL) | changes


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (_stored(state="sleeping"), ValueError),
        ({k: v for k, v in _stored().items() if k != "events"}, KeyError),
        ({k: v for k, v in _stored().items() if k != "state"}, KeyError),
        (_stored(restarts="many"), ValueError),
        (_stored(events=[["Started", T]]), IndexError),
        (_stored(process=[1]), IndexError),
        (_stored(events=None), TypeError),
    ],
    ids=["state", "no-events", "no-state", "restarts", "short-event", "short-process", "null"],
)
def test_parse_state_refuses_what_it_did_not_write(raw: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        parse_state(raw)


# -- the task check ------------------------------------------------------------------


CHECKS: list[tuple[str, list[tuple[str, TaskState]], tuple[bool, str]]] = [
    ("no tasks", [], (True, "")),
    (
        "running with a pid",
        [("web", TaskState(state=RUNNING, process=REF))],
        (True, 'task "web" is running (pid 4242)'),
    ),
    ("running, no pid", [("web", RUN)], (True, 'task "web" is running')),
    ("pending, no events", [("web", WAIT)], (False, 'task "web" is pending')),
    (
        "dead with its last event",
        [("web", TaskState(state=DEAD, events=(event(1, "Started", "up"), FULL.events[1])))],
        (False, 'task "web" is dead: Terminated: Exit Code: 137, Signal: 9'),
    ),
    (
        "last event without a message",
        [("web", TaskState(state=DEAD, events=(FULL.events[1], event(2, "Killed"))))],
        (False, 'task "web" is dead'),
    ),
    (
        "every task runs",
        [("a", TaskState(state=RUNNING, process=REF)), ("b", RUN)],
        (True, 'task "a" is running (pid 4242); task "b" is running'),
    ),
    (
        "the tasks down first",
        [
            ("a", TaskState(state=RUNNING, process=REF)),
            ("b", TaskState(state=PENDING, events=(event(1, "Restarting", "in 15s"),))),
            ("c", DONE),
        ],
        (
            False,
            'task "b" is pending: Restarting: in 15s; task "c" is dead; '
            'task "a" is running (pid 4242)',
        ),
    ),
]


@pytest.mark.parametrize(
    ("tasks", "expected"), [(t, e) for _, t, e in CHECKS], ids=[i for i, _, _ in CHECKS]
)
def test_render_task_check(tasks: list[tuple[str, TaskState]], expected: tuple[bool, str]) -> None:
    assert render_task_check(tasks) == expected
