"""Jobs in Nomad's HTTP API shape, their allocations and service instances.  Pure: no I/O.

    parse_job(body)            the body of `POST /v1/jobs` ({"Job": {...}} or a bare job)
                               -> JobSpec; ValidationError naming the JSON path
                               (`Job.TaskGroups[0].Networks[0].DynamicPorts[1].Label`)
    render_job(spec)           JobSpec -> Nomad-shaped JSON (parse_job(render_job(s)) == s)
    plan_allocs(spec)          one PlannedAlloc per group index: a uuid4 and Nomad's name
                               "<job>.<group>[<i>]", with the netsetup NetworkSpec to set up
    plan_instances(...)        the registry instances of one allocation from its AllocNetwork

The subset of Nomad's job (api/jobs.go, api/tasks.go, api/resources.go,
api/services.go): `ID`, `Name`, `Type` ("service"), `Meta`, `TaskGroups[]` with
`Name`, `Count`, `Meta`, `RestartPolicy`, `Networks[]` (at most one: `Mode`
host|bridge, `ReservedPorts[]`, `DynamicPorts[]` with `Label`, `Value`, `To`,
`HostNetwork`, and `DNS` with `Servers`, `Searches`, `Options`), `Services[]`
and `Tasks[]` (discovery.tasks.spec: the exec driver's fields, and the task's
own `Services[]`).  A service has `Name`,
`PortLabel`, `Tags`, `Meta`, `AddressMode` auto|host|alloc and `Checks[]` with
`Name`, `Type` http|tcp|ttl, `Path`, `Protocol`, `PortLabel`, `Interval`,
`Timeout`, `TTL`, `InitialStatus`.  Durations: integers are nanoseconds (what
Nomad's API sends), strings are Go durations ("10s").

Unknown keys: Nomad's own documented fields that waypost does not implement
(Constraints, Update, Datacenters...) are accepted and ignored, so a job
exported from Nomad posts unchanged, and those with a value are listed in
`JobSpec.warnings` (Nomad's bookkeeping, Status or CreateIndex, is not); any
other key is rejected as an "unknown field", which catches misspellings
(`Lable`, `Servics`) that would otherwise silently drop a port or a service.
Nomad fields that would change the result if ignored (Service.Connect,
Task.Templates, another driver...) are rejected as "not supported by waypost"
(discovery.nomadjson).  Keys are matched case-sensitively.  A group needs at
least one task, as in Nomad.

Service addresses follow Nomad's rules: AddressMode auto and host advertise
the host IP and the mapped host port; alloc advertises the allocation's IP and
the port inside (`To`), and needs bridge mode.  A numeric PortLabel is that port
as is.  Service ids are Nomad's (`_nomad-task-<allocID>-group-<group>-<service>-<port
label>` for a group's services, `_nomad-task-<allocID>-<task>-<service>-<port label>`
for a task's), the source is "job", `alloc_id` ties each instance to its allocation
and `job_id` to its job (Nomad's `JobID` in `/v1/service/:name`).

Every job instance has, besides its own checks, a check of kind "task"
(:func:`task_check_id`): passing while the tasks it belongs to run (a task's
services: that task; a group's: every task of the group), critical otherwise, so an
instance leaves DNS the moment its task exits; discovery.allocations sets it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from discovery.errors import ValidationError
from discovery.model import (
    Check,
    CheckKind,
    Health,
    Instance,
    check_int,
    check_label,
    make_check,
    make_instance,
)
from discovery.nomadjson import JsonObject, ns, seconds
from discovery.tasks.spec import (
    MAX_META,
    MAX_TASKS,
    RestartPolicy,
    TaskSpec,
    parse_restart,
    parse_task,
    render_restart,
    render_task,
)
from netsetup.errors import SpecError
from netsetup.spec import DEFAULT_HOST_NETWORK, AllocNetwork, DnsConfig, NetworkSpec, PortSpec

HOST_NETWORK = NetworkSpec()  # a group without Networks: host mode, no ports
SOURCE = "job"  # Instance.source of the instances jobs register
MAX_COUNT = 512  # allocations per group: one host, each holding ports (and an IP in bridge)
MAX_ALLOCS = MAX_COUNT  # per job, all groups together: a job is set up all or nothing
MAX_GROUPS = 64
MAX_SERVICES = 64  # per group
MAX_CHECKS = 16  # per service
MAX_DNS_ITEMS = 16  # per list of a network's DNS block (glibc reads 3 servers, 6 searches)
DEFAULT_CHECK_TIMEOUT = 10.0  # seconds, when a check gives none (Consul's default)
MAX_NAME = 128
# Job and group ids go into allocation names "<job>.<group>[<i>]", service ids and
# Nomad's env; letters, digits, `_`, `.` and `-`, starting with a letter or digit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ADDRESS_MODES = ("auto", "host", "alloc")
JOB_TYPES = ("service",)
NAMESPACE = "default"  # the only Nomad namespace waypost has
TASK_PREFIX = "_nomad-task-"  # Nomad's structs.NomadTaskPrefix

# Nomad's documented fields that waypost accepts and ignores, per object.
_IGNORED_REQUEST = frozenset(
    {"EnforceIndex", "JobModifyIndex", "PolicyOverride", "PreserveCounts", "EvalPriority"}
    | {"Submission", "Region", "Namespace"}
)
_IGNORED_JOB = frozenset(
    {"Region", "Priority", "AllAtOnce", "Datacenters", "NodePool", "Constraints", "Affinities"}
    | {"Update", "Multiregion", "Spreads", "Periodic", "ParameterizedJob", "Dispatched"}
    | {"DispatchIdempotencyToken", "Payload", "Reschedule", "Migrate", "ConsulToken"}
    | {"VaultToken", "ConsulNamespace", "VaultNamespace", "NomadTokenID", "Status", "Stop"}
    | {"StatusDescription", "Stable", "Version", "SubmitTime", "CreateIndex", "ModifyIndex"}
    | {"JobModifyIndex", "ParentID", "UI", "VersionTag", "ParentJob"}
)
# Nomad's own bookkeeping in the job it prints: ignored without a warning.
_QUIET_REQUEST = _IGNORED_REQUEST - {"Region", "Namespace"}
_QUIET_JOB = frozenset(
    {"Status", "StatusDescription", "Stable", "Version", "SubmitTime", "CreateIndex"}
    | {"ModifyIndex", "JobModifyIndex", "ParentID", "Dispatched", "NomadTokenID", "VersionTag"}
)
_IGNORED_GROUP = frozenset(
    {"Constraints", "Affinities", "Spreads", "Disconnect"}
    | {"ReschedulePolicy", "EphemeralDisk", "Update", "Migrate", "ShutdownDelay"}
    | {"StopAfterClientDisconnect", "MaxClientDisconnect", "Scaling", "Consul"}
    | {"PreventRescheduleOnLost"}
)
_IGNORED_NETWORK = frozenset({"Device", "CIDR", "IP", "MBits", "Hostname"})
_IGNORED_PORT = frozenset({"IgnoreCollision"})
_IGNORED_SERVICE = frozenset(
    {"Id", "CanaryTags", "EnableTagOverride", "CheckRestart", "CanaryMeta", "TaskName"}
    | {"OnUpdate", "Identity", "Provider", "Cluster", "Weights", "TaggedAddresses"}
)
_IGNORED_CHECK = frozenset(
    {"Id", "CheckRestart", "TaskName", "OnUpdate", "SuccessBeforePassing", "Notes"}
    | {"FailuresBeforeCritical", "FailuresBeforeWarning", "TLSServerName", "TLSSkipVerify"}
)
DEFAULT_RESTART = RestartPolicy()  # Nomad's for service jobs
TASK_CHECK_PREFIX = "_nomad-task:"  # the id of an instance's task check: prefix + instance id


# -- the spec ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """A service's `Checks[]` entry, durations in seconds."""

    name: str
    kind: CheckKind
    path: str = ""  # http only
    protocol: str = "http"  # http only: http or https
    port_label: str = ""  # "" -> the service's port
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    initial_status: str = ""  # "" -> critical


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A group's `Services[]` entry."""

    name: str
    port_label: str = ""  # a port label of the group, a number, or ""
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    address_mode: str = "auto"
    checks: tuple[CheckSpec, ...] = ()
    task: str = ""  # the task it belongs to; "" for a group's service


