"""Nomad HCL jobspecs (`job "x" { ... }`) as Nomad's API JSON.  Pure: no I/O.

    render_jobspec(body, path, variables)   a parsed HCL file -> Jobspec: the
                                            `{"Job": {...}}` that Nomad's
                                            `/v1/jobs/parse` returns, plus the
                                            HCL line of each JSON path
    parse_variables(body, path)             a variables file (`x = "v"`) -> dict
    canonicalize(job)                       Nomad's defaults for the fields waypost runs

The HCL text is parsed by :mod:`discovery.hclfile` (the adapter around
python-hcl2) into the small tree of this module: :class:`Body` of
:class:`Attr` and :class:`Block`, expressions as :data:`Expr`.  The mapping
follows Nomad's jobspec2 and the `hcl:` tags of api/jobs.go, api/tasks.go,
api/resources.go and api/services.go: `port "http" { static = 8080 }` is a
ReservedPort with Value 8080, a port without `static` a DynamicPort; `service {
port = "http" }` is PortLabel; `logs { max_file_size }` is MaxFileSizeMB;
durations ("10s") become integer nanoseconds, as Nomad's JSON has them.

HCL2 as real jobspecs use it: `variable "x" { default = ... }` (and `variables
{ }`), `var.x`, `locals { }` and `local.x` (in any order), `${...}` in strings
and heredocs (`<<EOF`, `<<-EOF`), `$${` for a literal `${`.  A reference to
anything else (`${NOMAD_PORT_http}`, `${attr.kernel.name}`, `${node.unique.id}`,
`${meta.x}`) is left as written, for the client to interpolate at run time, as
Nomad does.  Functions, conditionals, operators, for-expressions, splats and
template directives are errors.

Nomad's blocks and attributes that waypost does not run (constraint, update,
reschedule, vault, template...) are mapped to their JSON fields, so that
discovery.jobs ignores them with a warning or refuses them by name; a block or
attribute Nomad does not know is an error.

Error handling: ConfigError naming the file, the line and the HCL key path
(`web.nomad:12: job.web.group.api.task.server.config.command: ...`); nothing is
returned then.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from discovery.durations import duration_ns
from discovery.errors import ConfigError, ValidationError

# -- the parsed tree (built by discovery.hclfile) --------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    value: str | int | float | bool | None
    line: int = 0


@dataclass(frozen=True, slots=True)
class Ref:
    """A traversal: `var.x`, `local.y["k"]`, `NOMAD_PORT_http`, `attr.kernel.name`."""

    names: tuple[str | int, ...]
    line: int = 0

    @property
    def source(self) -> str:
        out = str(self.names[0])
        for name in self.names[1:]:
            if isinstance(name, int):
                out += f"[{name}]"
            elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
                out += f".{name}"
            else:
                out += f'["{name}"]'
        return out


@dataclass(frozen=True, slots=True)
class Template:
    """A quoted string or a heredoc: literal text and `${...}` parts."""

    parts: tuple[str | Expr, ...]
    line: int = 0


@dataclass(frozen=True, slots=True)
class TupleExpr:
    items: tuple[Expr, ...]
    line: int = 0


@dataclass(frozen=True, slots=True)
class ObjectExpr:
    items: tuple[tuple[Expr, Expr], ...]
    line: int = 0


@dataclass(frozen=True, slots=True)
class Unsupported:
    """An expression jobspecs on one host do without: `what` says which kind."""

    what: str
    source: str
    line: int = 0


Expr = Literal | Ref | Template | TupleExpr | ObjectExpr | Unsupported


@dataclass(frozen=True, slots=True)
class Attr:
    name: str
    value: Expr
    line: int = 0


@dataclass(frozen=True, slots=True)
class Block:
    type: str
    labels: tuple[str, ...]
    body: Body
    line: int = 0


@dataclass(frozen=True, slots=True)
class Body:
    items: tuple[Attr | Block, ...] = ()

    @property
    def attrs(self) -> tuple[Attr, ...]:
        return tuple(i for i in self.items if isinstance(i, Attr))

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(i for i in self.items if isinstance(i, Block))


@dataclass(frozen=True, slots=True)
class Jobspec:
    """The `{"Job": {...}}` of one file, and where each JSON path came from."""

    body: dict[str, Any]
    lines: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # path -> (line, key)

    def locate(self, json_path: str) -> tuple[int | None, str]:
        """The HCL (line, key) of `json_path` (`Job.TaskGroups[0].Count`), or its
        nearest enclosing object's; (None, "") when none is known."""
        path = json_path.removeprefix("request.")
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None, ""


