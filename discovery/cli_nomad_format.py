"""What the `waypost job|alloc|service` commands print, as Nomad's CLI prints it.  Pure: no I/O.

Every function takes decoded API JSON (dicts as the agent answers them) and the
current time where a relative time is shown, and returns text; nothing here
talks to the network or reads the clock.  The shapes follow Nomad's
`command/` package (the file each one comes from is named in its docstring):

- tables are `ryanuber/columnize` as Nomad configures it (:func:`format_list`:
  columns padded to the widest cell, two spaces between, empty cells as
  `<none>`; :func:`format_kv`: `key = value`);
- times are Go's `2006-01-02T15:04:05Z07:00` in the local zone (`Z` when UTC,
  :func:`format_time`) or Nomad's `prettyTimeDiff` ("1m2s ago",
  :func:`pretty_time_diff`); a zero time prints as nothing, or `N/A` for task
  times;
- identifiers are cut to 8 characters unless `-verbose` (Nomad's `shortId`).

Colour is never emitted (Nomad's `-no-color`).  Missing keys read as Go's zero
values, so an answer from an older or newer agent still prints; nothing here
raises on odd input except on values that are not JSON-shaped at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

Json = dict[str, Any]

SHORT_ID = 8  # Nomad's shortId: identifiers in tables
FULL_ID = 36  # Nomad's fullId: -verbose
EMPTY = "<none>"  # columnize's Empty as Nomad's formatList sets it
NS = 1_000_000_000
GO_ZERO_YEAR = 1  # Go's zero time.Time is year 1

# scheduler/annotate.go: the names of the updates of a task group in a plan
_UPDATE_NAMES = (
    ("Ignore", "ignore"),
    ("Place", "create"),
    ("Migrate", "migrate"),
    ("Stop", "destroy"),
    ("Canary", "canary"),
    ("InPlaceUpdate", "in-place update"),
    ("DestructiveUpdate", "create/destroy update"),
)
_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


# -- columnize ------------------------------------------------------------------------


def columnize(rows: Sequence[str], *, glue: str = "  ", empty: str = "") -> str:
    """`columnize.Format`: `|`-separated cells aligned in columns, the last one unpadded."""
    cells = [[c.strip() or empty for c in row.split("|")] for row in rows]
    widths: list[int] = []
    for row in cells:
        for i, cell in enumerate(row):
            if i == len(widths):
                widths.append(len(cell))
            else:
                widths[i] = max(widths[i], len(cell))
    lines = []
    for row in cells:
        parts = [cell.ljust(widths[i]) + glue for i, cell in enumerate(row[:-1])]
        lines.append("".join(parts) + row[-1])
    return "\n".join(lines)


def format_list(rows: Sequence[str]) -> str:
    """Nomad's formatList: a table whose empty cells read `<none>` (awk-able)."""
    return columnize(rows, empty=EMPTY)


def format_kv(rows: Sequence[str]) -> str:
    """Nomad's formatKV: `key|value` rows as aligned `key = value` lines."""
    return columnize(rows, glue=" = ", empty=EMPTY)


def limit(text: str, length: int) -> str:
    return text[:length]


def quote(text: object) -> str:
    """Go's `%q` of a string, close enough for identifiers and values (JSON escapes)."""
    return json.dumps(str(text), ensure_ascii=False)


# -- time -----------------------------------------------------------------------------


def format_time(nanos: int, tz: tzinfo | None = None) -> str:
    """Nomad's formatTime of Unix nanoseconds: ISO 8601 to the second; "" for zero."""
    if nanos < NS:
        return ""
    moment = datetime.fromtimestamp(nanos // NS, tz=UTC).astimezone(tz)
    offset = moment.utcoffset() or timedelta(0)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if not offset:
        return text + "Z"
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def parse_go_time(text: object) -> int:
    """Go's time.Time JSON (RFC 3339, nanoseconds) as Unix nanoseconds; 0 for zero or junk."""
    if not isinstance(text, str):
        return 0
    found = _RFC3339.match(text)
    if found is None:
        return 0
    year, month, day, hour, minute, second, frac, zone = found.groups()
    if int(year) <= GO_ZERO_YEAR:
        return 0
    tz = UTC
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    moment = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
    )
    nanos = int((frac or "0").ljust(9, "0")[:9])
    return int(moment.timestamp()) * NS + nanos


