"""The exceptions waypost raises.  Pure: no I/O.

    WaypostError                  base of everything below
    ├── ValidationError           bad input; names the field (API 400, config error)
    ├── ConfigError               a config file is unreadable or invalid; names file, line, key
    ├── NotFoundError             an instance, check or allocation that does not exist
    └── StateError                the data dir / database cannot be used

Errors are translated once, at the adapter that meets them (a socket, SQLite,
a parser), and carry what is needed to act on them.
"""

from __future__ import annotations


class WaypostError(Exception):
    """Base class of all waypost errors."""


class ValidationError(WaypostError):
    """Input rejected; `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def within(self, prefix: str) -> ValidationError:
        """The same error with `prefix` put before the field (`service[2].port`)."""
        return ValidationError(f"{prefix}.{self.field}" if prefix else self.field, self.message)


class ConfigError(WaypostError):
    """A configuration file could not be used."""

    def __init__(self, path: str, message: str, *, line: int | None = None, key: str = "") -> None:
        where = f"{path}:{line}" if line else path
        what = f" {key}:" if key else ""
        super().__init__(f"{where}:{what} {message}")
        self.path = path
        self.line = line
        self.key = key
        self.message = message


class NotFoundError(WaypostError):
    """The named object does not exist."""


class StateError(WaypostError):
    """The persistent state cannot be opened or written."""
