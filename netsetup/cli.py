"""`waypost net`: allocation networking by hand, for operators.  Composition root (root).

    waypost net up --alloc ID [--mode bridge|host] [--port LABEL[:STATIC][:TO]]...
    waypost net down --alloc ID
    waypost net list
    waypost net reconcile
    common: [--data-dir DIR] [--config FILE]

`--port http` is a dynamic port, `http:8080` the static port 8080, `http::80` a dynamic
port forwarded to 80 inside, `http:8080:80` both.  `--config` is a JSON object of
NetConfig fields (`bridge`, `subnet`, `min_dynamic_port`, `host_networks`: [{name,
address, reserved_ports}], ...); the agent passes its own NetConfig to `main` instead.

Output is JSON on stdout: `up` prints the allocation with its NOMAD_* environment,
`down` whether the state knew it, `list` every allocation, `reconcile` the report.
Exit codes: 0 done, 1 the change failed (nothing half-made is left, or the error lists
what teardown could not remove), 2 bad usage or config, 3 not root / a tool missing.

The same state as the agent (<data_dir>/netsetup.db) and the same kernel objects: an
allocation made here is the agent's to see, and the other way round.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netsetup.env import render_env
from netsetup.errors import InvalidName, NetsetupError, NotRoot, SpecError, ToolMissing
from netsetup.firewall import Firewall
from netsetup.network import NetworkManager, start_network_manager
from netsetup.spec import (
    HostNetwork,
    NetConfig,
    NetworkSpec,
    PortSpec,
    render_result,
)
from netsetup.state import open_state

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PRIVILEGE = 3  # not root, nft missing: fix the host, not the command


def parse_port(text: str) -> PortSpec:
    """`LABEL[:STATIC][:TO]` as a PortSpec; SpecError naming the flag when malformed."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise SpecError("--port", f"expected LABEL[:STATIC][:TO], got {text!r}")
    numbers: list[int | None] = []
    for part in parts[1:] + [""] * (3 - len(parts)):
        try:
            numbers.append(int(part) if part else None)
        except ValueError:
            raise SpecError("--port", f"not a port number: {part!r} in {text!r}") from None
    static, to = numbers
    return PortSpec(label=parts[0], static=static, to=0 if to is None else to)


def parse_config(raw: object, source: str) -> NetConfig:
    """A NetConfig from a decoded JSON object; SpecError naming the field."""
    if not isinstance(raw, dict):
        raise SpecError(source, "must be a JSON object of NetConfig fields")
    known = {f.name for f in dataclasses.fields(NetConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(unknown[0], f"unknown NetConfig field in {source}")
    fields: dict[str, Any] = dict(raw)
    networks = fields.pop("host_networks", [])
    if not isinstance(networks, list) or not all(isinstance(n, dict) for n in networks):
        raise SpecError("host_networks", "must be a list of objects")
    try:
        return NetConfig(**fields, host_networks=tuple(HostNetwork(**n) for n in networks))
    except TypeError as exc:
        raise SpecError(source, str(exc)) from None


def load_config(path: str | None) -> NetConfig:
    """The NetConfig in the JSON file `path`; the defaults without one."""
    if path is None:
        return NetConfig()
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SpecError("--config", f"{path}: {exc}") from None
    return parse_config(raw, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waypost net", description="Allocation networking by hand (root)."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", metavar="DIR", help="state directory (netsetup.db)")
    common.add_argument("--config", metavar="FILE", help="JSON object of NetConfig fields")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    up = verbs.add_parser("up", parents=[common], help="set up an allocation's network")
    up.add_argument("--alloc", required=True, metavar="ID")
    up.add_argument("--mode", choices=("bridge", "host"), default="bridge")
    up.add_argument(
        "--port", action="append", default=[], metavar="LABEL[:STATIC][:TO]", help="repeatable"
    )
    down = verbs.add_parser("down", parents=[common], help="tear an allocation's network down")
    down.add_argument("--alloc", required=True, metavar="ID")
    verbs.add_parser("list", parents=[common], help="the allocations that are set up")
    verbs.add_parser("reconcile", parents=[common], help="adopt, repair, clean up (at start)")
    return parser


def _needs_root(args: argparse.Namespace) -> bool:
    """Every verb that changes the kernel; host-mode `up` and `list` only use the state."""
    return args.verb in ("down", "reconcile") or (args.verb == "up" and args.mode == "bridge")


async def _run(args: argparse.Namespace, config: NetConfig) -> Any:
    state = open_state(config.data_dir)
    try:
        manager = await start_network_manager(config, state, Firewall(config))
        try:
            return await _verb(manager, args)
        finally:
            await manager.close()
    finally:
        state.close()


async def _verb(manager: NetworkManager, args: argparse.Namespace) -> Any:
    if args.verb == "up":
        spec = NetworkSpec(mode=args.mode, ports=tuple(parse_port(p) for p in args.port))
        result = await manager.setup(args.alloc, spec)
        return {**render_result(result), "env": render_env(result)}
    if args.verb == "down":
        return {"alloc_id": args.alloc, "known": await manager.teardown(args.alloc)}
    if args.verb == "list":
        return [render_result(a) for a in await manager.list()]
    return dataclasses.asdict(await manager.reconcile())


def main(argv: Sequence[str] | None = None, *, config: NetConfig | None = None) -> int:
    """Run `waypost net <argv>`; `config` replaces --config (the agent passes its own)."""
    args = build_parser().parse_args(argv)
    try:
        for port in args.port if args.verb == "up" else ():
            parse_port(port)  # usage errors before anything else
        settings = config or load_config(args.config)
        if args.data_dir:
            settings = dataclasses.replace(settings, data_dir=args.data_dir)
        if _needs_root(args) and os.geteuid() != 0:
            raise NotRoot(f"waypost net {args.verb}")
        output = asyncio.run(_run(args, settings))
    except (SpecError, InvalidName) as exc:
        print(f"waypost net: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (NotRoot, ToolMissing) as exc:
        print(f"waypost net: {exc}", file=sys.stderr)
        return EXIT_PRIVILEGE
    except NetsetupError as exc:
        print(f"waypost net: {args.verb} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    json.dump(output, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
