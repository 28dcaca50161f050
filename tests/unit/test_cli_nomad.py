"""The `waypost job|alloc|service` CLI without an agent: tables, times, flags, prefixes, exits.

The formatting functions (discovery.cli_nomad_format) are pure and checked
against the text Nomad's CLI prints for the same data; the commands are run
through `cli_nomad.main` with an address nothing listens on (connection
refused on 127.0.0.1, port 9 of the discard service, which tests never
start) to check their exit codes and messages when the agent is not there.
"""

from __future__ import annotations

import io
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest

from discovery import cli, cli_nomad
from discovery import cli_nomad_format as fmt
from discovery.cli_nomad import Api, CliError, HttpError, Ui, UsageError, parse_flags

NS = 1_000_000_000
NOW = 1_796_699_045 * NS  # 2026-12-08T03:04:05Z
NOWHERE = "http://127.0.0.1:9"  # nothing listens: connection refused


# -- tables -------------------------------------------------------------------------


def test_columnize_pads_all_but_the_last_column() -> None:
    rows = ["ID|Type|Status", "web|service|running", "a-long-id||dead"]
    assert fmt.format_list(rows).splitlines() == [
        "ID         Type     Status",
        "web        service  running",
        "a-long-id  <none>   dead",
    ]


def test_format_kv_aligns_keys() -> None:
    assert fmt.format_kv(["ID|web", "Submit Date|", "Type|service"]).splitlines() == [
        "ID          = web",
        "Submit Date = <none>",
        "Type        = service",
    ]


def test_job_list() -> None:
    jobs = [
        {"ID": "web", "Type": "service", "Priority": 50, "Status": "running", "SubmitTime": NOW},
        {"ID": "db", "Type": "service", "Priority": 50, "Status": "dead", "Stop": True},
    ]
    assert fmt.render_job_list(jobs).splitlines() == [
        "ID   Type     Priority  Status          Submit Date",
        "web  service  50        running         2026-12-08T03:04:05Z",
        "db   service  50        dead (stopped)  <none>",
    ]
    assert fmt.render_job_list([]) == "No running jobs"


def _stub(ident: str, **extra: Any) -> dict[str, Any]:
    return {
        "ID": ident,
        "Name": "web.web[0]",
        "NodeID": "f361dbe7-44eb-570b-803c-c30213d99b37",
        "TaskGroup": "web",
        "JobVersion": 0,
        "DesiredStatus": "run",
        "ClientStatus": "running",
        "CreateTime": NOW - 62 * NS,
        "ModifyTime": NOW - 5 * NS,
        **extra,
    }


def test_alloc_list_short_and_relative() -> None:
    text = fmt.render_alloc_list([_stub("2500bd41-e5ed-42b1-8407-39cad931de5c")], NOW)
    assert text.splitlines() == [
        "ID        Node ID   Task Group  Version  Desired  Status   Created   Modified",
        "2500bd41  f361dbe7  web         0        run      running  1m2s ago  5s ago",
    ]
    assert fmt.render_alloc_list([], NOW) == "No allocations placed"


def test_alloc_list_verbose_has_full_ids_and_times() -> None:
    ident = "2500bd41-e5ed-42b1-8407-39cad931de5c"
    text = fmt.render_alloc_list([_stub(ident, NodeName="vm")], NOW, verbose=True, tz=UTC)
    head, row = text.splitlines()
    assert head.split()[:5] == ["ID", "Eval", "ID", "Node", "ID"]
    assert row.split() == [
        ident,
        "<none>",
        "f361dbe7-44eb-570b-803c-c30213d99b37",
        "vm",
        "web",
        "0",
        "run",
        "running",
        "2026-12-08T03:03:03Z",
        "2026-12-08T03:04:00Z",
    ]