def format_task_time(text: object, tz: tzinfo | None = None) -> str:
    """alloc_status.go's formatTaskTimes: `N/A` for a zero time."""
    nanos = parse_go_time(text)
    return format_time(nanos, tz) if nanos else "N/A"


def pretty_time_diff(first_ns: int, now_ns: int) -> str:
    """helpers.go's prettyTimeDiff: the two largest non-zero periods, "ago" or "from now"."""
    if first_ns <= 0:
        return ""
    first, now = _round_seconds(first_ns), _round_seconds(now_ns)
    suffix = "ago" if now >= first else "from now"
    left = abs(now - first)
    periods: list[str] = []  # most significant first
    secs, left = left % 60, left // 60
    mins, left = left % 60, left // 60
    hrs, left = left % 24, left // 24
    days, left = left % 30, left // 30
    months, years = left % 12, left // 12
    for value, unit in ((years, "y"), (months, "mo"), (days, "d"), (hrs, "h"), (mins, "m")):
        if value:
            periods.append(f"{value}{unit}")
    if secs:
        periods.append(f"{secs}s")
    if not periods:
        return f"0s {suffix}"
    return "".join(periods[:2]) + f" {suffix}"


def _round_seconds(nanos: int) -> int:
    return (nanos + NS // 2) // NS


def format_duration(nanos: int) -> str:
    """Go's time.Duration String() for the durations a task event carries (`15s`, `1m30s`)."""
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < NS:
        for unit, size in (("ms", 10**6), ("µs", 10**3)):
            if nanos >= size:
                return f"{sign}{_trim(nanos / size)}{unit}"
        return f"{sign}{nanos}ns"
    hours, rest = divmod(nanos, 3600 * NS)
    minutes, rest = divmod(rest, 60 * NS)
    seconds = _trim(rest / NS)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


# -- ids ------------------------------------------------------------------------------


def sanitize_uuid_prefix(prefix: str) -> str:
    """helpers.go's sanitizeUUIDPrefix: an even number of hex digits (hyphens not counted)."""
    digits = len(prefix) - prefix.count("-")
    return prefix[: len(prefix) - digits % 2]


# -- jobs -----------------------------------------------------------------------------


def status_string(status: str, stop: bool) -> str:
    return f"{status} (stopped)" if stop else status


def render_job_list(jobs: Sequence[Json]) -> str:
    """job_status.go's createStatusListOutput: `ID  Type  Priority  Status  Submit Date`."""
    if not jobs:
        return "No running jobs"
    rows = ["ID|Type|Priority|Status|Submit Date"]
    for job in jobs:
        kind = str(job.get("Type", ""))
        if job.get("Periodic"):
            kind += "/periodic"
        if job.get("ParameterizedJob"):
            kind += "/parameterized"
        rows.append(
            "|".join(
                (
                    str(job.get("ID", "")),
                    kind,
                    str(job.get("Priority", 0)),
                    status_string(str(job.get("Status", "")), bool(job.get("Stop"))),
                    format_time(int(job.get("SubmitTime") or 0)),
                )
            )
        )
    return format_list(rows)


def render_job_basic(job: Json) -> str:
    """The `key = value` head of job_status.go's single-job output."""
    rows = [
        f"ID|{job.get('ID', '')}",
        f"Name|{job.get('Name', '')}",
        f"Submit Date|{format_time(int(job.get('SubmitTime') or 0))}",
        f"Type|{job.get('Type', '')}",
        f"Priority|{job.get('Priority', 0)}",
        f"Datacenters|{','.join(job.get('Datacenters') or [])}",
        f"Namespace|{job.get('Namespace') or 'default'}",
        f"Node Pool|{job.get('NodePool') or 'default'}",
        f"Status|{status_string(str(job.get('Status', '')), bool(job.get('Stop')))}",
        f"Periodic|{_go_bool(job.get('Periodic'))}",
        f"Parameterized|{_go_bool(job.get('ParameterizedJob'))}",
    ]
    return format_kv(rows)


def _go_bool(value: object) -> str:
    return "true" if value else "false"


def render_summary(summary: Json) -> str:
    """outputJobSummary: `Task Group  Queued  Starting  Running  Failed  Complete ...`."""
    keys = ("Queued", "Starting", "Running", "Failed", "Complete", "Lost", "Unknown")
    rows = ["Task Group|" + "|".join(keys)]
    groups: Mapping[str, Json] = summary.get("Summary") or {}
    for name in sorted(groups):
        counts = groups[name]
        rows.append("|".join([name, *(str(counts.get(k, 0)) for k in keys)]))
    return format_list(rows)


def render_alloc_list(
    stubs: Sequence[Json], now_ns: int, *, verbose: bool = False, tz: tzinfo | None = None
) -> str:
    """formatAllocListStubs: the allocations table of `job status` and ambiguous prefixes."""
    if not stubs:
        return "No allocations placed"
    length = FULL_ID if verbose else SHORT_ID
    if verbose:
        rows = ["ID|Eval ID|Node ID|Node Name|Task Group|Version|Desired|Status|Created|Modified"]
    else:
        rows = ["ID|Node ID|Task Group|Version|Desired|Status|Created|Modified"]
    for a in stubs:
        created, modified = int(a.get("CreateTime") or 0), int(a.get("ModifyTime") or 0)
        if verbose:
            head = [
                limit(str(a.get("ID", "")), length),
                limit(str(a.get("EvalID", "")), length),
                limit(str(a.get("NodeID", "")), length),
                str(a.get("NodeName", "")),
            ]
            when = [format_time(created, tz), format_time(modified, tz)]
        else:
            head = [limit(str(a.get("ID", "")), length), limit(str(a.get("NodeID", "")), length)]
            when = [pretty_time_diff(created, now_ns), pretty_time_diff(modified, now_ns)]
        rest = [
            str(a.get("TaskGroup", "")),
            str(a.get("JobVersion", 0)),
            str(a.get("DesiredStatus", "")),
            str(a.get("ClientStatus", "")),
        ]
        rows.append("|".join([*head, *rest, *when]))
    return format_list(rows)


def render_evaluations(evals: Sequence[Json], *, verbose: bool = False) -> str:
    """The Evaluations table of `job status -evals`."""
    length = FULL_ID if verbose else SHORT_ID
    rows = ["ID|Priority|Triggered By|Status|Placement Failures"]
    for e in evals:
        failures = "true" if e.get("FailedTGAllocs") else "false"
        if e.get("Status") == "blocked":
            failures = "N/A - In Progress"
        rows.append(
            "|".join(
                (
                    limit(str(e.get("ID", "")), length),
                    str(e.get("Priority", 0)),
                    str(e.get("TriggeredBy", "")),
                    str(e.get("Status", "")),
                    failures,
                )
            )
        )
    return format_list(rows)


def render_job_status(
    job: Json,
    summary: Json | None,
    allocs: Sequence[Json],
    now_ns: int,
    *,
    evals: Sequence[Json] | None = None,
    verbose: bool = False,
    tz: tzinfo | None = None,
) -> str:
    """`job status JOB`: the head, Summary, (Evaluations,) Allocations."""
    parts = [render_job_basic(job)]
    if summary is not None:
        parts += ["", "Summary", render_summary(summary)]
    if evals is not None:
        parts += ["", "Evaluations", render_evaluations(evals, verbose=verbose)]
    parts += ["", "Allocations", render_alloc_list(allocs, now_ns, verbose=verbose, tz=tz)]
    return "\n".join(parts)


# -- allocations ----------------------------------------------------------------------


def render_alloc_status(
    alloc: Json, now_ns: int, *, verbose: bool = False, tz: tzinfo | None = None
) -> str:
    """alloc_status.go: the head, the addresses, then each task's state and recent events."""
    length = FULL_ID if verbose else SHORT_ID
    created, modified = int(alloc.get("CreateTime") or 0), int(alloc.get("ModifyTime") or 0)
    if verbose:
        when = (format_time(created, tz), format_time(modified, tz))
    else:
        when = (pretty_time_diff(created, now_ns), pretty_time_diff(modified, now_ns))
    job: Json = alloc.get("Job") or {}
    version = alloc.get("JobVersion", job.get("Version", 0))
    rows = [
        f"ID|{alloc.get('ID', '')}",
        f"Eval ID|{limit(str(alloc.get('EvalID', '')), length)}",
        f"Name|{alloc.get('Name', '')}",
        f"Node ID|{limit(str(alloc.get('NodeID', '')), length)}",
        f"Node Name|{alloc.get('NodeName', '')}",
        f"Job ID|{alloc.get('JobID', '')}",
        f"Job Version|{version}",
        f"Client Status|{alloc.get('ClientStatus', '')}",
        f"Client Description|{alloc.get('ClientDescription', '')}",
        f"Desired Status|{alloc.get('DesiredStatus', '')}",
        f"Desired Description|{alloc.get('DesiredDescription', '')}",
        f"Created|{when[0]}",
        f"Modified|{when[1]}",
    ]
    parts = [format_kv(rows)]
    addresses = render_alloc_addresses(alloc)
    if addresses:
        parts += ["", addresses]
    states: Mapping[str, Json] = alloc.get("TaskStates") or {}
    for task in sorted(states):
        state = states[task]
        parts += ["", f"Task {quote(task)} is {quote(state.get('State', ''))}"]
        parts.append(render_task_status(state, tz))
    return "\n".join(parts)


def render_alloc_addresses(alloc: Json) -> str:
    """formatAllocNetworkInfo: `Label  Dynamic  Address` under the network mode; "" if no ports."""
    shared: Json = (alloc.get("AllocatedResources") or {}).get("Shared") or {}
    networks: Sequence[Json] = shared.get("Networks") or []
    if not networks:
        return ""
    network = networks[0]
    rows = ["Label|Dynamic|Address"]

    def row(label: str, port: Json, host_ip: str) -> str:
        text = f"{label}|yes|{host_ip}:{port.get('Value', 0)}"
        to = int(port.get("To") or 0)
        shown = to > 0 and to != port.get("Value")  # host mode: `To` is the port itself
        return text + (f" -> {to}" if shown else "")

    ports: Sequence[Json] = shared.get("Ports") or []
    if ports:
        rows += [row("*" + str(p.get("Label", "")), p, str(p.get("HostIP", ""))) for p in ports]
    else:
        ip = str(network.get("IP", ""))
        listed = [*(network.get("DynamicPorts") or []), *(network.get("ReservedPorts") or [])]
        rows += [row(str(p.get("Label", "")), p, ip) for p in listed]
    if len(rows) == 1:
        return ""
    mode = network.get("Mode") or ""
    head = f"Allocation Addresses (mode = {quote(mode)}):" if mode else "Allocation Addresses:"
    return head + "\n" + format_list(rows)


def render_task_status(state: Json, tz: tzinfo | None = None) -> str:
    """outputTaskStatus: the Task Events head and the Recent Events table, newest first."""
    basic = [
        f"Started At|{format_task_time(state.get('StartedAt'), tz)}",
        f"Finished At|{format_task_time(state.get('FinishedAt'), tz)}",
        f"Total Restarts|{state.get('Restarts', 0)}",
        f"Last Restart|{format_task_time(state.get('LastRestart'), tz)}",
    ]
    rows = ["Time|Type|Description"]
    for event in reversed(state.get("Events") or []):
        message = str(event.get("DisplayMessage") or "") or display_message(event)
        rows.append(
            f"{format_time(int(event.get('Time') or 0), tz)}|{event.get('Type', '')}|{message}"
        )
    return "\n".join(["Task Events:", format_kv(basic), "", "Recent Events:", format_list(rows)])


def display_message(event: Json) -> str:
    """alloc_status.go's buildDisplayMessage, for events without a DisplayMessage."""
    kind = event.get("Type", "")
    message = str(event.get("Message") or "")
    if kind == "Started":
        return "Task started by client"
    if kind == "Received":
        return "Task received by client"
    if kind == "Driver Failure":
        return str(event.get("DriverError") or "") or "Failed to start task"
    if kind == "Setup Failure":
        return str(event.get("SetupError") or "") or "Task setup failed"
    if kind == "Killing":
        if event.get("KillReason"):
            return f"Killing task: {event['KillReason']}"
        if event.get("KillTimeout"):
            timeout = format_duration(int(event["KillTimeout"]))
            return f"Sent interrupt. Waiting {timeout} before force killing"
        return "Sent interrupt"
    if kind == "Killed":
        return str(event.get("KillError") or "") or "Task successfully killed"
    if kind == "Terminated":
        parts = [f"Exit Code: {event.get('ExitCode', 0)}"]
        if event.get("Signal"):
            parts.append(f"Signal: {event['Signal']}")
        if message:
            parts.append(f"Exit Message: {quote(message)}")
        return ", ".join(parts)
    if kind == "Restarting":
        delay = f"Task restarting in {format_duration(int(event.get('StartDelay') or 0))}"
        reason = str(event.get("RestartReason") or "")
        within = "Restart within policy"  # api.AllocRestartReasonWithinPolicy
        return f"{reason} - {delay}" if reason and reason != within else delay
    if kind == "Not Restarting":
        return str(event.get("RestartReason") or "") or "Task exceeded restart policy"
    if kind == "Sibling Task Failed":
        sibling = event.get("FailedSibling")
        return f"Task's sibling {quote(sibling)} failed" if sibling else "Task's sibling failed"
    return message


def render_ambiguous_allocs(stubs: Sequence[Json], now_ns: int, *, verbose: bool = False) -> str:
    return "Prefix matched multiple allocations\n\n" + render_alloc_list(
        stubs, now_ns, verbose=verbose
    )


def lookup_task(alloc: Json) -> tuple[str, str]:
    """alloc_logs.go's lookupAllocTask: (the task, "") when the group has one, else ("", error)."""
    group = str(alloc.get("TaskGroup", ""))
    job: Json = alloc.get("Job") or {}
    tasks: list[str] = []
    for tg in job.get("TaskGroups") or []:
        if tg.get("Name") == group:
            tasks = [str(t.get("Name", "")) for t in tg.get("Tasks") or []]
    if not tasks:
        tasks = sorted(alloc.get("TaskStates") or {})
    if not tasks:
        return "", f"Could not find allocation task group: {group}"
    if len(tasks) == 1:
        return tasks[0], ""
    lines = [
        f"Allocation {quote(limit(str(alloc.get('ID', '')), SHORT_ID))} is running"
        " the following tasks:"
    ]
    lines += [f"  * {t}" for t in tasks]
    return "", "\n".join([*lines, "", "Please specify the task."])


def last_lines(data: bytes, count: int) -> bytes:
    """The last `count` lines of `data` (LineLimitReader: a final newline is not a line)."""
    if count <= 0:
        return b""
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(count):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1 :]


