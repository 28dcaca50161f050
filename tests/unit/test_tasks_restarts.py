"""discovery.tasks.restarts: Nomad's restart tracker, on an injected clock.  Pure.

The clock is a number the tests move; `rand` is a list of draws the tracker
takes from in order, so a draw it did not expect (or one too many) fails.  The
expectations follow client/allocrunner/taskrunner/restarts/restarts.go
(GetState, jitter, getDelay) for a service job.
"""

from __future__ import annotations

import pytest

from discovery.tasks.restarts import Decision, RestartTracker
from discovery.tasks.spec import RestartPolicy

T0 = 1_000.0
WITHIN = "Restart within policy"
DELAYING = "Exceeded allowed attempts, applying a delay"
NO_RESTARTS = "Policy allows no restarts"


class Clock:
    """Seconds that move only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Draws:
    """The tracker's randomness: the given values, in order."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0)


def tracker(policy: RestartPolicy, clock: Clock, *draws: float) -> RestartTracker:
    return RestartTracker(policy, clock, Draws(*draws))


def exits(track: RestartTracker, clock: Clock, times: list[float]) -> list[Decision]:
    """The decisions after exits at `times` (seconds after T0)."""
    out = []
    for at in times:
        clock.now = T0 + at
        out.append(track.decide())
    return out


@pytest.mark.parametrize(
    ("delay", "draw", "expected"),
    [
        (15.0, 0.0, 15.0),  # no jitter
        (15.0, 0.5, 16.875),  # 15 + 0.5 * 15 * 0.25
        (15.0, 0.999, 18.74625),  # just under 25% more
        (1.0, 0.5, 1.125),
        (60.0, 0.2, 63.0),
        (0.0, 0.7, 0.0),
    ],
)
def test_within_the_attempts_the_delay_has_up_to_25_percent_jitter(
    delay: float, draw: float, expected: float
) -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=2, delay=delay), clock, draw)
    clock.now += 1
    decision = track.decide()
    assert (decision.restart, decision.reason) == (True, WITHIN)
    assert decision.delay == pytest.approx(expected)


def test_mode_fail_stops_after_the_allowed_attempts() -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=2, interval=1800.0, delay=15.0), clock, 0.0, 0.0)
    assert exits(track, clock, [10, 20, 30]) == [
        Decision(True, 15.0, WITHIN),
        Decision(True, 15.0, WITHIN),
        Decision(False, 0.0, 'Exceeded allowed attempts 2 in interval 30m0s and mode is "fail"'),
    ]


@pytest.mark.parametrize(
    ("attempts", "interval", "reason"),
    [
        (2, 1800.0, 'Exceeded allowed attempts 2 in interval 30m0s and mode is "fail"'),
        (1, 3600.0, 'Exceeded allowed attempts 1 in interval 1h0m0s and mode is "fail"'),
        (3, 90.0, 'Exceeded allowed attempts 3 in interval 1m30s and mode is "fail"'),
        (5, 10.0, 'Exceeded allowed attempts 5 in interval 10s and mode is "fail"'),
        (1, 5400.0, 'Exceeded allowed attempts 1 in interval 1h30m0s and mode is "fail"'),
        (1, 1.5, 'Exceeded allowed attempts 1 in interval 1.5s and mode is "fail"'),
        (1, 0.5, 'Exceeded allowed attempts 1 in interval 500ms and mode is "fail"'),
    ],
)
def test_the_fail_reason_prints_the_interval_as_go_does(
    attempts: int, interval: float, reason: str
) -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=attempts, interval=interval), clock, *[0.0] * attempts)
    decisions = exits(track, clock, [interval / 10] * (attempts + 1))
    assert decisions[-1] == Decision(False, 0.0, reason)


@pytest.mark.parametrize(
    ("interval", "text"), [(90.5, "1m30.5s"), (61.25, "1m1.25s"), (3600.5, "1h0m0.5s")]
)
def test_the_fail_reason_of_a_fractional_interval_over_a_minute(interval: float, text: str) -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=1, interval=interval), clock, 0.0)
    decisions = exits(track, clock, [1, 2])
    assert decisions[-1].reason == (
        f'Exceeded allowed attempts 1 in interval {text} and mode is "fail"'
    )