def test_job_status_sections() -> None:
    job = {
        "ID": "web",
        "Name": "web",
        "Type": "service",
        "Priority": 50,
        "Status": "running",
        "Datacenters": ["dc1"],
        "Namespace": "default",
        "SubmitTime": NOW,
    }
    summary = {"Summary": {"web": {"Running": 3}}}
    text = fmt.render_job_status(job, summary, [_stub("abcdef12-0000")], NOW)
    lines = text.splitlines()
    assert lines[0] == "ID            = web"
    assert "Node Pool     = default" in lines
    assert "Status        = running" in lines
    i = lines.index("Summary")
    assert lines[i + 1].split() == [
        "Task",
        "Group",
        "Queued",
        "Starting",
        "Running",
        "Failed",
        "Complete",
        "Lost",
        "Unknown",
    ]
    assert lines[i + 2].split() == ["web", "0", "0", "3", "0", "0", "0", "0"]
    j = lines.index("Allocations")
    assert lines[j + 2].startswith("abcdef12  f361dbe7  web")


# -- times --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s ago"),
        (5, "5s ago"),
        (62, "1m2s ago"),
        (3600 + 5, "1h5s ago"),
        (3 * 3600 + 2 * 60 + 7, "3h2m ago"),
        (2 * 86400 + 3600, "2d1h ago"),
        (-90, "1m30s from now"),
        (400 * 86400, "1y1mo ago"),
    ],
)
def test_pretty_time_diff(seconds: int, text: str) -> None:
    assert fmt.pretty_time_diff(NOW - seconds * NS, NOW) == text


def test_pretty_time_diff_of_zero_is_empty() -> None:
    assert fmt.pretty_time_diff(0, NOW) == ""


def test_format_time_is_gos_iso_8601() -> None:
    assert fmt.format_time(NOW + 999_999_999, UTC) == "2026-12-08T03:04:05Z"
    assert fmt.format_time(NOW, timezone(timedelta(hours=1))) == "2026-12-08T04:04:05+01:00"
    assert fmt.format_time(NOW, timezone(-timedelta(hours=5, minutes=30))).endswith("-05:30")
    assert fmt.format_time(0) == ""


def test_go_times_parse_and_zero_is_na() -> None:
    assert fmt.parse_go_time("2026-12-08T03:04:05.123456789Z") == NOW + 123_456_789
    assert fmt.parse_go_time("2026-12-08T04:04:05+01:00") == NOW
    assert fmt.format_task_time("0001-01-01T00:00:00Z") == "N/A"
    assert fmt.format_task_time("2026-12-08T03:04:05.5Z", UTC) == "2026-12-08T03:04:05Z"


@pytest.mark.parametrize(
    ("nanos", "text"),
    [(0, "0s"), (15 * NS, "15s"), (90 * NS, "1m30s"), (1500 * 10**6, "1.5s"), (5 * 10**6, "5ms")],
)
def test_format_duration(nanos: int, text: str) -> None:
    assert fmt.format_duration(nanos) == text


# -- allocations --------------------------------------------------------------------


def _alloc() -> dict[str, Any]:
    return {
        **_stub("2500bd41-e5ed-42b1-8407-39cad931de5c"),
        "EvalID": "",
        "NodeName": "vm",
        "JobID": "web",
        "ClientDescription": "Tasks are running",
        "AllocatedResources": {
            "Shared": {
                "Networks": [{"Mode": "host", "IP": "127.0.0.1"}],
                "Ports": [{"Label": "http", "Value": 25063, "To": 25063, "HostIP": "127.0.0.1"}],
            }
        },
        "TaskStates": {
            "server": {
                "State": "running",
                "Restarts": 1,
                "StartedAt": "2026-12-08T03:04:05.5Z",
                "FinishedAt": "0001-01-01T00:00:00Z",
                "LastRestart": "2026-12-08T03:04:00Z",
                "Events": [
                    {"Type": "Received", "Time": NOW - 10 * NS, "DisplayMessage": ""},
                    {"Type": "Terminated", "Time": NOW - 6 * NS, "ExitCode": 143, "Signal": 15},
                    {"Type": "Restarting", "Time": NOW - 5 * NS, "StartDelay": 2 * NS},
                    {"Type": "Started", "Time": NOW, "DisplayMessage": "Task started by client"},
                ],
            }
        },
    }