# -- services -------------------------------------------------------------------------


def render_service_list(namespaces: Sequence[Json]) -> str:
    """service_list.go's formatServiceListOutput: `Service Name  Tags`, sorted."""
    rows = ["Service Name|Tags"]
    for ns in sorted(namespaces, key=lambda n: str(n.get("Namespace", ""))):
        services = {str(s.get("ServiceName", "")): s for s in ns.get("Services") or []}
        for name in sorted(services):
            tags = sorted(str(t) for t in services[name].get("Tags") or [])
            rows.append(f"{name}|[{','.join(tags)}]")
    if len(rows) == 1:
        return "No service registrations found"
    return format_list(rows)


def format_address(address: str, port: int) -> str:
    """service_info.go's formatAddress: net.JoinHostPort (brackets for IPv6)."""
    if not port:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_service_info(regs: Sequence[Json], *, verbose: bool = False) -> str:
    """service_info.go: `Job ID  Address  Tags  Node ID  Alloc ID`, by job id; -verbose: k = v."""
    if not regs:
        return "No service registrations found"
    ordered = sorted(regs, key=lambda r: str(r.get("JobID", "")))  # stable: API order per job
    if verbose:
        blocks = []
        for r in ordered:
            rows = [
                f"ID|{r.get('ID', '')}",
                f"Service Name|{r.get('ServiceName', '')}",
                f"Namespace|{r.get('Namespace', '')}",
                f"Job ID|{r.get('JobID', '')}",
                f"Alloc ID|{r.get('AllocID', '')}",
                f"Node ID|{r.get('NodeID', '')}",
                f"Datacenter|{r.get('Datacenter', '')}",
                f"Address|{r.get('Address', '')}:{r.get('Port', 0)}",
                f"Tags|[{','.join(r.get('Tags') or [])}]",
            ]
            if "Health" in r:  # waypost's own: Nomad's registrations have no health
                rows.append(f"Health|{r['Health']}")
            blocks.append(format_kv(rows))
        return "\n\n".join(blocks)
    rows = ["Job ID|Address|Tags|Node ID|Alloc ID"]
    for r in ordered:
        address = format_address(str(r.get("Address", "")), int(r.get("Port") or 0))
        rows.append(
            "|".join(
                (
                    str(r.get("JobID", "")),
                    address,
                    f"[{','.join(r.get('Tags') or [])}]",
                    limit(str(r.get("NodeID", "")), SHORT_ID),
                    limit(str(r.get("AllocID", "")), SHORT_ID),
                )
            )
        )
    return format_list(rows)


