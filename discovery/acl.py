"""ACL tokens: who may read and who may write.  Pure: no I/O.

Config (`acl { enabled, default_policy, tokens { "<secret>" = "read" | "write" } }`):
with ACLs enabled, a request's token (X-Consul-Token, X-Nomad-Token or
`Authorization: Bearer`) selects a policy; a write needs "write", a read needs
"read" or "write"; requests without a known token get `default_policy`
("deny" or "read"; Consul's anonymous token).  Tokens are secrets: nothing
here formats them into messages, and :func:`redact` masks them for logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from discovery.errors import ValidationError


class Access(Enum):
    """What a token must allow for a route when ACLs are enabled."""

    NONE = "none"  # health endpoints for load balancers, metrics
    READ = "read"
    WRITE = "write"


POLICIES = ("deny", "read", "write")
_RANK = {"deny": 0, "read": 1, "write": 2}
_NEEDED = {Access.NONE: 0, Access.READ: 1, Access.WRITE: 2}
MIN_SECRET = 8  # shorter secrets are guessable; Consul's are UUIDs


@dataclass(frozen=True, slots=True)
class AclSettings:
    enabled: bool = False
    default_policy: str = "deny"  # for requests without a known token
    # secrets: never in reprs or logs
    tokens: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)


def parse_policy(value: object, fieldname: str, *, allowed: tuple[str, ...] = POLICIES) -> str:
    if value not in allowed:
        raise ValidationError(fieldname, f"must be one of {', '.join(allowed)}")
    assert isinstance(value, str)
    return value


def parse_default_policy(value: object, fieldname: str) -> str:
    """The policy of requests without a known token: "deny" or "read" (never "write")."""
    return parse_policy(value, fieldname, allowed=("deny", "read"))


def parse_tokens(value: object, fieldname: str) -> Mapping[str, str]:
    """`{ "<secret>" = "read" | "write" }`; secrets are not echoed in errors."""
    if not isinstance(value, Mapping):
        raise ValidationError(fieldname, 'must be a map of "<secret>" = "read" or "write"')
    out: dict[str, str] = {}
    for number, (secret, policy) in enumerate(value.items()):
        where = f"{fieldname}[{number}]"
        if not isinstance(secret, str) or len(secret) < MIN_SECRET:
            raise ValidationError(where, f"a token must be at least {MIN_SECRET} characters")
        out[secret] = parse_policy(policy, where, allowed=("read", "write"))
    return MappingProxyType(out)


def allowed(settings: AclSettings, token: str | None, access: Access) -> bool:
    """Whether a request carrying `token` may use a route needing `access`."""
    if not settings.enabled or access is Access.NONE:
        return True
    policy = settings.tokens.get(token, settings.default_policy) if token else None
    if policy is None:
        policy = settings.default_policy
    return _RANK[policy] >= _NEEDED[access]


def redact(token: str | None) -> str:
    """A token as it may appear in logs: its length only."""
    return "<none>" if not token else f"<token of {len(token)} characters>"