def test_alloc_status() -> None:
    lines = fmt.render_alloc_status(_alloc(), NOW, tz=UTC).splitlines()
    assert lines[0] == "ID                  = 2500bd41-e5ed-42b1-8407-39cad931de5c"
    assert "Eval ID             = <none>" in lines
    assert "Client Description  = Tasks are running" in lines
    assert "Created             = 1m2s ago" in lines
    i = lines.index('Allocation Addresses (mode = "host"):')
    assert lines[i + 1].split() == ["Label", "Dynamic", "Address"]
    assert lines[i + 2].split() == ["*http", "yes", "127.0.0.1:25063"]  # host mode: no "-> To"
    assert 'Task "server" is "running"' in lines
    assert "Finished At    = N/A" in lines
    assert "Total Restarts = 1" in lines
    j = lines.index("Recent Events:")
    assert lines[j + 1].split() == ["Time", "Type", "Description"]
    events = [line.split("  ", 1)[1].strip() for line in lines[j + 2 :]]
    assert events == [  # newest first, as Nomad shows them
        "Started     Task started by client",
        "Restarting  Task restarting in 2s",
        "Terminated  Exit Code: 143, Signal: 15",
        "Received    Task received by client",
    ]


def test_addresses_show_to_when_it_differs() -> None:
    alloc = _alloc()
    alloc["AllocatedResources"]["Shared"]["Networks"][0]["Mode"] = "bridge"
    alloc["AllocatedResources"]["Shared"]["Ports"][0]["To"] = 8080
    text = fmt.render_alloc_addresses(alloc)
    assert text.splitlines()[2].split() == ["*http", "yes", "127.0.0.1:25063", "->", "8080"]


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (
            {"Type": "Killing", "KillTimeout": 5 * NS},
            "Sent interrupt. Waiting 5s before force killing",
        ),
        ({"Type": "Killed"}, "Task successfully killed"),
        ({"Type": "Not Restarting"}, "Task exceeded restart policy"),
        (
            {"Type": "Terminated", "ExitCode": 1, "Message": "oom"},
            'Exit Code: 1, Exit Message: "oom"',
        ),
        ({"Type": "Task Setup", "Message": "Building Task Directory"}, "Building Task Directory"),
    ],
)
def test_display_message(event: dict[str, Any], text: str) -> None:
    assert fmt.display_message(event) == text


def test_lookup_task() -> None:
    tasks: list[dict[str, Any]] = [{"Name": "a"}]
    job = {"TaskGroups": [{"Name": "g", "Tasks": tasks}]}
    alloc: dict[str, Any] = {"ID": "abcdef1234", "TaskGroup": "g", "Job": job}
    assert fmt.lookup_task(alloc) == ("a", "")
    tasks.append({"Name": "b"})
    task, problem = fmt.lookup_task(alloc)
    assert task == ""
    assert problem.splitlines() == [
        'Allocation "abcdef12" is running the following tasks:',
        "  * a",
        "  * b",
        "",
        "Please specify the task.",
    ]


@pytest.mark.parametrize(
    ("data", "count", "tail"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),
        (b"a\nb\n", 5, b"a\nb\n"),
        (b"a\nb\n", 0, b""),
        (b"", 3, b""),
    ],
)
def test_last_lines(data: bytes, count: int, tail: bytes) -> None:
    assert fmt.last_lines(data, count) == tail


# -- prefixes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "sane"), [("abc", "ab"), ("abcd", "abcd"), ("abcdefgh-1", "abcdefgh-"), ("a", "")]
)
def test_sanitize_uuid_prefix(prefix: str, sane: str) -> None:
    assert fmt.sanitize_uuid_prefix(prefix) == sane


def test_choose_alloc() -> None:
    stubs = [{"ID": "ab12"}, {"ID": "ab34"}, {"ID": "cd56"}]
    assert cli_nomad.choose_alloc(stubs, "ab") == stubs[:2]
    assert cli_nomad.choose_alloc(stubs, "ab34") == [stubs[1]]
    assert cli_nomad.choose_alloc(stubs, "ef") == []