# -- plans ----------------------------------------------------------------------------


def plan_exit_code(resp: Json) -> int:
    """job_plan.go's getExitCode: 0 no allocation created or destroyed, 1 some."""
    diff: Json = resp.get("Diff") or {}
    if diff.get("Type") == "None":
        return 0
    updates: Mapping[str, Json] = (resp.get("Annotations") or {}).get("DesiredTGUpdates") or {}
    keys = ("Stop", "Place", "Migrate", "DestructiveUpdate", "Canary")
    for counts in updates.values():
        if sum(int(counts.get(k) or 0) for k in keys) > 0:
            return 1
    return 0


def _marker(kind: object) -> str:
    return {"Added": "+ ", "Deleted": "- ", "Edited": "+/- "}.get(str(kind), "")


def _longest(fields: Sequence[Json], objects: Sequence[Json]) -> tuple[int, int]:
    field_len = max((len(str(f.get("Name", ""))) for f in fields), default=0)
    marker_len = max((len(_marker(d.get("Type"))) for d in [*fields, *objects]), default=0)
    return field_len, marker_len


def _field_diff(diff: Json, start: int, key_pad: int, value_pad: int) -> str:
    kind = diff.get("Type")
    head = f"{' ' * start}{_marker(kind)}{' ' * key_pad}{diff.get('Name', '')}: {' ' * value_pad}"
    old, new = quote(diff.get("Old", "")), quote(diff.get("New", ""))
    body = {"Added": new, "Deleted": old, "Edited": f"{old} => {new}"}.get(str(kind), new)
    notes = diff.get("Annotations") or []
    return head + body + (f" ({', '.join(notes)})" if notes else "")


