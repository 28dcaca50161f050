"""`waypost job|alloc|service`: Nomad's CLI verbs on the agent's HTTP API.  Composition root.

    waypost job run [-detach] [-verbose] [-json] [-output] [-check-index N] FILE
    waypost job plan [-diff=false] [-verbose] [-json] FILE
    waypost job stop [-purge] [-detach] [-yes] [-verbose] JOB
    waypost job status [-json] [-evals] [-verbose] [JOB]
    waypost alloc status [-json] [-verbose] ALLOC
    waypost alloc logs [-stderr] [-f] [-tail] [-n LINES] [-c BYTES] [-task TASK] ALLOC [TASK]
    waypost service list [-json]
    waypost service info [-json] [-verbose] NAME
    every command: [-address=URL] [-token=TOKEN] [-namespace=default] [-region=R] [-no-color]

The client side of waypost, the way Nomad's `command/` package is the client side
of Nomad: it only speaks HTTP (urllib from the standard library, through
:class:`Api`), and what it prints comes from the pure
:mod:`discovery.cli_nomad_format`.  The agent is at `-address`, else
`$WAYPOST_ADDR`, else `$NOMAD_ADDR`, else `http://127.0.0.1:4646`; the token
(`X-Nomad-Token`) is `-token`, else `$WAYPOST_TOKEN`, else `$NOMAD_TOKEN`.
Flags are Go's `flag` package's: `-name=value`, `-name value`, `--name` alike,
flags before the arguments (the first argument ends them, `--` too).

Job files: a `.json` file, a file that starts with `{` (unless named `.hcl` or
`.nomad`), or any file with `-json` is Nomad's JSON (`{"Job": {...}}`, what
`nomad job run -output` prints, or the bare job); anything else is HCL, sent to
the agent's `POST /v1/jobs/parse` as Nomad's CLI sends it to a Nomad server.
`-` reads the file from stdin.

`job run` registers the job and, unless `-detach`, monitors it as Nomad does:
`==> <time>: Monitoring evaluation "<id>"`, the evaluation's trigger, its
allocations created, its status change and end.  Nomad would then monitor the
job's deployment; waypost has none, so instead the monitor waits for the
allocations of the new version (the evaluation's, or without an evaluation the
job's allocations to run of that version): every one `running` with all its
tasks running, or one `failed`, printing each allocation's status change on
the way (blocking queries on `/v1/job/:id/allocations`).  Left out: deployments,
canaries, multi-region, periodic and parameterized jobs, `-var`, colour, and in
`alloc status` the task resources and check sections (the agent has no stats).
`-check-index` is checked by the CLI (the job's JobModifyIndex read just before
the register), not atomically by the agent as Nomad's server does.

Exit codes, Nomad's: 0 success; 1 an error (the agent unreachable, a 4xx/5xx
answer, bad usage); `job run` and `job stop` 2 when allocations could not be
placed or failed; `job plan` 0 for no change, 1 when allocations would be
created or destroyed, 255 for an error.  An allocation prefix that matches
several allocations is an error (1) listing them (Nomad's `alloc status`
prints the list and exits 0; `alloc logs` makes it an error, as here).

Error handling: every HTTP failure becomes :class:`HttpError` or
:class:`Unreachable` in :class:`Api`, and is printed once, by the command, as
`Error <doing what>: <why>`.  An endpoint that the agent does not have (404
"no such endpoint", 405) is reported as such: HCL parsing and plans need an
agent with `/v1/jobs/parse` and `/v1/job/:id/plan`.  Ctrl-C ends a monitor or a
`-f` log stream: exit 0 for the logs (Nomad's), 130 for a monitor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from discovery import cli_nomad_format as fmt
from discovery.cli_nomad_format import FULL_ID, SHORT_ID, Json, limit, quote

DEFAULT_ADDR = "http://127.0.0.1:4646"  # Nomad's default, and the agent's
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PLACEMENT = 2  # monitor.go: scheduling failures
EXIT_PLAN_ERROR = 255  # job_plan.go: errors (1 means "changes")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
TIMEOUT = 30.0  # seconds for one read
WRITE_TIMEOUT = 600.0  # seconds for a write: a stop waits for every task's kill timeout
BLOCK = "10s"  # the `wait=` of the monitor's blocking reads
POLL = 1.0  # monitor.go's updateWait, between reads of an evaluation not yet done
BYTES_PER_LINE = 120  # alloc_fs.go's bytesToLines: the offset guessed for `-n` lines
DEFAULT_TAIL_LINES = 10  # alloc_fs.go's defaultTailLines
TAIL_QUIET = 1.0  # seconds: with -f -tail, the tail is printed after this long
CHUNK = 1 << 16
TERMINAL_EVAL = ("complete", "failed", "canceled", "cancelled")
JOB_UNCHANGED = "job unchanged"  # the agent's Warnings for a register that changed nothing


# -- the HTTP helper ------------------------------------------------------------------


class CliError(Exception):
    """A failure the command reports and exits 1 (or 255 for plan) on."""


class HttpError(CliError):
    """The agent answered with an error status."""

    def __init__(self, method: str, url: str, status: int, message: str) -> None:
        super().__init__(f"Unexpected response code: {status} ({message})")
        self.method, self.url, self.status, self.message = method, url, status, message

    @property
    def no_endpoint(self) -> bool:
        """The agent does not have this endpoint (as opposed to an error from it)."""
        return self.status == 405 or (
            self.status == 404 and self.message.startswith("no such endpoint")
        )


class Unreachable(CliError):
    """No HTTP answer at all: refused, timed out, not HTTP."""


@dataclass(frozen=True, slots=True)
class Reply:
    body: Any
    index: int  # X-Nomad-Index, 0 when absent


@dataclass(frozen=True, slots=True)
class Api:
    """The agent's HTTP API at `address`, with `token` sent as X-Nomad-Token."""

    address: str
    token: str = ""

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        base = self.address.rstrip("/")
        if "://" not in base:
            base = "http://" + base
        return base + path + ("?" + urllib.parse.urlencode(query) if query else "")

    def _open(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: object,
        timeout: float,
    ) -> Any:
        url = self.url(path, query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if self.token:
            request.add_header("X-Nomad-Token", self.token)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            with err:
                raw = err.read()
            raise HttpError(method, url, err.code, _error_text(raw, err.reason)) from None
        except urllib.error.URLError as err:
            raise Unreachable(f'{method} "{url}": {err.reason}') from None
        except (OSError, ValueError) as err:
            raise Unreachable(f'{method} "{url}": {err}') from None

    def call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: object = None,
        *,
        timeout: float = TIMEOUT,
    ) -> Reply:
        with self._open(method, path, query, body, timeout) as resp:
            try:
                raw = resp.read()
                index = int(resp.headers.get("X-Nomad-Index") or 0)
            except (OSError, ValueError) as err:
                raise Unreachable(f'{method} "{self.url(path, query)}": {err}') from None
        try:
            return Reply(json.loads(raw) if raw else None, index)
        except ValueError:
            raise Unreachable(f"{method} {path}: the answer is not JSON") from None

    def get(self, path: str, query: Mapping[str, str] | None = None, **kw: float) -> Reply:
        return self.call("GET", path, query, **kw)

    def write(self, method: str, path: str, body: object = None, **kw: Any) -> Reply:
        return self.call(method, path, body=body, timeout=WRITE_TIMEOUT, **kw)

    @contextmanager
    def stream(self, path: str, query: Mapping[str, str]) -> Iterator[IO[bytes]]:
        """A streamed GET (logs): the response, read as it comes."""
        with self._open("GET", path, query, None, TIMEOUT) as resp:
            yield resp