@dataclass(frozen=True, slots=True)
class GroupSpec:
    name: str
    count: int = 1
    network: NetworkSpec = HOST_NETWORK
    services: tuple[ServiceSpec, ...] = ()  # the group's and its tasks' (`task` set)
    tasks: tuple[TaskSpec, ...] = ()
    restart: RestartPolicy = DEFAULT_RESTART
    meta: tuple[tuple[str, str], ...] = ()

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    def restart_of(self, task: TaskSpec) -> RestartPolicy:
        """The task's own restart policy, else the group's."""
        return task.restart or self.restart


@dataclass(frozen=True, slots=True)
class JobSpec:
    id: str
    name: str
    groups: tuple[GroupSpec, ...]
    meta: tuple[tuple[str, str], ...] = ()
    # The ignored fields that had a value: what the job asks that one host cannot
    # mean.  Not part of the job: the same job without them is the same job.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def group(self, name: str) -> GroupSpec:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class PlannedAlloc:
    """One allocation of a job: what netsetup sets up and how it is named."""

    id: str
    name: str  # Nomad's "<job>.<group>[<index>]"
    job_id: str
    group: str
    index: int
    network: NetworkSpec


# -- parsing -------------------------------------------------------------------------


def _name(value: str, path: str) -> str:
    if not value:
        raise ValidationError(path, "is required")
    if len(value) > MAX_NAME or not _NAME.fullmatch(value):
        raise ValidationError(
            path,
            f"{value!r} is not a valid name (1-{MAX_NAME} of letters, digits, '_', '.', '-',"
            " starting with a letter or digit)",
        )
    return value