def _object_diff(diff: Json, start: int, key_pad: int) -> str:
    marker = _marker(diff.get("Type"))
    out = f"{' ' * start}{marker}{' ' * key_pad}{diff.get('Name', '')} {{\n"
    fields, objects = diff.get("Fields") or [], diff.get("Objects") or []
    longest_field, longest_marker = _longest(fields, objects)
    out += _aligned(fields, objects, start + key_pad + 2, longest_field, longest_marker)
    return f"{out}\n{' ' * (start + len(marker) + key_pad)}}}"


def _aligned(
    fields: Sequence[Json], objects: Sequence[Json], start: int, longest_field: int, longest: int
) -> str:
    """job_plan.go's alignedFieldAndObjects."""
    out = ""
    for i, f in enumerate(fields):
        key_pad = longest - len(_marker(f.get("Type")))
        out += _field_diff(f, start, key_pad, longest_field - len(str(f.get("Name", ""))))
        if i + 1 != len(fields) or objects:
            out += "\n"
    for i, o in enumerate(objects):
        out += _object_diff(o, start, longest - len(_marker(o.get("Type"))))
        if i + 1 != len(objects):
            out += "\n"
    return out


def _group_updates(group: Json, annotations: Json) -> Mapping[str, int]:
    updates: Mapping[str, int] | None = group.get("Updates")
    if updates:
        return updates
    counts: Json = (annotations.get("DesiredTGUpdates") or {}).get(group.get("Name", "")) or {}
    return {name: int(counts[key]) for key, name in _UPDATE_NAMES if counts.get(key)}