def _error_text(raw: bytes, reason: object) -> str:
    """The agent's `{"error": ...}` message, else the body, else the HTTP reason."""
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return str(decoded["error"])
    return raw.decode(errors="replace").strip() or str(reason)


# -- flags ----------------------------------------------------------------------------


class UsageError(CliError):
    pass


class HelpRequested(Exception):
    pass


COMMON_FLAGS: dict[str, type] = {
    "address": str,
    "token": str,
    "namespace": str,
    "region": str,
    "no-color": bool,
    "force-color": bool,
}
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_flags(args: Sequence[str], flags: Mapping[str, type]) -> tuple[dict[str, Any], list[str]]:
    """Go's `flag.Parse`: flags until the first argument (or `--`); UsageError as Go words it.

    `flags` maps a name to bool, str or int; the answer has every flag given
    (a missing one is absent) and the arguments left.
    """
    known = {**COMMON_FLAGS, **flags}
    values: dict[str, Any] = {}
    rest = list(args)
    while rest:
        token = rest[0]
        if len(token) < 2 or token[0] != "-":
            break
        rest.pop(0)
        if token == "--":
            break
        name = token[2:] if token.startswith("--") else token[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {token}")
        name, has_value, value = name.partition("=")
        if name in ("h", "help"):
            raise HelpRequested
        kind = known.get(name)
        if kind is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if kind is bool:
            if not has_value:
                values[name] = True
            elif value in _TRUE or value in _FALSE:
                values[name] = value in _TRUE
            else:
                raise UsageError(f'invalid boolean value "{value}" for -{name}')
            continue
        if not has_value:
            if not rest:
                raise UsageError(f"flag needs an argument: -{name}")
            value = rest.pop(0)
        if kind is int:
            try:
                values[name] = int(value)
            except ValueError:
                raise UsageError(f'invalid value "{value}" for flag -{name}: parse error') from None
        else:
            values[name] = value
    return values, rest


def client_of(values: Mapping[str, Any], env: Mapping[str, str]) -> Api:
    """The agent to talk to: -address, WAYPOST_ADDR, NOMAD_ADDR, default; token likewise."""
    address = (
        values.get("address") or env.get("WAYPOST_ADDR") or env.get("NOMAD_ADDR") or DEFAULT_ADDR
    )
    token = values.get("token") or env.get("WAYPOST_TOKEN") or env.get("NOMAD_TOKEN") or ""
    namespace = values.get("namespace") or env.get("NOMAD_NAMESPACE") or "default"
    if namespace not in ("default", "*"):
        raise UsageError(f"namespace {namespace!r}: waypost has one namespace, default")
    return Api(str(address), str(token))


# -- output ---------------------------------------------------------------------------


@dataclass
class Ui:
    """Where a command writes: stdout for output, stderr for errors (Nomad's cli.Ui)."""

    out: IO[str] = field(default_factory=lambda: sys.stdout)
    err: IO[str] = field(default_factory=lambda: sys.stderr)
    stdin: IO[str] = field(default_factory=lambda: sys.stdin)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    clock: Callable[[], int] = time.time_ns
    sleep: Callable[[float], None] = time.sleep

    def output(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def stamp(self) -> str:
        return fmt.format_time(self.clock())

    def json(self, data: object) -> None:
        """Nomad's `-json`: the API's JSON, indented by four spaces."""
        self.output(json.dumps(data, indent=4))


def _absent(what: str, endpoint: str) -> str:
    return (
        f"{what} needs the agent's {endpoint} endpoint, and the agent at this address does "
        "not have it (an older waypost)"
    )


# -- jobs -----------------------------------------------------------------------------


def load_job(api: Api, path: str, ui: Ui, *, as_json: bool = False) -> Json:
    """The job in `path` as API JSON: parsed here if JSON, by the agent if HCL."""
    try:
        if path == "-":
            text = ui.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"Error getting job struct: {err}") from None
    hcl_name = path.endswith((".hcl", ".nomad"))  # as the agent's --job decides (cli.py)
    if as_json or path.endswith(".json") or (not hcl_name and text.lstrip().startswith("{")):
        try:
            doc = json.loads(text)
        except ValueError as err:
            raise CliError(f"Error getting job struct: {path}: not JSON: {err}") from None
        if isinstance(doc, dict) and isinstance(doc.get("Job"), dict):
            doc = doc["Job"]
        if not isinstance(doc, dict):
            raise CliError(f"Error getting job struct: {path}: not a job object")
        return doc
    try:
        job = api.write("POST", "/v1/jobs/parse", {"JobHCL": text, "Canonicalize": True}).body
    except HttpError as err:
        if err.no_endpoint:
            why = _absent("an HCL job file", "POST /v1/jobs/parse")
            raise CliError(f"Error getting job struct: {why}; give the job as JSON") from None
        raise CliError(
            f"Error getting job struct: Error parsing job file from {path}: {err}"
        ) from None
    if not isinstance(job, dict):
        raise CliError("Error getting job struct: /v1/jobs/parse answered no job object")
    return job


def _job_id(job: Json) -> str:
    return str(job.get("ID") or job.get("Name") or "")


def job_by_prefix(api: Api, prefix: str) -> str:
    """meta.go's JobIDByPrefix: the id of the one job `prefix` names (an exact id wins)."""
    try:
        jobs = api.get("/v1/jobs", {"prefix": prefix}).body or []
    except CliError as err:
        raise CliError(f"Error querying job prefix {quote(prefix)}: {err}") from None
    jobs = [j for j in jobs if str(j.get("ID", "")).startswith(prefix)]
    return choose_job(jobs, prefix)


def choose_job(jobs: Sequence[Json], prefix: str) -> str:
    if not jobs:
        raise CliError(f"No job(s) with prefix or ID {quote(prefix)} found")
    exact = [j for j in jobs if j.get("ID") == prefix]
    if exact:
        return prefix
    if len(jobs) > 1:
        table = fmt.render_job_list(sorted(jobs, key=lambda j: str(j.get("ID", ""))))
        raise CliError(f"Prefix {quote(prefix)} matched multiple jobs\n\n{table}")
    return str(jobs[0]["ID"])


def job_run(args: Sequence[str], ui: Ui) -> int:
    values, rest = parse_flags(
        args,
        {"detach": bool, "verbose": bool, "json": bool, "output": bool, "check-index": str},
    )
    if len(rest) != 1:
        raise UsageError("This command takes one argument: <path>")
    api = client_of(values, ui.env)
    length = FULL_ID if values.get("verbose") else SHORT_ID
    job = load_job(api, rest[0], ui, as_json=bool(values.get("json")))
    if values.get("output"):
        ui.json({"Job": job})
        return EXIT_OK
    job_id = _job_id(job)
    if "check-index" in values:
        _check_index(api, job_id, str(values["check-index"]))
    try:
        resp = api.write("POST", "/v1/jobs", {"Job": job}).body or {}
    except CliError as err:
        raise CliError(f"Error submitting job: {err}") from None
    warnings = str(resp.get("Warnings") or "")
    if warnings:
        ui.output(f"Job Warnings:\n{warnings}\n")
    eval_id = str(resp.get("EvalID") or "")
    if values.get("detach"):
        ui.output("Job registration successful")
        if eval_id:
            ui.output(f"Evaluation ID: {eval_id}")
        return EXIT_OK
    monitor = Monitor(api, ui, job_id, length=length, announce=JOB_UNCHANGED not in warnings)
    return monitor.run(eval_id, int(resp.get("EvalCreateIndex") or 0), wait_running=True)


def _check_index(api: Api, job_id: str, raw: str) -> None:
    """job run -check-index, checked here (a plan's index against the job's now)."""
    try:
        wanted = int(raw)
    except ValueError:
        raise CliError(f"Error parsing check-index value {quote(raw)}") from None
    try:
        current = int((api.get(f"/v1/job/{_path(job_id)}").body or {}).get("JobModifyIndex") or 0)
    except HttpError as err:
        if err.status != 404 or err.no_endpoint:
            raise CliError(f"Error submitting job: {err}") from None
        current = None
    if current is None and wanted != 0:
        raise CliError(f"Enforcing job modify index {wanted}: job does not exist\nJob not updated")
    if current is not None and current != wanted:
        raise CliError(
            f"Enforcing job modify index {wanted}: job exists with conflicting job modify "
            f"index: {current}\nJob not updated"
        )


def _path(ident: str) -> str:
    return urllib.parse.quote(ident, safe="")


def job_plan(args: Sequence[str], ui: Ui) -> int:
    try:
        values, rest = parse_flags(
            args, {"diff": bool, "verbose": bool, "json": bool, "policy-override": bool}
        )
        if len(rest) != 1:
            raise UsageError("This command takes one argument: <path>")
        api = client_of(values, ui.env)
        job = load_job(api, rest[0], ui)
        try:
            resp = api.write(
                "POST", f"/v1/job/{_path(_job_id(job))}/plan", {"Job": job, "Diff": True}
            ).body
        except HttpError as err:
            if err.no_endpoint:
                raise CliError(
                    "Error during plan: " + _absent("job plan", "POST /v1/job/:id/plan")
                ) from None
            raise CliError(f"Error during plan: {err}") from None
        except CliError as err:
            raise CliError(f"Error during plan: {err}") from None
    except UsageError:
        raise
    except CliError as err:
        ui.error(str(err))
        return EXIT_PLAN_ERROR
    if not isinstance(resp, dict):
        ui.error("Error during plan: the agent answered no plan")
        return EXIT_PLAN_ERROR
    if values.get("json"):
        ui.json(resp)
        return fmt.plan_exit_code(resp)
    ui.output(
        fmt.render_plan(
            resp, rest[0], diff=values.get("diff", True), verbose=bool(values.get("verbose"))
        )
    )
    return fmt.plan_exit_code(resp)


def job_stop(args: Sequence[str], ui: Ui) -> int:
    values, rest = parse_flags(
        args, {"purge": bool, "detach": bool, "yes": bool, "verbose": bool, "global": bool}
    )
    if len(rest) != 1:
        raise UsageError("This command takes one argument: <job>")
    api = client_of(values, ui.env)
    length = FULL_ID if values.get("verbose") else SHORT_ID
    job_id = job_by_prefix(api, rest[0])
    if job_id != rest[0] and not values.get("yes"):
        ui.out.write(f"Are you sure you want to stop job {quote(job_id)}? [y/N] ")
        ui.out.flush()
        answer = ui.stdin.readline().strip()
        if answer != "y":
            if answer.lower().startswith("y"):
                ui.output("For confirmation, an exact 'y' is required.")
                return EXIT_OK
            ui.output("Cancelling job stop")
            return EXIT_OK if answer == "" or answer.lower().startswith("n") else EXIT_ERROR
    query = "?purge=true" if values.get("purge") else ""
    try:
        resp = api.write("DELETE", f"/v1/job/{_path(job_id)}{query}").body or {}
    except CliError as err:
        raise CliError(f"Error deregistering job with id {job_id} err: {err}") from None
    if resp.get("Warnings"):
        ui.error(f"Job Warnings:\n{resp['Warnings']}")
    eval_id = str(resp.get("EvalID") or "")
    if not eval_id:
        return EXIT_OK
    if values.get("detach"):
        ui.output(eval_id)
        return EXIT_OK
    monitor = Monitor(api, ui, job_id, length=length)
    return monitor.run(eval_id, int(resp.get("EvalCreateIndex") or 0), wait_running=False)


def job_status(args: Sequence[str], ui: Ui) -> int:
    values, rest = parse_flags(
        args, {"json": bool, "verbose": bool, "evals": bool, "short": bool, "all-allocs": bool}
    )
    if len(rest) > 1:
        raise UsageError("This command takes either no arguments or one: <job>")
    api = client_of(values, ui.env)
    if not rest:
        try:
            jobs = api.get("/v1/jobs").body or []
        except CliError as err:
            raise CliError(f"Error querying jobs: {err}") from None
        if values.get("json"):
            ui.json(jobs)
        else:
            ui.output(fmt.render_job_list(jobs))
        return EXIT_OK
    job_id = job_by_prefix(api, rest[0].strip())
    path = f"/v1/job/{_path(job_id)}"
    try:
        job = api.get(path).body or {}
    except CliError as err:
        raise CliError(f"Error querying job: {err}") from None
    if values.get("json"):
        ui.json(job)
        return EXIT_OK
    if values.get("short"):
        ui.output(fmt.render_job_basic(job))
        return EXIT_OK
    try:
        summary = api.get(path + "/summary").body
        allocs = api.get(path + "/allocations").body or []
    except HttpError as err:
        if err.status != 404:
            raise CliError(f"Error querying job: {err}") from None
        summary, allocs = None, []  # a job whose record could not be read: the head only
    evals = None
    if values.get("evals") or values.get("verbose"):
        try:
            evals = api.get(path + "/evaluations").body or []
        except HttpError as err:
            if not err.no_endpoint:
                raise CliError(f"Error querying job evaluations: {err}") from None
    allocs = sorted(allocs, key=lambda a: -int(a.get("CreateIndex") or 0))
    ui.output(
        fmt.render_job_status(
            job, summary, allocs, ui.clock(), evals=evals, verbose=bool(values.get("verbose"))
        )
    )
    return EXIT_OK


# -- the monitor ----------------------------------------------------------------------


@dataclass
class Monitor:
    """monitor.go's evaluation monitor, then the wait for the allocations (module docstring)."""

    api: Api
    ui: Ui
    job_id: str
    length: int = SHORT_ID
    announce: bool = True
    seen: dict[str, Json] = dataclasses.field(default_factory=dict)

    def info(self, text: str) -> None:
        self.ui.output(f"==> {self.ui.stamp()}: {text}")

    def line(self, text: str) -> None:
        self.ui.output(f"    {self.ui.stamp()}: {text}")

    def run(self, eval_id: str, eval_index: int, *, wait_running: bool) -> int:
        try:
            ids: list[str] | None = None
            if eval_id:
                outcome = self.evaluation(eval_id)
                if isinstance(outcome, int):
                    return outcome
                ids, eval_index = outcome
            else:
                self.info(f"Monitoring job {quote(self.job_id)} (no evaluation)")
            if not wait_running:
                return EXIT_OK
            return self.allocations(ids, eval_index)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    def evaluation(self, eval_id: str) -> int | tuple[list[str] | None, int]:
        """Follow the evaluation to its end: an exit code, or its allocations and index."""
        self.info(f"Monitoring evaluation {quote(limit(eval_id, self.length))}")
        status, job = "pending", ""
        while True:
            try:
                ev = self.api.get(f"/v1/evaluation/{_path(eval_id)}").body or {}
            except HttpError as err:
                if err.no_endpoint:  # an agent without evaluations: the job's allocations
                    return None, 0
                self.ui.error(f"No evaluation with id {quote(eval_id)} found")
                return EXIT_ERROR
            if not job and ev.get("JobID"):
                job = str(ev["JobID"])
                self.line(f"Evaluation triggered by job {quote(job)}")
            ids = self._eval_allocations(eval_id, int(ev.get("CreateIndex") or 0))
            new_status = str(ev.get("Status") or "")
            if new_status not in ("pending", status):
                self.line(f"Evaluation status changed: {quote(status)} -> {quote(new_status)}")
                status = new_status
            if new_status in TERMINAL_EVAL:
                break
            self.ui.sleep(POLL)
        failed: Mapping[str, Json] = ev.get("FailedTGAllocs") or {}
        short = quote(limit(eval_id, self.length))
        if not failed:
            self.info(f"Evaluation {short} finished with status {quote(status)}")
            return ids, int(ev.get("CreateIndex") or 0)
        self.info(
            f"Evaluation {short} finished with status {quote(status)} but failed to place "
            "all allocations:"
        )
        for group in sorted(failed):
            count = int(failed[group].get("CoalescedFailures") or 0) + 1
            noun = "allocation" if count == 1 else "allocations"
            self.line(f"Task Group {quote(group)} (failed to place {count} {noun}):")
            self.ui.output(fmt.render_alloc_metrics(failed[group], "  "))
        return EXIT_PLACEMENT

    def _eval_allocations(self, eval_id: str, index: int) -> list[str] | None:
        try:
            stubs = self.api.get(f"/v1/evaluation/{_path(eval_id)}/allocations").body or []
        except HttpError as err:
            if err.no_endpoint:
                return None
            raise
        self._update({str(a["ID"]): a for a in stubs}, index)
        return [str(a["ID"]) for a in stubs]

    def _update(self, current: dict[str, Json], index: int) -> None:
        before = self.seen
        for text in fmt.alloc_lines(
            before, current, index, self.ui.stamp(), length=self.length, announce=self.announce
        ):
            self.ui.output(text)
        self.seen = {**before, **current}

    @staticmethod
    def _failed_now(alloc: Json, eval_index: int) -> bool:
        """An allocation of this register that failed (not one left from an earlier run)."""
        made = int(alloc.get("CreateIndex") or 0)
        return alloc.get("ClientStatus") == "failed" and made >= eval_index

    def allocations(self, ids: list[str] | None, eval_index: int) -> int:
        """Wait until the allocations run, or one fails (blocking reads of the job's)."""
        version: int | None = None
        if not ids:  # no evaluation, or one that lists none (they may have ended already)
            ids = None
            job = self.api.get(f"/v1/job/{_path(self.job_id)}").body or {}
            version = int(job.get("Version") or 0)
        index = 0
        while True:
            started = time.monotonic()
            reply = self.api.get(
                f"/v1/job/{_path(self.job_id)}/allocations",
                {"index": str(index), "wait": BLOCK} if index else None,
                timeout=TIMEOUT + 10,
            )
            stubs: list[Json] = reply.body or []
            if ids is not None:
                mine = [a for a in stubs if a.get("ID") in ids]
            else:
                mine = [
                    a
                    for a in stubs
                    if a.get("JobVersion") == version
                    and (a.get("DesiredStatus") == "run" or self._failed_now(a, eval_index))
                ]
            self._update({str(a["ID"]): a for a in mine}, eval_index)
            outcome = fmt.allocs_outcome(mine)
            if outcome == fmt.RUNNING:
                if mine:
                    n = len(mine)
                    self.info(f"Allocations of job {quote(self.job_id)} running: {n} of {n}")
                else:
                    self.info(f"Job {quote(self.job_id)} has no allocations to run")
                return EXIT_OK
            if outcome == fmt.FAILED:
                for a in mine:
                    if a.get("ClientStatus") != "running":
                        short = quote(limit(str(a.get("ID", "")), self.length))
                        desc = a.get("ClientDescription") or ""
                        self.info(
                            f"Allocation {short} is {quote(a.get('ClientStatus', ''))}"
                            + (f" ({desc})" if desc else "")
                        )
                return EXIT_PLACEMENT
            if reply.index in (index, 0):  # the agent did not block
                self.ui.sleep(max(0.0, POLL - (time.monotonic() - started)))
            index = reply.index


# -- allocations ----------------------------------------------------------------------


def choose_alloc(stubs: Sequence[Json], prefix: str) -> list[Json]:
    """The allocations `prefix` names: an exact id alone, else every id it begins."""
    exact = [a for a in stubs if a.get("ID") == prefix]
    return exact or [a for a in stubs if str(a.get("ID", "")).startswith(prefix)]


def alloc_by_prefix(api: Api, ui: Ui, raw: str, *, verbose: bool, short_msg: str) -> Json:
    """The allocation `raw` names, read whole (alloc_status.go's prefix rules)."""
    if len(raw) == 1:
        raise CliError(short_msg)
    prefix = fmt.sanitize_uuid_prefix(raw)
    try:
        stubs = api.get("/v1/allocations", {"prefix": prefix}).body or []
    except CliError as err:
        raise CliError(f"Error querying allocation: {err}") from None
    found = choose_alloc(stubs, prefix)  # filtered here too: an agent may ignore ?prefix=
    if not found:
        raise CliError(f"No allocation(s) with prefix or id {quote(prefix)} found")
    if len(found) > 1:
        found.sort(key=lambda a: str(a.get("Name", "")))
        raise CliError(fmt.render_ambiguous_allocs(found, ui.clock(), verbose=verbose))
    try:
        alloc: Json = api.get(f"/v1/allocation/{_path(str(found[0]['ID']))}").body or {}
    except CliError as err:
        raise CliError(f"Error querying allocation: {err}") from None
    return alloc


def alloc_status(args: Sequence[str], ui: Ui) -> int:
    values, rest = parse_flags(args, {"json": bool, "verbose": bool, "short": bool})
    api = client_of(values, ui.env)
    if not rest and values.get("json"):
        try:
            ui.json(api.get("/v1/allocations").body)
        except CliError as err:
            raise CliError(f"Error querying allocations: {err}") from None
        return EXIT_OK
    if len(rest) != 1:
        raise UsageError(
            "This command takes one of the following argument conditions:\n"
            " * A single <allocation>\n * No arguments, with output format specified"
        )
    verbose = bool(values.get("verbose"))
    alloc = alloc_by_prefix(
        api,
        ui,
        rest[0],
        verbose=verbose,
        short_msg="Identifier must contain at least two characters.",
    )
    if values.get("json"):
        ui.json(alloc)
        return EXIT_OK
    ui.output(fmt.render_alloc_status(alloc, ui.clock(), verbose=verbose))
    return EXIT_OK


def alloc_logs(args: Sequence[str], ui: Ui) -> int:
    values, rest = parse_flags(
        args,
        {
            "stderr": bool,
            "stdout": bool,
            "f": bool,
            "tail": bool,
            "n": int,
            "c": int,
            "task": str,
            "verbose": bool,
        },
    )
    if not rest:
        raise UsageError("An allocation ID is required")
    if len(rest) > 2:
        raise UsageError("This command takes one or two arguments")
    api = client_of(values, ui.env)
    alloc = alloc_by_prefix(
        api,
        ui,
        rest[0],
        verbose=bool(values.get("verbose")),
        short_msg="Alloc ID must contain at least two characters.",
    )
    task = str(values.get("task") or "")
    if task and task not in (alloc.get("TaskStates") or {}):
        raise CliError(f"Failed to validate task: task {quote(task)} not found in allocation")
    if not task and len(rest) == 2:
        task = rest[1]
        if not task:
            raise CliError("Task name required")
    if not task:
        task, problem = fmt.lookup_task(alloc)
        if problem:
            raise CliError(f"Failed to validate task: {problem}")
    logs = Logs(api, ui, str(alloc["ID"]), task, follow=bool(values.get("f")))
    numbered = "n" in values or "c" in values
    if values.get("f") and not (
        values.get("stderr") or values.get("stdout") or values.get("tail") or numbered
    ):
        return logs.follow_both()
    if values.get("stderr") and values.get("stdout"):
        raise CliError("Unable to support both stdout and stderr")
    kind = "stderr" if values.get("stderr") else "stdout"
    if not values.get("tail"):
        return logs.copy(kind, "start", 0, lines=None)
    if "n" in values and "c" in values:
        raise CliError(f"Failed to read {kind} file: both -n and -c set")
    if "c" in values:
        return logs.copy(kind, "end", int(values["c"]), lines=None)
    count = int(values.get("n", DEFAULT_TAIL_LINES))
    return logs.copy(kind, "end", count * BYTES_PER_LINE, lines=count)


@dataclass
class Logs:
    """`GET /v1/client/fs/logs/:alloc` in plain mode, copied to stdout (and stderr)."""

    api: Api
    ui: Ui
    alloc_id: str
    task: str
    follow: bool = False

    def _query(self, kind: str, origin: str, offset: int, follow: bool) -> dict[str, str]:
        return {
            "task": self.task,
            "type": kind,
            "plain": "true",
            "follow": "true" if follow else "false",
            "origin": origin,
            "offset": str(offset),
        }

    def _chunks(self, kind: str, origin: str, offset: int, follow: bool) -> Iterator[bytes]:
        path = f"/v1/client/fs/logs/{_path(self.alloc_id)}"
        with self.api.stream(path, self._query(kind, origin, offset, follow)) as resp:
            while True:
                try:
                    data = resp.read1(CHUNK)  # type: ignore[attr-defined]
                except OSError as err:
                    raise Unreachable(f"reading the {kind} log: {err}") from None
                if not data:
                    return
                yield data

    def copy(self, kind: str, origin: str, offset: int, *, lines: int | None) -> int:
        """One log to stdout; with `lines`, only the last ones of what was there."""
        sink = self.ui.out.buffer if hasattr(self.ui.out, "buffer") else None
        try:
            chunks = self._chunks(kind, origin, offset, self.follow)
            if lines is not None:
                chunks = _tail(chunks, lines, follow=self.follow)
            for data in chunks:
                _write(self.ui.out, sink, data)
        except CliError as err:
            raise CliError(f"Failed to read {kind} file: {err}") from None
        except KeyboardInterrupt:
            return EXIT_OK
        return EXIT_OK

    def follow_both(self) -> int:
        """alloc_logs.go's tailMultipleFiles: stdout and stderr from their ends, as they grow."""
        frames: queue.Queue[tuple[str, bytes | CliError | None]] = queue.Queue()

        def pump(kind: str) -> None:
            try:
                for data in self._chunks(kind, "end", 0, True):
                    frames.put((kind, data))
                frames.put((kind, None))
            except CliError as err:
                frames.put((kind, err))

        for kind in ("stdout", "stderr"):
            threading.Thread(target=pump, args=(kind,), daemon=True).start()
        ended = 0
        try:
            while ended < 2:
                kind, item = frames.get()
                if isinstance(item, CliError):
                    raise CliError(f"Failed to tail stdout and stderr files: {item}")
                if item is None:
                    ended += 1
                    continue
                stream = self.ui.out if kind == "stdout" else self.ui.err
                _write(stream, getattr(stream, "buffer", None), item)
        except KeyboardInterrupt:
            return EXIT_OK
        return EXIT_OK


def _write(stream: IO[str], sink: IO[bytes] | None, data: bytes) -> None:
    if sink is not None:
        stream.flush()
        sink.write(data)
        sink.flush()
    else:
        stream.write(data.decode(errors="replace"))
        stream.flush()


def _tail(chunks: Iterator[bytes], lines: int, *, follow: bool) -> Iterator[bytes]:
    """LineLimitReader: the last `lines` lines of what comes first, then (-f) the rest.

    Without -f that is the whole answer; with -f, what arrives in the first
    TAIL_QUIET seconds (the log as it was comes at once), or the `lines * 120`
    bytes asked for if sooner.  (Nomad's waits for a quiet second instead, which
    a task writing steadily never gives.)
    """
    if not follow:
        yield fmt.last_lines(b"".join(chunks), lines)
        return
    items: queue.Queue[bytes | BaseException | None] = queue.Queue()

    def pump() -> None:
        try:
            for data in chunks:
                items.put(data)
            items.put(None)
        except BaseException as err:  # handed to the reading thread, raised there
            items.put(err)

    threading.Thread(target=pump, daemon=True).start()
    buffered = b""
    limit_bytes = lines * BYTES_PER_LINE
    deadline = time.monotonic() + TAIL_QUIET
    while True:
        try:
            item = items.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if isinstance(item, BaseException):
            raise item
        if item is None:
            yield fmt.last_lines(buffered, lines)
            return
        buffered += item
        if len(buffered) >= limit_bytes:
            break
    yield fmt.last_lines(buffered, lines)
    while True:
        item = items.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            return
        yield item


# -- services -------------------------------------------------------------------------


def service_list(args: Sequence[str], ui: Ui) -> int:
    values, rest = parse_flags(args, {"json": bool})
    if rest:
        raise UsageError("This command takes no arguments")
    api = client_of(values, ui.env)
    try:
        listing = api.get("/v1/services").body or []
    except CliError as err:
        raise CliError(f"Error listing service registrations: {err}") from None
    if values.get("json") and any(ns.get("Services") for ns in listing):
        ui.json(listing)
        return EXIT_OK
    ui.output(fmt.render_service_list(listing))
    return EXIT_OK


def service_info(args: Sequence[str], ui: Ui) -> int:
    values, rest = parse_flags(args, {"json": bool, "verbose": bool, "filter": str})
    if len(rest) != 1:
        raise UsageError("This command takes one argument: <service_name>")
    api = client_of(values, ui.env)
    name = rest[0]
    query = {"filter": str(values["filter"])} if values.get("filter") else None
    try:
        regs = api.get(f"/v1/service/{_path(name)}", query).body or []
        if not regs:  # service_info.go's getServiceByPrefix: a unique prefix names one
            listing = api.get("/v1/services").body or []
            names = sorted(
                {
                    str(s.get("ServiceName", ""))
                    for ns in listing
                    for s in ns.get("Services") or []
                    if str(s.get("ServiceName", "")).startswith(name)
                }
            )
            if len(names) > 1:
                matched = [
                    {
                        **ns,
                        "Services": [
                            s for s in ns.get("Services") or [] if s.get("ServiceName") in names
                        ],
                    }
                    for ns in listing
                ]
                raise CliError(
                    "Prefix matched multiple services\n\n" + fmt.render_service_list(matched)
                )
            if len(names) == 1 and names[0] != name:
                regs = api.get(f"/v1/service/{_path(names[0])}", query).body or []
    except HttpError as err:
        raise CliError(f"Error listing service registrations: {err}") from None
    except Unreachable as err:
        raise CliError(f"Error listing service registrations: {err}") from None
    if values.get("json") and regs:
        ui.json(regs)
        return EXIT_OK
    ui.output(fmt.render_service_info(regs, verbose=bool(values.get("verbose"))))
    return EXIT_OK


# -- dispatch -------------------------------------------------------------------------

Command = Callable[[Sequence[str], Ui], int]
COMMANDS: dict[str, dict[str, tuple[Command, str, str]]] = {
    "job": {
        "run": (
            job_run,
            "[-detach] [-verbose] [-json] [-output] [-check-index N] <path>",
            "Register a job (HCL or JSON file) and wait for its allocations to run.",
        ),
        "plan": (
            job_plan,
            "[-diff=false] [-verbose] [-json] <path>",
            "Show what running the job would change (exit 1 when allocations change).",
        ),
        "stop": (
            job_stop,
            "[-purge] [-detach] [-yes] [-verbose] <job>",
            "Stop a job: its tasks are killed; -purge also forgets it.",
        ),
        "status": (
            job_status,
            "[-json] [-evals] [-verbose] [-short] [<job>]",
            "List the jobs, or show one job with its allocations.",
        ),
    },
    "alloc": {
        "status": (
            alloc_status,
            "[-json] [-verbose] <allocation>",
            "Show an allocation (a unique ID prefix will do) and its tasks' events.",
        ),
        "logs": (
            alloc_logs,
            "[-stderr] [-f] [-tail] [-n lines] [-c bytes] <allocation> [<task>]",
            "Print a task's stdout (or stderr) log; -f follows it.",
        ),
    },
    "service": {
        "list": (service_list, "[-json]", "List the services."),
        "info": (service_info, "[-json] [-verbose] <service_name>", "Show a service's instances."),
    },
}
COMMON_HELP = """
General options:
  -address=<addr>  the agent's HTTP API (default $WAYPOST_ADDR, $NOMAD_ADDR,
                   http://127.0.0.1:4646)
  -token=<token>   sent as X-Nomad-Token (default $WAYPOST_TOKEN, $NOMAD_TOKEN)"""


def group_help(group: str) -> str:
    lines = [f"Usage: waypost {group} <subcommand> [options] [args]", "", "Subcommands:"]
    for name, (_, _, about) in COMMANDS[group].items():
        lines.append(f"    {name:<8} {about}")
    return "\n".join(lines)


def command_help(group: str, name: str) -> str:
    _, usage, about = COMMANDS[group][name]
    return f"Usage: waypost {group} {name} {usage}\n\n  {about}\n{COMMON_HELP}"


def main(argv: Sequence[str], ui: Ui | None = None) -> int:
    """`waypost job|alloc|service <subcommand> ...`; `argv` starts with the group."""
    ui = ui or Ui()
    group, rest = argv[0], list(argv[1:])
    commands = COMMANDS[group]
    if not rest or rest[0] in ("-h", "-help", "--help"):
        ui.error(group_help(group))
        return EXIT_OK if rest else EXIT_ERROR
    name = rest[0]
    if name not in commands:
        ui.error(f"waypost {group}: unknown subcommand {name!r}\n\n{group_help(group)}")
        return EXIT_ERROR
    command = commands[name][0]
    try:
        return command(rest[1:], ui)
    except HelpRequested:
        ui.error(command_help(group, name))
        return EXIT_OK
    except UsageError as err:
        ui.error(f"{err}\nFor additional help try 'waypost {group} {name} -help'")
        return EXIT_PLAN_ERROR if command is job_plan else EXIT_ERROR
    except CliError as err:
        ui.error(str(err))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `| head`: the reader left; nothing more to say
        return EXIT_OK