def parse_job(body: object, *, host_networks: Collection[str] | None = None) -> JobSpec:
    """The job of a `POST /v1/jobs` body (`{"Job": {...}}`, or the job object itself).

    Nomad's fields that mean nothing here and have a value are listed in the
    spec's `warnings` (`Job.TaskGroups[0].Update: ignored (means nothing on one host)`).
    `host_networks`, when given, are the names a port's `HostNetwork` may take
    (the client's `host_network` blocks; "" and "default" always).

    Error handling: ValidationError naming the JSON path of the first bad field.
    """
    warnings: list[str] = []
    if isinstance(body, Mapping) and "Job" in body:
        request = JsonObject(
            body, "request", {"Job"}, _IGNORED_REQUEST, warnings=warnings, quiet=_QUIET_REQUEST
        )
        spec = _parse_job(request.get("Job"), warnings)
    else:
        spec = _parse_job(body, warnings)
    if host_networks is not None:
        check_host_networks(spec, host_networks)
    return replace(spec, warnings=tuple(warnings))


def check_host_networks(spec: JobSpec, known: Collection[str]) -> None:
    """A ValidationError at the port's `HostNetwork` when it names no host network in
    `known` (a 400 now, rather than netsetup's refusal once allocations are set up)."""
    names = {"", DEFAULT_HOST_NETWORK, *known}
    for i, group in enumerate(spec.groups):
        counts = {True: 0, False: 0}
        for port in group.network.ports:
            static = port.static is not None
            j = counts[static]
            counts[static] += 1
            if port.host_network in names:
                continue
            kind = "ReservedPorts" if static else "DynamicPorts"
            where = f"Job.TaskGroups[{i}].Networks[0].{kind}[{j}].HostNetwork"
            listed = ", ".join(sorted(n for n in names if n))
            raise ValidationError(
                where, f"unknown host network {port.host_network!r} (known: {listed})"
            )