def test_choose_job() -> None:
    jobs = [{"ID": "web", "Type": "service"}, {"ID": "web-2", "Type": "service"}]
    assert cli_nomad.choose_job(jobs, "web") == "web"  # an exact id wins
    assert cli_nomad.choose_job(jobs[1:], "web") == "web-2"
    with pytest.raises(CliError, match='Prefix "we" matched multiple jobs') as err:
        cli_nomad.choose_job(jobs, "we")
    assert "web-2" in str(err.value)
    with pytest.raises(CliError, match='No job\\(s\\) with prefix or ID "x" found'):
        cli_nomad.choose_job([], "x")


def test_ambiguous_allocs_list_the_candidates() -> None:
    text = fmt.render_ambiguous_allocs([_stub("ab12"), _stub("ab34")], NOW)
    lines = text.splitlines()
    assert lines[0] == "Prefix matched multiple allocations"
    assert lines[2].startswith("ID ")
    assert [line.split()[0] for line in lines[3:]] == ["ab12", "ab34"]


# -- services -----------------------------------------------------------------------


def test_service_list() -> None:
    listing = [
        {
            "Namespace": "default",
            "Services": [
                {"ServiceName": "web", "Tags": ["v1", "http"]},
                {"ServiceName": "api", "Tags": []},
            ],
        }
    ]
    assert fmt.render_service_list(listing).splitlines() == [
        "Service Name  Tags",
        "api           []",
        "web           [http,v1]",
    ]
    assert fmt.render_service_list([]) == "No service registrations found"


def test_service_info() -> None:
    regs = [
        {
            "JobID": "web",
            "Address": "127.0.0.1",
            "Port": 25063,
            "Tags": ["http"],
            "NodeID": "f361dbe7-44eb",
            "AllocID": "2500bd41-e5ed",
        },
        {"JobID": "", "Address": "::1", "Port": 80, "Tags": [], "NodeID": "", "AllocID": ""},
    ]
    assert fmt.render_service_info(regs).splitlines() == [
        "Job ID  Address          Tags    Node ID   Alloc ID",
        "<none>  [::1]:80         []      <none>    <none>",
        "web     127.0.0.1:25063  [http]  f361dbe7  2500bd41",
    ]


# -- plans --------------------------------------------------------------------------


def _plan(diff_type: str, **updates: int) -> dict[str, Any]:
    return {
        "Annotations": {"DesiredTGUpdates": {"web": updates}},
        "Diff": {
            "Type": diff_type,
            "ID": "web",
            "Fields": [],
            "Objects": [],
            "TaskGroups": [
                {
                    "Type": diff_type,
                    "Name": "web",
                    "Fields": [
                        {
                            "Type": "Edited",
                            "Name": "Count",
                            "Old": "2",
                            "New": "3",
                            "Annotations": ["forces create"],
                        },
                    ]
                    if diff_type == "Edited"
                    else [],
                    "Objects": [],
                    "Tasks": [{"Type": "None", "Name": "server", "Fields": [], "Objects": []}],
                }
            ],
        },
        "JobModifyIndex": 7,
        "FailedTGAllocs": None,
    }


def test_plan_of_an_edited_job() -> None:
    resp = _plan("Edited", Place=1, InPlaceUpdate=2)
    text = fmt.render_plan(resp, "web.nomad.hcl")
    assert text.splitlines()[:8] == [
        '+/- Job: "web"',
        '+/- Task Group: "web" (1 create, 2 in-place update)',
        '  +/- Count: "2" => "3" (forces create)',
        '      Task: "server"',
        "",
        "Scheduler dry-run:",
        "- All tasks successfully allocated.",
        "",
    ]
    assert "Job Modify Index: 7" in text
    assert "waypost job run -check-index 7 web.nomad.hcl" in text
    assert fmt.plan_exit_code(resp) == 1


