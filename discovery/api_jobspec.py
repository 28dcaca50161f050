"""`POST /v1/jobs/parse`: an HCL jobspec as Nomad's job JSON.  Pure: no I/O.

    POST|PUT /v1/jobs/parse   {"JobHCL": "...", "Canonicalize": bool, "Variables": "..."}
                              -> the Job object itself (not wrapped in {"Job": ...}),
                              as Nomad's JobsParseRequest answers it

`Variables` is the text of an HCL variables file (`port = 8080`), as `nomad job
run -var-file` sends it.  `Canonicalize` fills in Nomad's defaults of the fields
waypost runs (discovery.jobspec.canonicalize).  The HCL is read by
discovery.hclfile (python-hcl2: text in, a tree out, no I/O) and mapped by
discovery.jobspec.  A parse changes nothing, so it needs a read token when ACLs
are on (Nomad's `parse-job` capability, granted with read).

Error handling: a body that is not a parse request, or a jobspec with an error,
is a 400 whose message names the line and the HCL key (`job.hcl:12:
job.web.group.api.count: must be a whole number`) and whose field is the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from discovery.acl import Access
from discovery.api import ApiError, ApiRequest, ApiResponse, Route
from discovery.errors import ConfigError
from discovery.hclfile import parse_jobspec
from discovery.jobspec import canonicalize
from discovery.registry import Snapshot

SOURCE = "job.hcl"  # the name errors give the posted jobspec
_KEYS = frozenset({"JobHCL", "Canonicalize", "Variables", "HCLv1"})


def _request(body: bytes) -> Mapping[str, Any]:
    try:
        raw = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: not JSON: {exc}", "body") from None
    if not isinstance(raw, Mapping):
        raise ApiError(400, 'body: must be {"JobHCL": "job \\"x\\" { ... }"}', "body")
    for key in raw:
        if key not in _KEYS:
            raise ApiError(400, f"{key}: unknown field", key)
    if raw.get("HCLv1"):
        raise ApiError(400, "HCLv1: HCL1 jobspecs are not supported (HCL2 only)", "HCLv1")
    for key in ("JobHCL", "Variables"):
        if not isinstance(raw.get(key, ""), str):
            raise ApiError(400, f"{key}: must be a string", key)
    if not isinstance(raw.get("Canonicalize", False), bool):
        raise ApiError(400, "Canonicalize: must be true or false", "Canonicalize")
    if not raw.get("JobHCL"):
        raise ApiError(400, "JobHCL: is required", "JobHCL")
    return raw


def parse(req: ApiRequest, _snap: Snapshot) -> ApiResponse:
    raw = _request(req.body)
    try:
        spec = parse_jobspec(raw["JobHCL"], SOURCE, variables_text=raw.get("Variables") or "")
    except ConfigError as err:
        raise ApiError(400, str(err), err.key or "JobHCL") from None
    job: dict[str, Any] = spec.body["Job"]
    return ApiResponse(canonicalize(job) if raw.get("Canonicalize") else job)


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/jobs/parse", Access.READ, read=parse),
    Route("PUT", "/v1/jobs/parse", Access.READ, read=parse),
)