def _task_diff(task: Json, start: int, task_pad: int, verbose: bool) -> str:
    kind = task.get("Type")
    out = f"{' ' * start}{_marker(kind)}{' ' * task_pad}Task: {quote(task.get('Name', ''))}"
    notes = task.get("Annotations") or []
    if notes:
        out += f" ({', '.join(notes)})"
    if kind == "None" or (kind in ("Added", "Deleted") and not verbose):
        return out
    fields, objects = task.get("Fields") or [], task.get("Objects") or []
    longest_field, longest_marker = _longest(fields, objects)
    return out + "\n" + _aligned(fields, objects, start + 2, longest_field, longest_marker)


def _group_diff(group: Json, annotations: Json, pad: int, verbose: bool) -> str:
    kind = group.get("Type")
    out = f"{_marker(kind)}{' ' * pad}Task Group: {quote(group.get('Name', ''))}"
    updates = _group_updates(group, annotations)
    if updates:
        out += " (" + ", ".join(f"{updates[k]} {k}" for k in sorted(updates)) + ")"
    out += "\n"
    fields, objects = group.get("Fields") or [], group.get("Objects") or []
    tasks: Sequence[Json] = group.get("Tasks") or []
    longest_field, longest_marker = _longest(fields, objects)
    longest_marker = max([longest_marker, *(len(_marker(t.get("Type"))) for t in tasks)])
    if kind == "Edited" or verbose:
        aligned = _aligned(fields, objects, pad + 2, longest_field, longest_marker)
        out += aligned + ("\n" if aligned else "")
    for task in tasks:
        task_pad = longest_marker - len(_marker(task.get("Type")))
        out += _task_diff(task, pad + 2, task_pad, verbose) + "\n"
    return out