def test_plan_prefers_the_diffs_own_updates() -> None:
    resp = _plan("Added", Place=3)
    resp["Diff"]["TaskGroups"][0]["Updates"] = {"create": 3}
    lines = fmt.render_plan(resp, "f").splitlines()
    assert lines[:3] == ['+ Job: "web"', '+ Task Group: "web" (3 create)', '  Task: "server"']


@pytest.mark.parametrize(
    ("diff_type", "updates", "code"),
    [
        ("None", {"Ignore": 3}, 0),
        ("Edited", {"InPlaceUpdate": 3}, 0),  # Nomad: in place changes no allocation
        ("Edited", {"DestructiveUpdate": 1}, 1),
        ("Edited", {"Stop": 1}, 1),
        ("Added", {"Place": 1}, 1),
    ],
)
def test_plan_exit_code(diff_type: str, updates: dict[str, int], code: int) -> None:
    assert fmt.plan_exit_code(_plan(diff_type, **updates)) == code


def test_plan_with_failed_placements() -> None:
    resp = _plan("Added", Place=1)
    resp["FailedTGAllocs"] = {
        "web": {
            "NodesEvaluated": 1,
            "NodesExhausted": 1,
            "DimensionExhausted": {"network: port collision": 1},
        }
    }
    dry = fmt.render_dry_run(resp)
    assert dry.splitlines() == [
        "- WARNING: Failed to place all allocations.",
        '  Task Group "web" (failed to place 1 allocation):',
        "    * Resources exhausted on 1 nodes",
        '    * Dimension "network: port collision" exhausted on 1 nodes',
    ]


# -- the monitor --------------------------------------------------------------------


def test_alloc_lines() -> None:
    new = _stub("abcdef1234", CreateIndex=10, ClientStatus="pending")
    old = _stub("0123456789", CreateIndex=3)
    lines = fmt.alloc_lines({}, {"a": new, "b": old}, 10, "T")
    assert sorted(lines) == sorted(
        [
            '    T: Allocation "a" created: node "f361dbe7", group "web"',
            '    T: Allocation "b" modified: node "f361dbe7", group "web"',
        ]
    )
    running = {**new, "ClientStatus": "running", "ClientDescription": "Tasks are running"}
    assert fmt.alloc_lines({"a": new}, {"a": running}, 10, "T") == [
        '    T: Allocation "a" status changed: "pending" -> "running" (Tasks are running)'
    ]
    assert fmt.alloc_lines({}, {"a": new}, 10, "T", announce=False) == []


def test_allocs_outcome() -> None:
    up = {"ClientStatus": "running", "TaskStates": {"t": {"State": "running"}}}
    starting = {"ClientStatus": "running", "TaskStates": {"t": {"State": "pending"}}}
    assert fmt.allocs_outcome([up, up]) == fmt.RUNNING
    assert fmt.allocs_outcome([up, starting]) == fmt.WAITING
    assert fmt.allocs_outcome([up, {"ClientStatus": "pending"}]) == fmt.WAITING
    assert fmt.allocs_outcome([starting, {"ClientStatus": "failed"}]) == fmt.FAILED
    assert fmt.allocs_outcome([]) == fmt.RUNNING


# -- flags and addresses ------------------------------------------------------------


