"""ACL policy decisions and the `acl` config block.  Pure."""

from __future__ import annotations

import pytest

from discovery.acl import Access, AclSettings, allowed, redact
from discovery.config import parse_config
from discovery.errors import ConfigError
from discovery.hclfile import parse_hcl

WRITER = "writer-secret-0001"
READER = "reader-secret-0001"
ON = AclSettings(enabled=True, tokens={WRITER: "write", READER: "read"})


@pytest.mark.parametrize(
    ("settings", "token", "access", "expected"),
    [
        (AclSettings(), None, Access.WRITE, True),  # ACLs off: everything allowed
        (ON, None, Access.NONE, True),
        (ON, None, Access.READ, False),
        (ON, None, Access.WRITE, False),
        (ON, "unknown-token-99", Access.READ, False),
        (ON, READER, Access.READ, True),
        (ON, READER, Access.WRITE, False),
        (ON, WRITER, Access.READ, True),
        (ON, WRITER, Access.WRITE, True),
        (ON, "", Access.READ, False),
        (AclSettings(enabled=True, default_policy="read"), None, Access.READ, True),
        (AclSettings(enabled=True, default_policy="read"), None, Access.WRITE, False),
        (AclSettings(enabled=True, default_policy="read"), "nope-nope-nope", Access.READ, True),
    ],
)
def test_allowed(settings: AclSettings, token: str | None, access: Access, expected: bool) -> None:
    assert allowed(settings, token, access) is expected


def test_settings_repr_never_shows_tokens() -> None:
    assert WRITER not in repr(ON) and READER not in repr(ON)
    assert WRITER not in str(ON)


def test_redact_never_shows_the_token() -> None:
    assert WRITER not in redact(WRITER)
    assert redact(None) == "<none>"


def test_acl_block_parses() -> None:
    text = f'acl {{\n  enabled = true\n  tokens = {{\n    "{WRITER}" = "write"\n  }}\n}}\n'
    acl = parse_config([parse_hcl(text, "a.hcl")]).acl
    assert acl.enabled is True
    assert acl.default_policy == "deny"
    assert dict(acl.tokens) == {WRITER: "write"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('tokens = {\n    "short" = "write"\n  }', "a.hcl:2: acl.tokens[0]: a token must be"),
        (
            f'tokens = {{\n    "{WRITER}" = "admin"\n  }}',
            "acl.tokens[0]: must be one of read, write",
        ),
        ('default_policy = "write"', "a.hcl:2: acl.default_policy: must be one of deny, read"),
        ("enabled = 1", "a.hcl:2: acl.enabled: must be true or false"),
        ("bogus = true", "a.hcl:2: acl.bogus: unknown key"),
    ],
)
def test_acl_block_errors(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config([parse_hcl(f"acl {{\n  {body}\n}}\n", "a.hcl")])
    assert message in str(err.value)
    assert "admin" not in str(err.value) or "admin" in body  # only what was written
    assert WRITER not in str(err.value)  # a secret is never echoed