# -- evaluation ---------------------------------------------------------------------

RUNTIME = "runtime"  # a reference left as written for the client


class _Scope:
    """Variables and locals of one file; locals are evaluated on first use."""

    def __init__(self, path: str, variables: dict[str, Any], locals_: dict[str, Attr]) -> None:
        self.path = path
        self.variables = variables
        self.local_exprs = locals_
        self.locals: dict[str, Any] = {}
        self.evaluating: set[str] = set()

    def fail(self, line: int, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, message, line=line or None, key=key)

    def value(self, expr: Expr, key: str) -> Any:
        """The value of `expr`; `key` names it in errors."""
        if isinstance(expr, Literal):
            return expr.value
        if isinstance(expr, TupleExpr):
            return [self.value(e, f"{key}[{i}]") for i, e in enumerate(expr.items)]
        if isinstance(expr, ObjectExpr):
            out: dict[str, Any] = {}
            for k, v in expr.items:
                name = k.names[0] if isinstance(k, Ref) and len(k.names) == 1 else None
                if name is None:
                    name = self.text(self.value(k, key), k.line, key)
                out[str(name)] = self.value(v, f"{key}.{name}")
            return out
        if isinstance(expr, Ref):
            return self.ref(expr, key)
        if isinstance(expr, Template):
            return self.template(expr, key)
        raise self.fail(
            expr.line,
            key,
            f"{expr.source!r}: {expr.what} is not supported in a waypost jobspec"
            " (variables, locals and ${...} references only)",
        )

    def ref(self, ref: Ref, key: str) -> Any:
        root = ref.names[0]
        if root not in ("var", "local"):
            return "${" + ref.source + "}"  # for the client, as Nomad leaves it
        if len(ref.names) < 2 or not isinstance(ref.names[1], str):
            raise self.fail(ref.line, key, f"{ref.source!r}: name a {root} ({root}.<name>)")
        name = ref.names[1]
        if root == "var":
            if name not in self.variables:
                raise self.fail(ref.line, key, f"{ref.source!r}: no variable {name!r} is declared")
            value = self.variables[name]
        else:
            value = self.local(name, ref, key)
        for step in ref.names[2:]:
            value = self.index(value, step, ref, key)
        return value

    def local(self, name: str, ref: Ref, key: str) -> Any:
        if name in self.locals:
            return self.locals[name]
        attr = self.local_exprs.get(name)
        if attr is None:
            raise self.fail(ref.line, key, f"{ref.source!r}: no local {name!r} is defined")
        if name in self.evaluating:
            raise self.fail(ref.line, key, f"{ref.source!r}: local {name!r} refers to itself")
        self.evaluating.add(name)
        value = self.value(attr.value, f"locals.{name}")
        self.evaluating.discard(name)
        self.locals[name] = value
        return value

    def index(self, value: Any, step: str | int, ref: Ref, key: str) -> Any:
        if isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value):
            return value[step]
        if isinstance(value, dict) and str(step) in value:
            return value[str(step)]
        raise self.fail(ref.line, key, f"{ref.source!r}: no element {step!r}")

    def template(self, expr: Template, key: str) -> Any:
        if len(expr.parts) == 1 and not isinstance(expr.parts[0], str):
            return self.value(expr.parts[0], key)  # "${var.x}" is var.x itself, as in HCL
        out = []
        for part in expr.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            out.append(self.text(self.value(part, key), part.line, key))
        return "".join(out)

    def text(self, value: Any, line: int, key: str) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float | str):
            return str(value)
        shown = "null" if value is None else type(value).__name__
        raise self.fail(line, key, f"a {shown} value cannot be put in a string")