def render_job_diff(resp: Json, *, verbose: bool = False) -> str:
    """job_plan.go's formatJobDiff: `+/- Job: "web"`, then each group and task changed."""
    job: Json = resp.get("Diff") or {}
    annotations: Json = resp.get("Annotations") or {}
    kind = job.get("Type")
    out = f"{_marker(kind)}Job: {quote(job.get('ID', ''))}\n"
    fields, objects = job.get("Fields") or [], job.get("Objects") or []
    groups: Sequence[Json] = job.get("TaskGroups") or []
    longest_field, longest_marker = _longest(fields, objects)
    longest_marker = max([longest_marker, *(len(_marker(g.get("Type"))) for g in groups)])
    if kind == "Edited" or verbose:
        aligned = _aligned(fields, objects, 0, longest_field, longest_marker)
        out += aligned + ("\n" if aligned else "")
    for group in groups:
        pad = longest_marker - len(_marker(group.get("Type")))
        out += _group_diff(group, annotations, pad, verbose) + "\n"
    return out.strip()


def render_alloc_metrics(metrics: Json, prefix: str) -> str:
    """monitor.go's formatAllocMetrics, for the fields a single host can fill."""
    lines = []
    if not metrics.get("NodesEvaluated"):
        lines.append(f"{prefix}* No nodes were eligible for evaluation")
    for dc, available in sorted((metrics.get("NodesAvailable") or {}).items()):
        if available == 0:
            lines.append(f"{prefix}* No nodes are available in datacenter {quote(dc)}")
    for constraint, count in sorted((metrics.get("ConstraintFiltered") or {}).items()):
        lines.append(f"{prefix}* Constraint {quote(constraint)}: {count} nodes excluded by filter")
    if metrics.get("NodesExhausted"):
        lines.append(f"{prefix}* Resources exhausted on {metrics['NodesExhausted']} nodes")
    for dim, count in sorted((metrics.get("DimensionExhausted") or {}).items()):
        lines.append(f"{prefix}* Dimension {quote(dim)} exhausted on {count} nodes")
    return "\n".join(lines)