def test_parse_flags_go_style() -> None:
    spec = {"detach": bool, "n": int, "task": str}
    values, rest = parse_flags(["-detach", "--n=5", "-task", "server", "file", "-x"], spec)
    assert values == {"detach": True, "n": 5, "task": "server"}
    assert rest == ["file", "-x"]  # flags end at the first argument, as Go's do
    assert parse_flags(["-detach=false", "--", "-file"], spec) == ({"detach": False}, ["-file"])
    assert parse_flags(["-", "x"], spec) == ({}, ["-", "x"])  # "-" is an argument (stdin)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-nope"], "flag provided but not defined: -nope"),
        (["-n"], "flag needs an argument: -n"),
        (["-n", "x"], 'invalid value "x" for flag -n: parse error'),
        (["-detach=maybe"], 'invalid boolean value "maybe" for -detach'),
        (["---x"], "bad flag syntax: ---x"),
    ],
)
def test_parse_flags_errors(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_flags(args, {"detach": bool, "n": int})


def test_help_flag() -> None:
    with pytest.raises(cli_nomad.HelpRequested):
        parse_flags(["-help"], {})


def test_address_and_token_precedence() -> None:
    env = {"NOMAD_ADDR": "http://n:1", "WAYPOST_ADDR": "http://w:2", "NOMAD_TOKEN": "nt"}
    assert cli_nomad.client_of({}, env) == Api("http://w:2", "nt")
    assert cli_nomad.client_of({"address": "http://f:3", "token": "ft"}, env) == Api(
        "http://f:3", "ft"
    )
    assert cli_nomad.client_of({}, {"WAYPOST_TOKEN": "wt", "NOMAD_TOKEN": "nt"}) == Api(
        cli_nomad.DEFAULT_ADDR, "wt"
    )
    assert Api("127.0.0.1:4646").url("/v1/jobs", {"prefix": "a b"}) == (
        "http://127.0.0.1:4646/v1/jobs?prefix=a+b"
    )
    with pytest.raises(UsageError, match="one namespace"):
        cli_nomad.client_of({"namespace": "prod"}, {})


def test_missing_endpoint_is_told_apart_from_an_error() -> None:
    assert HttpError("POST", "u", 404, "no such endpoint: POST /v1/jobs/parse").no_endpoint
    assert HttpError("POST", "u", 405, "method POST not allowed").no_endpoint
    assert not HttpError("GET", "u", 404, "job not found").no_endpoint


# -- commands and exit codes --------------------------------------------------------


def _run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    ui = Ui(out=out, err=err, stdin=io.StringIO(stdin), env={"NOMAD_ADDR": NOWHERE})
    code = cli_nomad.main(list(argv), ui)
    return code, out.getvalue(), err.getvalue()


def test_unreachable_agent_is_exit_1() -> None:
    code, _, err = _run("job", "status")
    assert code == 1
    assert err.startswith("Error querying jobs: GET ")
    assert "127.0.0.1:9" in err


def test_plan_errors_are_255() -> None:
    code, _, err = _run("job", "plan", "/nonexistent/job.hcl")
    assert code == 255
    assert "Error getting job struct" in err
    assert _run("job", "plan")[0] == 255


def test_usage_errors() -> None:
    code, _, err = _run("job", "run")
    assert code == 1
    assert "This command takes one argument: <path>" in err
    assert "waypost job run -help" in err
    assert _run("alloc", "logs")[0] == 1
    assert _run("job", "status", "a", "b")[0] == 1
    assert _run("service", "list", "extra")[0] == 1


def test_one_character_alloc_id() -> None:
    code, _, err = _run("alloc", "status", "a")
    assert (code, err.strip()) == (1, "Identifier must contain at least two characters.")
    code, _, err = _run("alloc", "logs", "a")
    assert (code, err.strip()) == (1, "Alloc ID must contain at least two characters.")


def test_help() -> None:
    code, _, err = _run("job")
    assert code == 1 and "Subcommands:" in err and "run" in err
    code, _, err = _run("job", "run", "-help")
    assert code == 0 and err.startswith("Usage: waypost job run")
    assert _run("alloc", "frobnicate")[0] == 1


def test_job_run_output_prints_the_job_without_an_agent(tmp_path: Any) -> None:
    path = tmp_path / "j.json"
    path.write_text('{"Job": {"ID": "x", "TaskGroups": []}}')
    code, out, _ = _run("job", "run", "-output", str(path))
    assert code == 0
    assert out.startswith('{\n    "Job": {\n        "ID": "x"')


def test_the_waypost_entry_point_dispatches(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["job", "-help"]) == 0
    assert "Usage: waypost job <subcommand>" in capsys.readouterr().err
    assert cli.main(["service", "list", "-address", NOWHERE]) == 1
    assert "Error listing service registrations" in capsys.readouterr().err