def _variables(body: Body, path: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Declared variables, their defaults replaced by `overrides`."""
    plain = _Scope(path, {}, {})
    declared: dict[str, Any] = {}
    required: dict[str, int] = {}
    types: dict[str, str] = {}
    for block in body.blocks:
        if block.type == "variables":
            _no_labels(block, path, "variables")
            for attr in block.body.attrs:
                declared[attr.name] = plain.value(attr.value, f"variables.{attr.name}")
            _no_blocks(block.body, path, "variables")
            continue
        if block.type != "variable":
            continue
        if len(block.labels) != 1 or not block.labels[0]:
            raise ConfigError(
                path, 'a variable block takes one label: variable "<name>"', line=block.line
            )
        name = block.labels[0]
        where = f"variable.{name}"
        if name in declared or name in required:
            raise ConfigError(path, "is declared twice", line=block.line, key=where)
        default: Attr | None = None
        for item in block.body.items:
            if isinstance(item, Block):
                if item.type != "validation":
                    raise _unknown(path, item, where)
                continue  # a check of the value, with functions: not run here
            if item.name == "default":
                default = item
            elif item.name == "type":
                types[name] = (
                    item.value.source
                    if isinstance(item.value, Unsupported)
                    else (str(item.value.names[0]) if isinstance(item.value, Ref) else "")
                )
            elif item.name not in ("description", "sensitive", "nullable"):
                raise _unknown(path, item, where)
        if default is None:
            required[name] = block.line
        else:
            declared[name] = plain.value(default.value, f"{where}.default")
    for name, value in overrides.items():
        if name not in declared and name not in required:
            raise ConfigError(path, f"variable {name!r} is given a value but not declared")
        declared[name] = _typed(value, types.get(name, ""))
        required.pop(name, None)
    for name, line in required.items():
        message = "has no default and no value was given"
        raise ConfigError(path, message, line=line, key=f"variable.{name}")
    return declared


def _typed(value: Any, kind: str) -> Any:
    """A value given as text (`-var port=8080`) as its declared type."""
    if not isinstance(value, str):
        return value
    if kind == "number" and re.fullmatch(r"-?\d+", value):
        return int(value)
    if kind == "bool" and value in ("true", "false"):
        return value == "true"
    return value


def parse_variables(body: Body, path: str) -> dict[str, Any]:
    """A variables file (`name = value` lines, no references), as Nomad's -var-file."""
    scope = _Scope(path, {}, {})
    _no_blocks(body, path, "")
    return {a.name: scope.value(a.value, a.name) for a in body.attrs}


# -- conversion ---------------------------------------------------------------------

# Attribute kinds: how an HCL value becomes the JSON one.
STR, INT, BOOL, DURATION, STRINGS, ANY, MAP, LABEL = (
    "str",
    "int",
    "bool",
    "duration",
    "strings",
    "any",
    "map",
    "label",
)


@dataclass(frozen=True, slots=True)
class Nested:
    """A block: its JSON key, its schema, whether it repeats and what its label is."""

    schema: Mapping[str, tuple[str, str | Nested]]
    many: bool = False
    label: str = ""  # the JSON key of the block's label ("" -> no label)
    keyed: bool = False  # labelled blocks as an object by label (Volumes)


_GENERIC = Nested({})  # Nomad's blocks waypost does not run: converted without a schema
_GENERIC_MANY = Nested({}, many=True)
_LABELLED_MANY = Nested({}, many=True, label="Name")
_KEYED = Nested({}, label="Name", keyed=True)

_CONSTRAINT = Nested(
    {"attribute": ("LTarget", STR), "operator": ("Operand", STR), "value": ("RTarget", STR)}
    | {n: (n, STR) for n in ("version", "semver", "regexp", "set_contains")}
    | {"distinct_hosts": ("distinct_hosts", BOOL), "distinct_property": ("distinct_property", STR)},
    many=True,
)
_RESTART = Nested(
    {
        "attempts": ("Attempts", INT),
        "interval": ("Interval", DURATION),
        "delay": ("Delay", DURATION),
        "mode": ("Mode", STR),
        "render_templates": ("RenderTemplates", BOOL),
    }
)
_PORT = Nested(
    {
        "static": ("Value", INT),
        "to": ("To", INT),
        "host_network": ("HostNetwork", STR),
        "ignore_collision": ("IgnoreCollision", BOOL),
    },
    many=True,
    label="Label",
)
_NETWORK = Nested(
    {
        "mode": ("Mode", STR),
        "device": ("Device", STR),
        "cidr": ("CIDR", STR),
        "ip": ("IP", STR),
        "hostname": ("Hostname", STR),
        "mbits": ("MBits", INT),
        "dns": (
            "DNS",
            Nested(
                {
                    "servers": ("Servers", STRINGS),
                    "searches": ("Searches", STRINGS),
                    "options": ("Options", STRINGS),
                }
            ),
        ),
        "reserved_ports": ("ReservedPorts", _PORT),
        "port": ("DynamicPorts", _PORT),
    },
    many=True,
)
_CHECK = Nested(
    {
        "name": ("Name", STR),
        "type": ("Type", STR),
        "command": ("Command", STR),
        "args": ("Args", STRINGS),
        "path": ("Path", STR),
        "protocol": ("Protocol", STR),
        "port": ("PortLabel", LABEL),
        "expose": ("Expose", BOOL),
        "address_mode": ("AddressMode", STR),
        "interval": ("Interval", DURATION),
        "timeout": ("Timeout", DURATION),
        "ttl": ("TTL", DURATION),  # waypost's extension (Nomad's ttl checks use interval)
        "initial_status": ("InitialStatus", STR),
        "notes": ("Notes", STR),
        "tls_server_name": ("TLSServerName", STR),
        "tls_skip_verify": ("TLSSkipVerify", BOOL),
        "header": ("Header", "header"),
        "method": ("Method", STR),
        "body": ("Body", STR),
        "check_restart": ("CheckRestart", _GENERIC),
        "grpc_service": ("GRPCService", STR),
        "grpc_use_tls": ("GRPCUseTLS", BOOL),
        "task": ("TaskName", STR),
        "success_before_passing": ("SuccessBeforePassing", INT),
        "failures_before_critical": ("FailuresBeforeCritical", INT),
        "failures_before_warning": ("FailuresBeforeWarning", INT),
        "on_update": ("OnUpdate", STR),
    },
    many=True,
)
_SERVICE = Nested(
    {
        "name": ("Name", STR),
        "tags": ("Tags", STRINGS),
        "canary_tags": ("CanaryTags", STRINGS),
        "enable_tag_override": ("EnableTagOverride", BOOL),
        "port": ("PortLabel", LABEL),
        "address_mode": ("AddressMode", STR),
        "address": ("Address", STR),
        "check": ("Checks", _CHECK),
        "check_restart": ("CheckRestart", _GENERIC),
        "connect": ("Connect", _GENERIC),
        "meta": ("Meta", MAP),
        "canary_meta": ("CanaryMeta", MAP),
        "tagged_addresses": ("TaggedAddresses", MAP),
        "task": ("TaskName", STR),
        "on_update": ("OnUpdate", STR),
        "identity": ("Identity", _GENERIC),
        "weights": ("Weights", _GENERIC),
        "provider": ("Provider", STR),
        "cluster": ("Cluster", STR),
    },
    many=True,
)
_RESOURCES = Nested(
    {
        "cpu": ("CPU", INT),
        "cores": ("Cores", INT),
        "memory": ("MemoryMB", INT),
        "memory_max": ("MemoryMaxMB", INT),
        "disk": ("DiskMB", INT),
        "iops": ("IOPS", INT),
        "secrets": ("SecretsMB", INT),
        "network": ("Networks", _NETWORK),
        "device": ("Devices", _LABELLED_MANY),
        "numa": ("NUMA", _GENERIC),
    }
)
_LOGS = Nested(
    {
        "max_files": ("MaxFiles", INT),
        "max_file_size": ("MaxFileSizeMB", INT),
        "enabled": ("Enabled", BOOL),
        "disabled": ("Disabled", BOOL),
    }
)
_TASK = Nested(
    {
        "driver": ("Driver", STR),
        "user": ("User", STR),
        "config": ("Config", "config"),
        "env": ("Env", MAP),
        "meta": ("Meta", MAP),
        "service": ("Services", _SERVICE),
        "resources": ("Resources", _RESOURCES),
        "restart": ("RestartPolicy", _RESTART),
        "kill_timeout": ("KillTimeout", DURATION),
        "kill_signal": ("KillSignal", STR),
        "logs": ("LogConfig", _LOGS),
        "shutdown_delay": ("ShutdownDelay", DURATION),
        "leader": ("Leader", BOOL),
        "kind": ("Kind", STR),
        "constraint": ("Constraints", _CONSTRAINT),
        "affinity": ("Affinities", _GENERIC_MANY),
        "lifecycle": ("Lifecycle", _GENERIC),
        "artifact": ("Artifacts", _GENERIC_MANY),
        "vault": ("Vault", _GENERIC),
        "consul": ("Consul", _GENERIC),
        "template": ("Templates", _GENERIC_MANY),
        "dispatch_payload": ("DispatchPayload", _GENERIC),
        "volume_mount": ("VolumeMounts", _GENERIC_MANY),
        "csi_plugin": ("CSIPluginConfig", _GENERIC),
        "scaling": ("ScalingPolicies", _GENERIC_MANY),
        "identity": ("Identities", _GENERIC_MANY),
        "action": ("Actions", _LABELLED_MANY),
        "schedule": ("Schedule", _GENERIC),
    },
    many=True,
    label="Name",
)
_GROUP = Nested(
    {
        "count": ("Count", INT),
        "meta": ("Meta", MAP),
        "network": ("Networks", _NETWORK),
        "service": ("Services", _SERVICE),
        "restart": ("RestartPolicy", _RESTART),
        "task": ("Tasks", _TASK),
        "constraint": ("Constraints", _CONSTRAINT),
        "affinity": ("Affinities", _GENERIC_MANY),
        "spread": ("Spreads", _GENERIC_MANY),
        "volume": ("Volumes", _KEYED),
        "disconnect": ("Disconnect", _GENERIC),
        "reschedule": ("ReschedulePolicy", _GENERIC),
        "ephemeral_disk": ("EphemeralDisk", _GENERIC),
        "update": ("Update", _GENERIC),
        "migrate": ("Migrate", _GENERIC),
        "shutdown_delay": ("ShutdownDelay", DURATION),
        "stop_after_client_disconnect": ("StopAfterClientDisconnect", DURATION),
        "max_client_disconnect": ("MaxClientDisconnect", DURATION),
        "scaling": ("Scaling", _GENERIC),
        "consul": ("Consul", _GENERIC),
        "prevent_reschedule_on_lost": ("PreventRescheduleOnLost", BOOL),
        "vault": ("vault", "vault"),  # copied into each task, as Nomad does
    },
    many=True,
    label="Name",
)
_JOB = Nested(
    {
        "id": ("ID", STR),
        "name": ("Name", STR),
        "type": ("Type", STR),
        "namespace": ("Namespace", STR),
        "region": ("Region", STR),
        "priority": ("Priority", INT),
        "all_at_once": ("AllAtOnce", BOOL),
        "datacenters": ("Datacenters", STRINGS),
        "node_pool": ("NodePool", STR),
        "meta": ("Meta", MAP),
        "group": ("TaskGroups", _GROUP),
        "constraint": ("Constraints", _CONSTRAINT),
        "affinity": ("Affinities", _GENERIC_MANY),
        "spread": ("Spreads", _GENERIC_MANY),
        "update": ("Update", _GENERIC),
        "multiregion": ("Multiregion", _GENERIC),
        "periodic": ("Periodic", _GENERIC),
        "parameterized": ("ParameterizedJob", _GENERIC),
        "reschedule": ("Reschedule", _GENERIC),
        "migrate": ("Migrate", _GENERIC),
        "ui": ("UI", _GENERIC),
        "vault": ("vault", "vault"),
        "task": ("task", "task"),  # a task outside a group: a group of its own
    }
)


def render_jobspec(
    body: Body, path: str = "<jobspec>", variables: Mapping[str, Any] | None = None
) -> Jobspec:
    """The job of a parsed HCL jobspec, in Nomad's API JSON (`{"Job": {...}}`).

    `variables` replace the defaults of the file's `variable` blocks (Nomad's
    `-var`).  Error handling: ConfigError naming the file, line and key.
    """
    locals_: dict[str, Attr] = {}
    jobs: list[Block] = []
    for block in body.blocks:
        if block.type == "locals":
            _no_labels(block, path, "locals")
            _no_blocks(block.body, path, "locals")
            for attr in block.body.attrs:
                if attr.name in locals_:
                    raise ConfigError(
                        path, "is defined twice", line=attr.line, key=f"locals.{attr.name}"
                    )
                locals_[attr.name] = attr
        elif block.type == "job":
            jobs.append(block)
        elif block.type not in ("variable", "variables"):
            raise _unknown(path, block, "")
    for attr in body.attrs:
        raise _unknown(path, attr, "")
    if not jobs:
        raise ConfigError(path, 'no job block (job "<id>" { ... })')
    if len(jobs) > 1:
        raise ConfigError(path, "only one job block is allowed", line=jobs[1].line, key="job")
    (block,) = jobs
    if len(block.labels) != 1 or not block.labels[0]:
        raise ConfigError(path, 'a job block takes one label: job "<id>"', line=block.line)
    scope = _Scope(path, _variables(body, path, variables or {}), locals_)
    converter = _Converter(scope)
    key = f"job.{block.labels[0]}"
    job = converter.object(block.body, _JOB, key, "Job", block.line)
    ident = job.pop("ID", block.labels[0])
    job = {"ID": ident, "Name": job.pop("Name", ident), **job}
    converter.lines.setdefault("Job", (block.line, key))
    _lift_tasks(job, converter.lines)
    return Jobspec({"Job": job}, dict(converter.lines))


def _lift_tasks(job: dict[str, Any], lines: dict[str, tuple[int, str]]) -> None:
    """Nomad's normalizeJob: a job's own tasks become groups of one; vault goes to tasks;
    ports with a static value are reserved ones."""
    alone = job.pop("task", [])
    if alone:
        groups = [{"Name": t["Name"], "Tasks": [t]} for t in alone]
        job["TaskGroups"] = groups + job.get("TaskGroups", [])
        shift = len(alone)
        moved = {}
        for path, where in lines.items():
            if path.startswith("Job.TaskGroups["):
                i, _, rest = path.removeprefix("Job.TaskGroups[").partition("]")
                path = f"Job.TaskGroups[{int(i) + shift}]{rest}"
            elif path.startswith("Job.task["):
                i, _, rest = path.removeprefix("Job.task[").partition("]")
                path = f"Job.TaskGroups[{i}].Tasks[0]{rest}"
            moved[path] = where
        lines.clear()
        lines.update(moved)
    vault = job.pop("vault", None)
    for g, group in enumerate(job.get("TaskGroups", [])):
        group_vault = group.pop("vault", None) or vault
        for task in group.get("Tasks", []):
            if group_vault is not None and "Vault" not in task:
                task["Vault"] = group_vault
        for n, network in enumerate(group.get("Networks", [])):
            _reserve_static(network, f"Job.TaskGroups[{g}].Networks[{n}]", lines)


def _reserve_static(network: dict[str, Any], at: str, lines: dict[str, tuple[int, str]]) -> None:
    """`port` blocks with a `static` value are ReservedPorts (Nomad's normalizeNetworkPorts)."""
    ports = network.pop("DynamicPorts", [])
    moves: dict[str, str] = {}
    kept: list[Any] = []
    reserved: list[Any] = list(network.get("ReservedPorts", []))
    for j, port in enumerate(ports):
        target, name = (reserved, "ReservedPorts") if port.get("Value") else (kept, "DynamicPorts")
        moves[f"{at}.DynamicPorts[{j}]"] = f"{at}.{name}[{len(target)}]"
        target.append(port)
    if reserved:
        network["ReservedPorts"] = reserved
    if kept:
        network["DynamicPorts"] = kept
    moved = {}
    for path, where in lines.items():
        for old, new in moves.items():
            if path == old or path.startswith((old + ".", old + "[")):
                path = new + path[len(old) :]
                break
        moved[path] = where
    lines.clear()
    lines.update(moved)


class _Converter:
    def __init__(self, scope: _Scope) -> None:
        self.scope = scope
        self.path = scope.path
        self.lines: dict[str, tuple[int, str]] = {}

    def fail(self, line: int, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, message, line=line or None, key=key)

    def object(self, body: Body, nested: Nested, key: str, at: str, line: int) -> dict[str, Any]:
        """The JSON object of a block's `body` by `nested`'s schema; `at` is its JSON path."""
        self.lines[at] = (line, key)
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for item in body.items:
            spec = nested.schema.get(item.name if isinstance(item, Attr) else item.type)
            name = item.name if isinstance(item, Attr) else item.type
            where = f"{key}.{name}"
            if spec is None:
                raise _unknown(self.path, item, key)
            json_key, kind = spec
            if isinstance(item, Attr):
                if isinstance(kind, Nested) or kind in ("vault", "task"):
                    raise self.fail(item.line, where, f"is a block: write {name} {{ ... }}")
                if name in seen or json_key in out:
                    raise self.fail(item.line, where, "is defined twice")
                seen[name] = item.line
                self.lines[f"{at}.{json_key}"] = (item.line, where)
                out[json_key] = self.attribute(item, kind, where)
                continue
            self.block(item, json_key, kind, out, where, at)
        return out

    def block(
        self,
        block: Block,
        json_key: str,
        kind: str | Nested,
        out: dict[str, Any],
        key: str,
        at: str,
    ) -> None:
        name = block.type
        if isinstance(kind, str):
            if kind in (MAP, "config", "header"):
                _no_labels(block, self.path, key)
                if json_key in out:
                    raise self.fail(block.line, key, f"only one {name} block is allowed")
                self.lines[f"{at}.{json_key}"] = (block.line, key)
                value = self.free(block.body, key, f"{at}.{json_key}")
                out[json_key] = (
                    self.string_map(value, block.line, key)
                    if kind == MAP
                    else self.header(value, block.line, key)
                    if kind == "header"
                    else value
                )
                return
            if kind == "vault":
                kind = _GENERIC
                json_key = "vault"
            elif kind == "task":
                kind = _TASK
                json_key = "task"
            else:
                raise self.fail(block.line, key, f"is an attribute: write {name} = ...")
        assert isinstance(kind, Nested)
        if kind.label:
            if len(block.labels) != 1 or not block.labels[0]:
                message = f'a {name} block takes one label: {name} "<name>" {{ ... }}'
                raise self.fail(block.line, key, message)
            key = f"{key}.{block.labels[0]}"
        else:
            _no_labels(block, self.path, key)
        if kind.keyed:
            items = out.setdefault(json_key, {})
            item_at = f"{at}.{json_key}.{block.labels[0]}"
            value = self.generic(block.body, key, item_at, block.line)
            value[kind.label] = block.labels[0]
            items[block.labels[0]] = value
            return
        if kind.many:
            items = out.setdefault(json_key, [])
            item_at = f"{at}.{json_key}[{len(items)}]"
        else:
            if json_key in out:
                raise self.fail(block.line, key, f"only one {name} block is allowed")
            item_at = f"{at}.{json_key}"
        if kind.schema:
            value = self.object(block.body, kind, key, item_at, block.line)
        else:
            value = self.generic(block.body, key, item_at, block.line)
        if kind.label:
            value = {kind.label: block.labels[0], **value}
        if kind.many:
            items.append(value)
        else:
            out[json_key] = value

    def generic(self, body: Body, key: str, at: str, line: int) -> dict[str, Any]:
        """A block Nomad knows and waypost does not run: CamelCase keys of its values."""
        self.lines[at] = (line, key)
        value = self.free(body, key)
        return {_camel(k): v for k, v in value.items()}

    def free(self, body: Body, key: str, at: str = "") -> dict[str, Any]:
        """A block without a schema (`config`, `meta`): attributes and nested blocks as values."""
        out: dict[str, Any] = {}
        for item in body.items:
            if isinstance(item, Attr):
                if item.name in out:
                    raise self.fail(item.line, f"{key}.{item.name}", "is defined twice")
                if at:
                    self.lines[f"{at}.{item.name}"] = (item.line, f"{key}.{item.name}")
                out[item.name] = self.scope.value(item.value, f"{key}.{item.name}")
                continue
            value = self.free(item.body, f"{key}.{item.type}")
            for label in reversed(item.labels):
                value = {label: value}
            previous = out.get(item.type)
            if isinstance(previous, list):
                previous.append(value)
            elif previous is not None:
                out[item.type] = [previous, value]
            else:
                out[item.type] = value
        return out

    def attribute(self, attr: Attr, kind: str | Nested, key: str) -> Any:
        value = self.scope.value(attr.value, key)
        line = attr.line
        try:
            return _CONVERT[str(kind)](value, key)
        except ValidationError as err:
            raise self.fail(line, key, err.message) from None
        except KeyError:  # a MAP, config or header attribute
            if kind == MAP:
                return self.string_map(value, line, key)
            if kind == "header":
                return self.header(value, line, key)
            if not isinstance(value, dict):
                raise self.fail(line, key, "must be an object") from None
            return value

    def string_map(self, value: Any, line: int, key: str) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.fail(line, key, "must be an object of strings")
        out = {}
        for name, item in value.items():
            try:
                out[name] = _str(item, f"{key}.{name}")
            except ValidationError as err:
                raise self.fail(line, err.field, err.message) from None
        return out

    def header(self, value: Any, line: int, key: str) -> dict[str, list[str]]:
        if not isinstance(value, dict):
            raise self.fail(line, key, 'must be an object of lists: header { X = ["v"] }')
        try:
            return {name: _strings(item, f"{key}.{name}") for name, item in value.items()}
        except ValidationError as err:
            raise self.fail(line, err.field, err.message) from None


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _str(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValidationError(key, f"must be a string, not {_kind(value)}")


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ValidationError(key, "must be a number, not a bool")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise ValidationError(key, f"must be a whole number, not {_kind(value)}")


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise ValidationError(key, f"must be true or false, not {_kind(value)}")


def _duration(value: Any, key: str) -> int:
    """Nanoseconds: a Go duration string ("10s"), or a number (nanoseconds, as in Nomad)."""
    if isinstance(value, str):
        return duration_ns(value, key)
    return _int(value, key)


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ValidationError(key, f"must be a list of strings, not {_kind(value)}")
    return [_str(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _label(value: Any, key: str) -> str:
    """A port label, or a port number given as a number."""
    return _str(value, key)


def _any(value: Any, key: str) -> Any:
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


_CONVERT: dict[str, Callable[[Any, str], Any]] = {
    STR: _str,
    INT: _int,
    BOOL: _bool,
    DURATION: _duration,
    STRINGS: _strings,
    LABEL: _label,
    ANY: _any,
}


def _unknown(path: str, item: Attr | Block, where: str) -> ConfigError:
    if isinstance(item, Attr):
        key = f"{where}.{item.name}" if where else item.name
        return ConfigError(path, "unknown attribute", line=item.line or None, key=key)
    key = f"{where}.{item.type}" if where else item.type
    return ConfigError(path, "unknown block", line=item.line or None, key=key)


def _no_labels(block: Block, path: str, key: str) -> None:
    if block.labels:
        message = f"a {block.type} block takes no labels"
        raise ConfigError(path, message, line=block.line or None, key=key or block.type)


def _no_blocks(body: Body, path: str, key: str) -> None:
    for block in body.blocks:
        raise _unknown(path, block, key)


# -- Canonicalize -------------------------------------------------------------------

_SECOND = 10**9


def canonicalize(job: dict[str, Any]) -> dict[str, Any]:
    """`job` (the inner object) with Nomad's defaults filled in for the fields waypost
    runs (api.Job.Canonicalize's, for service jobs); the others are left unset, so the
    result posts back without warnings."""
    out = dict(job)
    out.setdefault("Type", "service")
    out.setdefault("Namespace", "default")
    out.setdefault("Meta", {})
    groups = []
    for raw in out.get("TaskGroups", []):
        group = dict(raw)
        group.setdefault("Count", 1)
        group.setdefault("Meta", {})
        group["RestartPolicy"] = {
            "Attempts": 2,
            "Interval": 1800 * _SECOND,
            "Delay": 15 * _SECOND,
            "Mode": "fail",
        } | group.get("RestartPolicy", {})
        tasks = []
        for task_raw in group.get("Tasks", []):
            task = dict(task_raw)
            task["Resources"] = {"CPU": 100, "MemoryMB": 300} | task.get("Resources", {})
            task["LogConfig"] = {"MaxFiles": 10, "MaxFileSizeMB": 10} | task.get("LogConfig", {})
            task.setdefault("KillTimeout", 5 * _SECOND)
            tasks.append(task)
        group["Tasks"] = tasks
        groups.append(group)
    out["TaskGroups"] = groups
    return out