def _parse_job(raw: object, warnings: list[str]) -> JobSpec:
    obj = JsonObject(
        raw,
        "Job",
        {"ID", "Name", "Type", "TaskGroups", "Namespace", "Meta"},
        _IGNORED_JOB,
        warnings=warnings,
        quiet=_QUIET_JOB,
    )
    ident = _name(obj.text("ID"), obj.at("ID"))
    name = obj.text("Name") or ident
    if len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise ValidationError(obj.at("Name"), f"must be at most {MAX_NAME} printable characters")
    kind = obj.text("Type", "service")
    if kind not in JOB_TYPES:
        raise ValidationError(obj.at("Type"), f"{kind!r}: only service jobs are supported")
    namespace = obj.text("Namespace", NAMESPACE)
    if namespace != NAMESPACE:
        raise ValidationError(obj.at("Namespace"), f"waypost has only the {NAMESPACE!r} namespace")
    groups = tuple(
        _parse_group(item, path, warnings) for path, item in obj.items("TaskGroups", MAX_GROUPS)
    )
    if not groups:
        raise ValidationError(obj.at("TaskGroups"), "a job needs at least one group")
    seen: set[str] = set()
    for i, group in enumerate(groups):
        if group.name in seen:
            raise ValidationError(f"Job.TaskGroups[{i}].Name", f"duplicate group {group.name!r}")
        seen.add(group.name)
    total = sum(g.count for g in groups)
    if total > MAX_ALLOCS:
        raise ValidationError(
            obj.at("TaskGroups"), f"{total} allocations: at most {MAX_ALLOCS} per job"
        )
    _check_static_ports(groups)
    return JobSpec(ident, name, groups, obj.string_map("Meta", MAX_META))


def _check_static_ports(groups: Iterable[GroupSpec]) -> None:
    """One host gives a static port (of one host network) to one allocation only.

    So a static port in a group of Count > 1, or the same one twice in a job, can
    never be set up: a 400 now rather than a 409 after setting up the others.
    """
    taken: dict[tuple[str, int], str] = {}
    for i, group in enumerate(groups):
        if group.count == 0:
            continue
        for j, port in enumerate(p for p in group.network.ports if p.static is not None):
            where = f"Job.TaskGroups[{i}].Networks[0].ReservedPorts[{j}].Value"
            if group.count > 1:
                raise ValidationError(
                    where,
                    f"static port {port.static} ({port.label!r}) with Count {group.count}:"
                    " one host gives it to one allocation only",
                )
            key = (port.host_network, port.static or 0)
            if key in taken:
                raise ValidationError(where, f"static port {port.static} is {taken[key]} already")
            taken[key] = f"port {port.label!r} of group {group.name!r}"


def _parse_group(raw: object, path: str, warnings: list[str]) -> GroupSpec:
    known = {"Name", "Count", "Networks", "Services", "Tasks", "Meta", "RestartPolicy"}
    obj = JsonObject(raw, path, known, _IGNORED_GROUP, warnings=warnings)
    name = _name(obj.text("Name"), obj.at("Name"))
    count_raw = obj.get("Count")
    count = 1 if count_raw is None else check_int(count_raw, obj.at("Count"), 0, MAX_COUNT)
    networks = obj.items("Networks", 1)
    network = _parse_network(networks[0][1], networks[0][0], warnings) if networks else HOST_NETWORK
    services = [
        (p, _parse_service(item, p, warnings)) for p, item in obj.items("Services", MAX_SERVICES)
    ]
    restart = parse_restart(obj.get("RestartPolicy"), obj.at("RestartPolicy"), None, warnings)
    tasks: list[TaskSpec] = []
    for where, item in obj.items("Tasks", MAX_TASKS):
        task = parse_task(
            item, where, known=frozenset({"Services"}), restart=restart, warnings=warnings
        )
        if any(t.name == task.name for t in tasks):
            raise ValidationError(f"{where}.Name", f"duplicate task {task.name!r}")
        tasks.append(task)
        task_obj = JsonObject(item, where, {"Services"}, frozenset(item))
        for p, svc in task_obj.items("Services", MAX_SERVICES):
            services.append((p, replace(_parse_service(svc, p, warnings), task=task.name)))
    if not tasks:
        raise ValidationError(obj.at("Tasks"), f"group {name!r} needs at least one task")
    _check_services(services, network)
    return GroupSpec(
        name,
        count,
        network,
        tuple(svc for _, svc in services),
        tuple(tasks),
        restart,
        obj.string_map("Meta", MAX_META),
    )


