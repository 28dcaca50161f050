"""Reading objects of Nomad's API JSON: known, ignored and refused keys.  Pure: no I/O.

:class:`JsonObject` wraps one JSON object at a path (`Job.TaskGroups[0]`) and
checks its keys once: a key waypost reads is *known*, a documented Nomad key
that means nothing here is *ignored*, a Nomad key whose effect waypost cannot
give is refused as "not supported by waypost" (:data:`UNSUPPORTED`) unless it is
null, "", 0, false or a list of those (how `nomad job inspect` writes unused
features; an object, even `{}`, asks for the feature), and any
other key is an "unknown field" (a misspelling would otherwise drop a port or
a service silently).  Every error is a ValidationError naming the JSON path.
An ignored key with a value that is not empty (:func:`is_empty`: null, "", 0,
false, [] and {}, or lists and objects of those, as Nomad prints every field) is
reported on the `warnings` list the caller passes (`Job.Update: ignored (means
nothing on one host)`); the `quiet` ones (Nomad's own bookkeeping: indexes,
Status, Version) never are.

Durations (:func:`seconds`): integers are nanoseconds (what Nomad's API sends),
strings are Go durations ("10s").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from discovery.durations import MAX_DURATION_NS, duration_ns
from discovery.errors import ValidationError

# Nomad fields whose effect waypost cannot give: refused rather than silently dropped.
UNSUPPORTED = frozenset({"Connect", "Address", "DNS", "Expose", "Command", "Args", "Header"})
UNSUPPORTED |= frozenset({"Method", "Body", "GRPCService", "GRPCUseTLS", "AddressModeCheck"})
UNSUPPORTED |= frozenset({"Artifacts", "Templates", "Vault", "VolumeMounts", "Lifecycle"})
UNSUPPORTED |= frozenset({"DispatchPayload", "CSIPluginConfig", "Volumes"})


IGNORED = "ignored (means nothing on one host)"


def is_empty(value: object) -> bool:
    """null, "", 0, false, [] and {}, or a list or object of nothing but those."""
    if isinstance(value, Mapping):
        return all(is_empty(v) for v in value.values())
    if isinstance(value, list):
        return all(is_empty(v) for v in value)
    return not value


class JsonObject:
    """A JSON object at `path`, its keys checked against what is known and ignored."""

    def __init__(
        self,
        raw: object,
        path: str,
        known: Iterable[str],
        ignored: frozenset[str] = frozenset(),
        unsupported: frozenset[str] = UNSUPPORTED,
        *,
        warnings: list[str] | None = None,
        quiet: frozenset[str] = frozenset(),
    ) -> None:
        if not isinstance(raw, Mapping):
            raise ValidationError(path, "must be an object")
        wanted = set(known)
        for key, value in raw.items():
            if not isinstance(key, str) or (key not in wanted and key not in ignored):
                if key in unsupported:
                    if not isinstance(value, Mapping) and is_empty(value):
                        continue  # how Nomad's own JSON writes a feature left unused ("", null)
                    raise ValidationError(f"{path}.{key}", "is not supported by waypost")
                raise ValidationError(f"{path}.{key}", "unknown field")
            ignored_here = key not in wanted and key not in quiet and not is_empty(value)
            if ignored_here and warnings is not None:
                warnings.append(f"{path}.{key}: {IGNORED}")
        self.raw: Mapping[str, Any] = raw
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def get(self, key: str) -> Any:
        return self.raw.get(key)

    def text(self, key: str, default: str = "") -> str:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ValidationError(self.at(key), "must be a string")
        return value

    def items(self, key: str, limit: int) -> list[tuple[str, Any]]:
        """The elements of list `key` with their paths ([] when absent or null)."""
        value = self.raw.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValidationError(self.at(key), "must be a list")
        if len(value) > limit:
            raise ValidationError(self.at(key), f"has more than {limit} entries")
        return [(f"{self.at(key)}[{i}]", item) for i, item in enumerate(value)]

    def strings(self, key: str, limit: int) -> tuple[str, ...]:
        """List `key` of strings (() when absent or null)."""
        out = []
        for where, item in self.items(key, limit):
            if not isinstance(item, str):
                raise ValidationError(where, "must be a string")
            out.append(item)
        return tuple(out)

    def string_map(self, key: str, limit: int) -> tuple[tuple[str, str], ...]:
        """Object `key` of string values as sorted pairs (() when absent or null)."""
        value = self.raw.get(key)
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            raise ValidationError(self.at(key), "must be an object of strings")
        if len(value) > limit:
            raise ValidationError(self.at(key), f"has more than {limit} entries")
        for name, item in value.items():
            if not isinstance(item, str):
                raise ValidationError(f"{self.at(key)}.{name}", "must be a string")
            if "\x00" in name or "\x00" in item:
                raise ValidationError(f"{self.at(key)}.{name}", "must not contain NUL characters")
        return tuple(sorted(value.items()))

    def seconds(self, key: str, default: float) -> float:
        value = self.raw.get(key)
        return default if value is None else seconds(value, self.at(key))


def seconds(value: object, path: str) -> float:
    """A Nomad API duration: integer nanoseconds, or a Go duration string."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(path, 'must be nanoseconds (an integer) or a duration like "10s"')
    if isinstance(value, int):
        if value < 0:
            raise ValidationError(path, "must not be negative")
        if value > MAX_DURATION_NS:
            raise ValidationError(path, f"is longer than {MAX_DURATION_NS} ns")
        return value / 10**9
    return duration_ns(value, path) / 10**9


def ns(value: float) -> int:
    """Seconds as Nomad's integer nanoseconds."""
    return round(value * 10**9)
