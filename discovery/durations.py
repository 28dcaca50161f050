"""Go-style durations ("5s", "1m30s", "250ms"), as Consul and Nomad write them.  Pure.

Used by the config files and by the HTTP API (Consul's check `Interval`,
`TTL`, `Timeout`, and blocking queries' `wait`).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from discovery.errors import ValidationError

_NS_PER_UNIT = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9}
_NS_PER_UNIT |= {"m": 60 * 10**9, "h": 3600 * 10**9}
# Go's time.ParseDuration, which Consul and Nomad use: "1h30m", "250ms", "1.5s".
# Go's time.Duration is an int64 of nanoseconds: ParseDuration refuses longer ones; here
# they would overflow float division (OverflowError) once turned into seconds.
MAX_DURATION_NS = 2**63 - 1
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: object, fieldname: str) -> float:
    """Seconds from a Go duration string ("5s", "1m30s", "250ms") or a number of seconds."""
    return duration_ns(value, fieldname) / 10**9


def duration_ns(value: object, fieldname: str) -> int:
    """Nanoseconds from a duration; ValidationError naming `fieldname` if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValidationError(fieldname, 'must be a duration like "5s" or a number of seconds')
    if isinstance(value, int | float):
        try:
            ns = Decimal(str(value)) * 10**9
        except (InvalidOperation, ValueError):  # ValueError: str() of an int over 4300 digits
            raise ValidationError(fieldname, f"{value!r} is not a duration") from None
    elif value == "0":
        ns = Decimal(0)
    else:
        ns, pos = Decimal(0), 0
        while pos < len(value) or pos == 0:
            part = _DURATION_PART.match(value, pos)
            if part is None:
                raise ValidationError(
                    fieldname,
                    f"{value!r} is not a duration (a number with a unit: ns, us, ms, s, m, h;"
                    ' like "5s", "250ms", "1m30s")',
                )
            ns += Decimal(part[1]) * _NS_PER_UNIT[part[2]]
            pos = part.end()
    if not ns.is_finite():
        raise ValidationError(fieldname, f"{value!r} is not a duration")
    if ns < 0:
        raise ValidationError(fieldname, f"{value!r} must not be negative")
    if ns > MAX_DURATION_NS:
        raise ValidationError(fieldname, f"{_short(value)} is longer than {MAX_DURATION_NS} ns")
    return int(ns)


def _short(value: object) -> str:
    """`value` for an error message, cut to 40 characters (str() of a huge int may fail)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else "a number"
    return text if len(text) <= 40 else f"{text[:37]}..."


def positive_seconds(value: object, fieldname: str) -> float:
    """A duration longer than zero, in seconds."""
    seconds = parse_duration(value, fieldname)
    if seconds <= 0:
        raise ValidationError(fieldname, "must be longer than 0s")
    return seconds


def format_duration(seconds: float) -> str:
    """The Go spelling of a duration ("10s", "1m30s", "1m30.5s", "250ms"), as Consul
    and Nomad print it (to the millisecond)."""
    ms = round(seconds * 1000)
    if 0 < ms < 1000:
        return f"{ms}ms"
    whole, frac = divmod(ms, 1000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    fraction = f".{frac:03d}".rstrip("0") if frac else ""
    return f"{text}{secs}{fraction}s"