def _check_services(services: list[tuple[str, ServiceSpec]], network: NetworkSpec) -> None:
    labels = {p.label for p in network.ports}
    seen: set[tuple[str, str, str]] = set()
    for where, svc in services:
        if svc.port_label and not svc.port_label.isdigit() and svc.port_label not in labels:
            raise ValidationError(f"{where}.PortLabel", f"no port labelled {svc.port_label!r}")
        if svc.address_mode == "alloc" and network.mode != "bridge":
            raise ValidationError(f"{where}.AddressMode", "alloc needs a bridge network")
        for n, check in enumerate(svc.checks):
            label = check.port_label
            if label and not label.isdigit() and label not in labels:
                raise ValidationError(
                    f"{where}.Checks[{n}].PortLabel", f"no port labelled {label!r}"
                )
        if (svc.task, svc.name, svc.port_label) in seen:
            raise ValidationError(where, f"service {svc.name!r} on {svc.port_label!r} twice")
        seen.add((svc.task, svc.name, svc.port_label))


def _parse_network(raw: object, path: str, warnings: list[str]) -> NetworkSpec:
    known = {"Mode", "ReservedPorts", "DynamicPorts", "DNS"}
    obj = JsonObject(raw, path, known, _IGNORED_NETWORK, warnings=warnings)
    mode = obj.text("Mode") or "host"
    if mode not in ("host", "bridge"):
        raise ValidationError(obj.at("Mode"), f"{mode!r}: must be host or bridge")
    ports: list[PortSpec] = []
    seen: set[str] = set()
    for key, static in (("ReservedPorts", True), ("DynamicPorts", False)):
        for where, item in obj.items(key, 256):
            port = _parse_port(item, where, warnings, static=static)
            if port.label in seen:
                raise ValidationError(f"{where}.Label", f"duplicate port label {port.label!r}")
            seen.add(port.label)
            ports.append(port)
    dns = _parse_dns(obj.get("DNS"), obj.at("DNS"))
    return NetworkSpec(mode="bridge" if mode == "bridge" else "host", ports=tuple(ports), dns=dns)


def _parse_dns(raw: object, path: str) -> DnsConfig | None:
    """Nomad's `dns { servers, searches, options }`; null is no block (Nomad's nil)."""
    if raw is None:
        return None
    obj = JsonObject(raw, path, {"Servers", "Searches", "Options"})
    lists = [obj.strings(key, MAX_DNS_ITEMS) for key in ("Servers", "Searches", "Options")]
    try:
        return DnsConfig(*lists)
    except SpecError as err:  # network.dns.servers[1] -> <path>.Servers[1]
        where = err.field.removeprefix("network.dns.")
        raise ValidationError(f"{path}.{where[:1].upper()}{where[1:]}", err.message) from None