def test_mode_fail_keeps_refusing_within_the_interval() -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=1, interval=600.0), clock, 0.0)
    decisions = exits(track, clock, [1, 2, 3, 600])
    assert [d.restart for d in decisions] == [True, False, False, False]


def test_mode_delay_waits_for_the_end_of_the_interval() -> None:
    clock = Clock()
    policy = RestartPolicy(attempts=2, interval=600.0, delay=15.0, mode="delay")
    track = tracker(policy, clock, 0.0, 0.0, 0.0)
    assert exits(track, clock, [100, 200, 300]) == [
        Decision(True, 15.0, WITHIN),
        Decision(True, 15.0, WITHIN),
        Decision(True, 300.0, DELAYING),  # the interval began at T0: it ends at T0 + 600
    ]
    # It runs again at T0 + 600, exits after the interval: a new one, counted from 1.
    assert exits(track, clock, [650]) == [Decision(True, 15.0, WITHIN)]
    assert track.count == 1


@pytest.mark.parametrize(
    ("at", "delay"),
    [
        (590.0, 10.0),
        (599.5, 0.5),
        (600.0, 0.0),  # the interval's last instant is still in it (Nomad: now.After(end))
    ],
)
def test_mode_delay_delay_is_what_is_left_of_the_interval(at: float, delay: float) -> None:
    clock = Clock()
    policy = RestartPolicy(attempts=1, interval=600.0, delay=1.0, mode="delay")
    track = tracker(policy, clock, 0.0)
    last = exits(track, clock, [1, at])[-1]
    assert (last.restart, last.reason) == (True, DELAYING)
    assert last.delay == pytest.approx(delay)


def test_mode_delay_counts_beyond_the_attempts_within_the_interval() -> None:
    clock = Clock()
    policy = RestartPolicy(attempts=1, interval=600.0, delay=1.0, mode="delay")
    track = tracker(policy, clock, 0.0)
    decisions = exits(track, clock, [1, 100, 400])
    assert [(d.delay, d.reason) for d in decisions] == [
        (1.0, WITHIN),
        (500.0, DELAYING),
        (200.0, DELAYING),
    ]


def test_the_count_resets_after_the_interval() -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=2, interval=60.0, delay=1.0), clock, *[0.0] * 4)
    first = exits(track, clock, [1, 2])
    assert track.count == 2
    later = exits(track, clock, [61, 62, 63])  # 61 is past T0 + 60: a new interval from there
    assert [d.restart for d in first + later] == [True, True, True, True, False]
    assert later[-1].reason.startswith("Exceeded allowed attempts 2 in interval 1m0s")


@pytest.mark.parametrize(
    ("times", "restarts"),
    [
        ([1799, 1799.5, 1800], [True, True, False]),  # all within the first interval
        ([1801, 1802, 1803], [True, True, False]),  # a new interval from 1801
        ([1801, 1802, 3602], [True, True, True]),  # 3602 is past 1801 + 1800
        ([1, 1802, 1803], [True, True, True]),  # 1802 starts an interval; 1803 is its 2nd
        ([1, 2, 1801], [True, True, True]),
    ],
)
def test_the_interval_starts_when_the_tracker_is_made(
    times: list[float], restarts: list[bool]
) -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=2, interval=1800.0), clock, *[0.0] * len(times))
    assert [d.restart for d in exits(track, clock, times)] == restarts


@pytest.mark.parametrize("mode", ["fail", "delay"])
def test_attempts_zero_never_restarts(mode: str) -> None:
    clock = Clock()
    track = tracker(RestartPolicy(attempts=0, mode=mode), clock)  # no draws: none taken
    decisions = exits(track, clock, [0, 1, 4000])
    assert decisions == [Decision(False, 0.0, NO_RESTARTS)] * 3
    assert track.count == 0


def test_the_jitter_is_drawn_once_per_restart_within_the_policy() -> None:
    clock = Clock()
    draws = Draws(0.0, 0.5, 0.999)
    track = RestartTracker(RestartPolicy(attempts=3, delay=10.0), clock, draws)
    decisions = exits(track, clock, [1, 2, 3, 4])
    assert [d.delay for d in decisions] == pytest.approx([10.0, 11.25, 12.4975, 0.0])
    assert draws.values == []
    assert decisions[-1].restart is False
