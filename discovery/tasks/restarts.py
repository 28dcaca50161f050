"""Whether a task that stopped runs again, and when.  Pure: clock and randomness injected.

Nomad's restart tracker (client/allocrunner/taskrunner/restarts), for service
jobs (a task restarts after a successful exit too):

- `attempts` restarts are allowed per `interval`; the interval starts when the
  tracker is made and a new one starts at the first exit after it ends (the
  count goes back to 0);
- within the attempts: restart after `delay` plus up to 25% of it, drawn at
  random (Nomad's jitter: delay + rand[0, delay) * 0.25);
- beyond them: mode `fail` does not restart ("Exceeded allowed attempts 2 in
  interval 30m0s and mode is \"fail\""), mode `delay` waits for the end of the
  interval, then counts again;
- `attempts = 0` never restarts ("Policy allows no restarts").

A task the agent kills (a stop) is not a restart; a start error counts as a
failed run (Nomad treats driver start errors as recoverable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from discovery.durations import format_duration
from discovery.tasks.spec import RestartPolicy

JITTER = 0.25  # Nomad's restarts.jitter
REASON_NO_RESTARTS = "Policy allows no restarts"
REASON_WITHIN_POLICY = "Restart within policy"
REASON_DELAY = "Exceeded allowed attempts, applying a delay"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after an exit: restart after `delay` seconds, or not (`reason` says why)."""

    restart: bool
    delay: float = 0.0
    reason: str = ""


class RestartTracker:
    """One task's restart count within its interval.  `clock()` is in seconds."""

    def __init__(
        self, policy: RestartPolicy, clock: Callable[[], float], rand: Callable[[], float]
    ) -> None:
        """`rand()` draws from [0, 1) (the jitter's randomness)."""
        self._policy = policy
        self._clock = clock
        self._rand = rand
        self._start = clock()
        self.count = 0

    def decide(self) -> Decision:
        """The task stopped on its own (an exit, or a start that failed): what next."""
        policy = self._policy
        if policy.attempts == 0:
            return Decision(False, reason=REASON_NO_RESTARTS)
        now = self._clock()
        if now > self._start + policy.interval:
            self.count, self._start = 0, now
        self.count += 1
        if self.count > policy.attempts:
            if policy.mode == "fail":
                return Decision(
                    False,
                    reason=f"Exceeded allowed attempts {policy.attempts} in interval"
                    f' {format_duration(policy.interval)} and mode is "fail"',
                )
            return Decision(True, max(0.0, self._start + policy.interval - now), REASON_DELAY)
        delay = policy.delay * (1 + self._rand() * JITTER)
        return Decision(True, delay, REASON_WITHIN_POLICY)