def render_dry_run(resp: Json) -> str:
    """job_plan.go's formatDryRun: every allocation placed, or what could not be."""
    failed: Mapping[str, Json] = resp.get("FailedTGAllocs") or {}
    if not failed:
        return "- All tasks successfully allocated."
    out = ["- WARNING: Failed to place all allocations."]
    for group in sorted(failed):
        metrics = failed[group]
        count = int(metrics.get("CoalescedFailures") or 0) + 1
        noun = "allocation" if count == 1 else "allocations"
        out.append(f"  Task Group {quote(group)} (failed to place {count} {noun}):")
        out += [render_alloc_metrics(metrics, "    "), ""]
    return "\n".join(out).rstrip("\n")


def render_plan(resp: Json, path: str, *, diff: bool = True, verbose: bool = False) -> str:
    """`job plan`: the diff, the dry run, warnings and the check-index footer."""
    parts = []
    if diff:
        parts.append(render_job_diff(resp, verbose=verbose) + "\n")
    parts += ["Scheduler dry-run:", render_dry_run(resp), ""]
    if resp.get("Warnings"):
        parts.append(f"Job Warnings:\n{resp['Warnings']}\n")
    index = int(resp.get("JobModifyIndex") or 0)
    parts.append(f"Job Modify Index: {index}")
    parts.append(
        "To submit the job with version verification run:\n\n"
        f"waypost job run -check-index {index} {path}\n\n"
        "When running the job with the check-index flag, the job will only be run if the\n"
        "job modify index given matches the server-side version. If the index has\n"
        "changed, another user has modified the job and the plan's results are\n"
        "potentially invalid."
    )
    return "\n".join(parts)


# -- the monitor ----------------------------------------------------------------------


def alloc_lines(
    before: Mapping[str, Json],
    after: Mapping[str, Json],
    eval_index: int,
    stamp: str,
    *,
    length: int = SHORT_ID,
    announce: bool = True,
) -> list[str]:
    """monitor.go's update for allocations: created / modified, then status changes.

    `announce` False leaves out the created/modified lines (an unchanged job
    touched no allocation).  Lines carry the monitor's `    ` output prefix.
    """
    lines = []
    for ident in sorted(after, key=lambda i: (str(after[i].get("Name", "")), i)):
        alloc = after[ident]
        short = quote(limit(ident, length))
        old = before.get(ident)
        if old is None:
            if not announce:
                continue
            node, group = (
                quote(limit(str(alloc.get("NodeID", "")), length)),
                quote(alloc.get("TaskGroup", "")),
            )
            if int(alloc.get("CreateIndex") or 0) < eval_index:
                lines.append(
                    f"    {stamp}: Allocation {short} modified: node {node}, group {group}"
                )
            elif alloc.get("DesiredStatus") == "run":
                lines.append(f"    {stamp}: Allocation {short} created: node {node}, group {group}")
        elif old.get("ClientStatus") != alloc.get("ClientStatus"):
            desc = str(alloc.get("ClientDescription") or "")
            lines.append(
                f"    {stamp}: Allocation {short} status changed: "
                f"{quote(old.get('ClientStatus', ''))} -> {quote(alloc.get('ClientStatus', ''))}"
                + (f" ({desc})" if desc else "")
            )
    return lines


RUNNING, FAILED, WAITING = "running", "failed", "waiting"


def allocs_outcome(allocs: Sequence[Json]) -> str:
    """RUNNING when each allocation runs with all its tasks running, FAILED when one ended."""
    for alloc in allocs:
        if alloc.get("ClientStatus") in ("failed", "lost", "complete"):
            return FAILED
    for alloc in allocs:
        states: Mapping[str, Json] = alloc.get("TaskStates") or {}
        if alloc.get("ClientStatus") != "running" or not states:
            return WAITING
        if any(s.get("State") != "running" for s in states.values()):
            return WAITING
    return RUNNING
