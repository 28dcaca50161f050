"""The `waypost` command line.  Adapter: argv and stderr around the agent.

    waypost agent [--config FILE_OR_DIR]... [--dev] [--dns-addr HOST:PORT]
                  [--http-addr HOST:PORT] [--data-dir DIR] [--job FILE]...
    waypost job run|plan|stop|status ...     Nomad's CLI verbs against a running agent
    waypost alloc status|logs ...            (discovery.cli_nomad; `waypost job -help`)
    waypost service list|info ...
    waypost net up|down|list|reconcile ...   allocation networking by hand (netsetup.cli)

`--job FILE` is a job in Nomad's API JSON (`{"Job": {...}}`, what `nomad job run
-output` prints, or the bare job), run at start; unchanged across restarts it is a
no-op.  A file that does not parse is a usage error.

Exit codes: 0 after SIGTERM/SIGINT, 1 when the agent cannot start (address
in use...), 2 for a usage or configuration error (nothing is bound then).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence

from discovery.agent import run_agent
from discovery.config import AgentConfig, Endpoint, Overrides, parse_endpoint
from discovery.errors import ConfigError, ValidationError
from discovery.hclfile import load_config
from discovery.jobs import JobSpec, parse_job

EXIT_USAGE = 2  # argparse's code for bad usage; config errors share it


class _Formatter(logging.Formatter):
    """`waypost: message`, with the level named when it is not plain information."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"waypost: {record.levelname.lower()}: {text}"
        return f"waypost: {text}"


def _endpoint_arg(text: str) -> Endpoint:
    try:
        return parse_endpoint(text)
    except ValidationError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waypost", description="Service discovery for one host: DNS and HTTP."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    agent = commands.add_parser("agent", help="run the agent", description="Run the agent.")
    agent.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE_OR_DIR",
        help="HCL or JSON config file, or a directory of *.hcl and *.json files"
        " (repeatable; later files extend earlier ones)",
    )
    agent.add_argument(
        "--dev", action="store_true", help="development mode: data dir ./data by default"
    )
    agent.add_argument(
        "--dns-addr",
        type=_endpoint_arg,
        metavar="HOST:PORT",
        help="DNS listen address (UDP and TCP; port 0 picks one); default 127.0.0.1:8600",
    )
    agent.add_argument(
        "--http-addr",
        type=_endpoint_arg,
        metavar="HOST:PORT",
        help="HTTP API listen address (port 0 picks one); default 127.0.0.1:4646",
    )
    agent.add_argument("--data-dir", metavar="DIR", help="state directory")
    agent.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="FILE",
        help="a job in Nomad's API JSON, run at start (repeatable; idempotent across restarts)",
    )
    for group, verbs in (
        ("job", "run, plan, stop, status"),
        ("alloc", "status, logs"),
        ("service", "list, info"),
    ):
        commands.add_parser(
            group,
            help=f"Nomad's `{group}` commands against a running agent: {verbs}",
            description=f"See `waypost {group} -help`.",
            add_help=False,
        )
    commands.add_parser(
        "net",
        help="allocation networking by hand (root): up, down, list, reconcile",
        description="See `waypost net --help`.",
        add_help=False,
    )
    return parser


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def load_jobs(paths: Sequence[str]) -> list[JobSpec]:
    """The jobs in `paths`; ConfigError naming the file and the field when one is bad.

    A file is an HCL jobspec (`job "web" { ... }`, discovery.jobspec) when its name
    ends in .hcl or .nomad or its first non-space character is not `{`, else
    Nomad's API JSON.  An HCL file's errors name its line and HCL key, those
    found in the job it gives too.  Two files of the same job id are an error:
    the second would silently replace the first at every start.
    """
    jobs: list[JobSpec] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, ValueError) as exc:
            raise ConfigError(path, f"cannot read the job: {exc}") from None
        spec = _hcl_job(text, path) if _is_hcl(path, text) else _json_job(text, path)
        if spec.id in seen:
            raise ConfigError(path, f"job {spec.id!r} is in {seen[spec.id]} too", key="Job.ID")
        seen[spec.id] = path
        jobs.append(spec)
    return jobs


HCL_SUFFIXES = (".hcl", ".nomad")  # what `nomad job run` reads as HCL, by name


def _is_hcl(path: str, text: str) -> bool:
    """Nomad's rule (jobspec2 isJSON), with the file's name deciding first."""
    return path.endswith(HCL_SUFFIXES) or not text.lstrip().startswith("{")


def _json_job(text: str, path: str) -> JobSpec:
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ConfigError(path, f"cannot read the job: {exc}") from None
    try:
        return parse_job(body)
    except ValidationError as err:
        raise ConfigError(path, err.message, key=err.field) from None


def _hcl_job(text: str, path: str) -> JobSpec:
    # Imported here: only --job reads HCL jobspecs (load_config reads the config).
    from discovery.hclfile import parse_jobspec

    jobspec = parse_jobspec(text, path)
    try:
        return parse_job(jobspec.body)
    except ValidationError as err:
        line, key = jobspec.locate(err.field)
        message = f"{err.message} ({err.field})"
        raise ConfigError(path, message, line=line, key=key or err.field) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `waypost` console script and `python -m discovery`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["net"]:  # allocation networking by hand: netsetup's own command line
        from netsetup import cli as netsetup_cli  # only then: pyroute2 stays out of the agent

        return netsetup_cli.main(argv[1:])
    if argv[:1] in (["job"], ["alloc"], ["service"]):  # Nomad's CLI verbs, over HTTP
        from discovery import cli_nomad  # the client side: urllib only, no agent

        return cli_nomad.main(argv)
    args = build_parser().parse_args(argv)
    overrides = Overrides(
        dev=args.dev,
        dns_addr=args.dns_addr,
        http_addr=args.http_addr,
        data_dir=args.data_dir,
        # Defaults of the `consul` block, as every Consul client reads them.
        consul_http_addr=os.environ.get("CONSUL_HTTP_ADDR", ""),
        consul_http_token=os.environ.get("CONSUL_HTTP_TOKEN", ""),
    )
    paths: list[str] = args.config
    hostname = socket.gethostname()

    def load() -> AgentConfig:
        return load_config(paths, overrides, hostname=hostname)

    try:
        config = load()
        jobs = load_jobs(args.job)
    except ConfigError as err:
        print(f"waypost: {err}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging()
    return run_agent(config, load, jobs)