def _parse_port(raw: object, path: str, warnings: list[str], *, static: bool) -> PortSpec:
    known = {"Label", "Value", "To", "HostNetwork"}
    obj = JsonObject(raw, path, known, _IGNORED_PORT, warnings=warnings)
    label = obj.text("Label")
    if not label or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", label):
        raise ValidationError(obj.at("Label"), f"{label!r} is not a port label")
    value = obj.get("Value")
    number: int | None = None
    if static:
        number = check_int(value, obj.at("Value"), 1, 65535)
    elif value not in (None, 0):  # Nomad fills Value in for dynamic ports when it reads a job
        check_int(value, obj.at("Value"), 0, 65535)
    to = obj.get("To")
    to = 0 if to is None else check_int(to, obj.at("To"), -1, 65535)
    host_network = obj.text("HostNetwork")
    return PortSpec(label, number, to, host_network)


def _port_label(obj: JsonObject, key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValidationError(obj.at(key), "must be a port label or a port number")
    if value.isdigit():
        check_int(int(value), obj.at(key), 1, 65535)
    return value


def _parse_service(raw: object, path: str, warnings: list[str]) -> ServiceSpec:
    known = {"Name", "PortLabel", "Tags", "Meta", "AddressMode", "Checks"}
    obj = JsonObject(raw, path, known, _IGNORED_SERVICE, warnings=warnings)
    name = check_label(obj.get("Name"), obj.at("Name"))
    mode = obj.text("AddressMode") or "auto"
    if mode not in ADDRESS_MODES:
        raise ValidationError(obj.at("AddressMode"), f"{mode!r}: must be auto, host or alloc")
    try:  # tags and meta as the registry checks them
        probe = make_instance(
            service=name,
            node="probe",
            address="127.0.0.1",
            tags=obj.get("Tags"),
            meta=obj.get("Meta"),
        )
    except ValidationError as err:
        field = err.field.replace("tags", "Tags", 1).replace("meta", "Meta", 1)
        raise ValidationError(f"{path}.{field}", err.message) from None
    checks = tuple(_parse_check(item, p, warnings) for p, item in obj.items("Checks", MAX_CHECKS))
    return ServiceSpec(
        name=name,
        port_label=_port_label(obj, "PortLabel"),
        tags=probe.tags,
        meta=tuple(sorted(probe.meta.items())),
        address_mode=mode,
        checks=checks,
    )


def _parse_check(raw: object, path: str, warnings: list[str]) -> CheckSpec:
    known = {"Name", "Type", "Path", "Protocol", "PortLabel", "Interval", "Timeout", "TTL"}
    known |= {"InitialStatus", "AddressMode"}
    obj = JsonObject(raw, path, known, _IGNORED_CHECK, warnings=warnings)
    kind_text = obj.text("Type")
    try:
        kind = CheckKind(kind_text)
    except ValueError:
        raise ValidationError(obj.at("Type"), f"{kind_text!r}: must be http, tcp or ttl") from None
    status = obj.text("InitialStatus")
    if status not in ("", "passing", "warning", "critical"):
        raise ValidationError(obj.at("InitialStatus"), "must be passing, warning or critical")
    if obj.text("AddressMode") not in ("", "host"):
        raise ValidationError(obj.at("AddressMode"), "only host checks are supported")
    timed = kind is not CheckKind.TTL
    interval = seconds(obj.get("Interval") or 0, obj.at("Interval"))
    timeout = seconds(obj.get("Timeout") or 0, obj.at("Timeout"))
    ttl = seconds(obj.get("TTL") or 0, obj.at("TTL"))
    if timed and interval <= 0:
        raise ValidationError(obj.at("Interval"), f"is required for {kind} checks")
    if not timed and ttl <= 0:
        ttl, interval = interval, 0.0  # Nomad has no TTL field: the interval is the TTL
        if ttl <= 0:
            raise ValidationError(obj.at("TTL"), "is required for ttl checks")
    protocol = obj.text("Protocol") or "http"
    if protocol not in ("http", "https"):
        raise ValidationError(obj.at("Protocol"), "must be http or https")
    check_path = obj.text("Path")
    if kind is CheckKind.HTTP and not check_path.startswith("/"):
        raise ValidationError(obj.at("Path"), "an http check needs a Path starting with /")
    return CheckSpec(
        name=obj.text("Name"),
        kind=kind,
        path=check_path if kind is CheckKind.HTTP else "",
        protocol=protocol if kind is CheckKind.HTTP else "http",
        port_label=_port_label(obj, "PortLabel"),
        interval=interval if timed else 0.0,
        timeout=(timeout or DEFAULT_CHECK_TIMEOUT) if timed else 0.0,
        ttl=0.0 if timed else ttl,
        initial_status=status,
    )


# -- rendering -----------------------------------------------------------------------


def render_job(spec: JobSpec) -> dict[str, Any]:
    """`spec` in Nomad's API shape (the inverse of :func:`parse_job`)."""
    return {
        "ID": spec.id,
        "Name": spec.name,
        "Type": "service",
        "Namespace": NAMESPACE,
        "Meta": dict(spec.meta),
        "TaskGroups": [_render_group(g) for g in spec.groups],
    }


def _render_group(group: GroupSpec) -> dict[str, Any]:
    net = group.network
    reserved = [p for p in net.ports if p.static is not None]
    dynamic = [p for p in net.ports if p.static is None]
    return {
        "Name": group.name,
        "Count": group.count,
        "Networks": [
            {
                "Mode": net.mode,
                "ReservedPorts": [_render_port(p) for p in reserved],
                "DynamicPorts": [_render_port(p) for p in dynamic],
                "DNS": _render_dns(net.dns),
            }
        ],
        "Services": [_render_service(s) for s in group.services if not s.task],
        "Tasks": [
            {
                **render_task(t),
                "Services": [_render_service(s) for s in group.services if s.task == t.name],
            }
            for t in group.tasks
        ],
        "RestartPolicy": render_restart(group.restart),
        "Meta": dict(group.meta),
    }


def _render_dns(dns: DnsConfig | None) -> dict[str, Any] | None:
    if dns is None:
        return None
    return {
        "Servers": list(dns.servers),
        "Searches": list(dns.searches),
        "Options": list(dns.options),
    }


def _render_port(port: PortSpec) -> dict[str, Any]:
    return {
        "Label": port.label,
        "Value": port.static or 0,
        "To": port.to,
        "HostNetwork": port.host_network,
    }


def _render_service(svc: ServiceSpec) -> dict[str, Any]:
    return {
        "Name": svc.name,
        "PortLabel": svc.port_label,
        "Tags": list(svc.tags),
        "Meta": dict(svc.meta),
        "AddressMode": svc.address_mode,
        "Checks": [
            {
                "Name": c.name,
                "Type": c.kind.value,
                "Path": c.path,
                "Protocol": c.protocol,
                "PortLabel": c.port_label,
                "Interval": ns(c.interval),
                "Timeout": ns(c.timeout),
                "TTL": ns(c.ttl),
                "InitialStatus": c.initial_status,
            }
            for c in svc.checks
        ],
    }


# -- planning ------------------------------------------------------------------------


def alloc_name(job_id: str, group: str, index: int) -> str:
    """Nomad's allocation name (structs.AllocName)."""
    return f"{job_id}.{group}[{index}]"


def plan_allocs(
    spec: JobSpec, new_id: Callable[[], str] = lambda: str(uuid.uuid4())
) -> tuple[PlannedAlloc, ...]:
    """One allocation per group index, in group order; `new_id` makes the ids (uuid4)."""
    return tuple(
        PlannedAlloc(new_id(), alloc_name(spec.id, g.name, i), spec.id, g.name, i, g.network)
        for g in spec.groups
        for i in range(g.count)
    )


def service_id(alloc_id: str, group: str, service: str, port_label: str, task: str = "") -> str:
    """Nomad's id of a service (structs.MakeAllocServiceID; a group's: task "group-<group>")."""
    owner = task or f"group-{group}"
    return f"{TASK_PREFIX}{alloc_id}-{owner}-{service}-{port_label}"


def task_check_id(instance_id: str) -> str:
    return TASK_CHECK_PREFIX + instance_id


def service_tasks(group: GroupSpec, svc: ServiceSpec) -> tuple[str, ...]:
    """The tasks whose running an instance of `svc` depends on."""
    return (svc.task,) if svc.task else tuple(t.name for t in group.tasks)


def task_check(instance_id: str, tasks: tuple[str, ...]) -> Check:
    """The instance's task check, critical until its tasks run (see the module docstring)."""
    names = ", ".join(f'"{t}"' for t in tasks)
    return make_check(
        id=task_check_id(instance_id),
        name=f"Nomad task{'s' if len(tasks) > 1 else ''} {names}",
        kind=CheckKind.TASK,
        status=Health.CRITICAL,
        notes="passing while the allocation's task runs (set by waypost)",
    )


def _endpoint(network: AllocNetwork, label: str, mode: str) -> tuple[str, int]:
    """The (address, port) a service or check on `label` advertises (Nomad's rules)."""
    alloc_mode = mode == "alloc"
    address = (network.alloc_ip or network.alloc_ip6) if alloc_mode else network.host_ip
    if not label:
        return address, 0
    if label.isdigit():
        return address, int(label)
    mapping = network.port(label)
    return address, mapping.alloc_port if alloc_mode else mapping.host_port


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _checks(svc: ServiceSpec, ident: str, network: AllocNetwork) -> tuple[Check, ...]:
    out = []
    for n, c in enumerate(svc.checks, 1):
        suffix = f":{n}" if len(svc.checks) > 1 else ""
        address, port = _endpoint(network, c.port_label or svc.port_label, svc.address_mode)
        target = ""
        if c.kind is CheckKind.HTTP:
            target = f"{c.protocol}://{_host(address)}:{port}{c.path}"
        elif c.kind is CheckKind.TCP:
            target = f"{_host(address)}:{port}"
        out.append(
            make_check(
                id=f"service:{ident}{suffix}",
                name=c.name or f"service: {svc.name!r} check",
                kind=c.kind,
                target=target,
                ttl=c.ttl,
                interval=c.interval,
                timeout=c.timeout,
                status=c.initial_status or None,
            )
        )
    return tuple(out)


def plan_instances(
    alloc: PlannedAlloc, group: GroupSpec, network: AllocNetwork, node: str
) -> tuple[Instance, ...]:
    """The registry instances of `alloc`'s services, placed by `network` (what netsetup gave).

    Error handling: ValidationError when a service cannot be placed (a check on
    port 0); the job's parse catches what it can before anything is set up.
    """
    out = []
    ports = {p.label: p.host_port for p in network.ports}
    for svc in group.services:
        ident = service_id(alloc.id, alloc.group, svc.name, svc.port_label, svc.task)
        address, port = _endpoint(network, svc.port_label, svc.address_mode)
        checks = (*_checks(svc, ident, network), task_check(ident, service_tasks(group, svc)))
        out.append(
            make_instance(
                service=svc.name,
                id=ident,
                node=node,
                address=address,
                port=port,
                tags=svc.tags,
                meta=dict(svc.meta),
                ports=ports if svc.address_mode != "alloc" else _alloc_ports(network),
                alloc_id=alloc.id,
                job_id=alloc.job_id,
                source=SOURCE,
                checks=checks,
            )
        )
    return tuple(out)


def _alloc_ports(network: AllocNetwork) -> dict[str, int]:
    return {p.label: p.alloc_port for p in network.ports}


def alloc_addresses(network: AllocNetwork) -> tuple[str, ...]:
    """What `<alloc-id-prefix>.alloc.<domain>` answers: the namespace's IPs, else the host's."""
    inside = tuple(a for a in (network.alloc_ip, network.alloc_ip6) if a)
    return inside or (network.host_ip,)
