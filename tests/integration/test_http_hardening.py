"""The HTTP API against hostile input: bodies, malformed requests, slow heads, many sockets.

First the pure parts (discovery.api's JSON decoder, httpapi's redaction and log
budget, jobs' host-network check), then real servers on 127.0.0.1 port 0 with
raw sockets (asyncio streams) where aiohttp's client would not send the bytes:
every error is JSON in the `{"error", "field"}` shape, never a 500, no token
in a log line or an answer, a head that trickles in is answered 408, and one
client address cannot hold more than its share of connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery import api_consul
from discovery.acl import AclSettings
from discovery.api import MAX_JSON_DEPTH, ApiContext, check_json_limits, decode_json
from discovery.checks import CheckRunner
from discovery.durations import parse_duration
from discovery.errors import ValidationError
from discovery.httpapi import (
    ERROR_LOG_PER_SECOND,
    ConnectionLimits,
    HttpServer,
    LogBudget,
    redact,
    start_http,
)
from discovery.jobs import parse_job
from discovery.nomadjson import seconds
from discovery.registry import Registry
from tests.integration.http_fixtures import LOCAL_NODE, MemoryDurability, RunningApi, running_api
from tests.integration.test_jobs_agent import SLEEPER, agent_config, running, url

TIMEOUT = 5.0
DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE = "9" * 5000  # over Python's int-string conversion limit (4300 digits)
SECRET = "s3cr3t-token-value"


@pytest.fixture
async def http_api() -> AsyncIterator[RunningApi]:
    async with running_api() as api:
        yield api


def _job(port: dict[str, Any]) -> dict[str, Any]:
    network = {"Mode": "host", "DynamicPorts": [port]}
    group = {"Name": "g", "Networks": [network], "Tasks": [SLEEPER]}
    return {"Job": {"ID": "j", "TaskGroups": [group]}}


# -- pure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (DEEP, f"is nested deeper than {MAX_JSON_DEPTH} levels"),
        (b'{"a":' * 65 + b"1" + b"}" * 65, f"is nested deeper than {MAX_JSON_DEPTH} levels"),
        (f'{{"Port": {HUGE}}}'.encode(), "has a number of 5000 digits (at most 32)"),
        (f'{{"Port": -{HUGE}}}'.encode(), "has a number of 5000 digits (at most 32)"),
        (b'{"Port": NaN}', "has NaN (not JSON)"),
        (b'{"Port": 1', "is not valid JSON: Expecting ',' delimiter at line 1 column 11"),
        (b"\xff{}", "is not UTF-8 text"),
    ],
)
def test_decode_json_refuses_with_a_validation_error(body: bytes, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_json(body)
    assert (caught.value.field, caught.value.message) == ("body", message)


def test_decode_json_takes_what_nomad_and_consul_send() -> None:
    nested = b'{"a":' * 64 + b"1" + b"}" * 64
    assert decode_json(nested) is not None
    assert decode_json(b'{"Port": 18446744073709551615, "W": -1.5e3}') == {
        "Port": 18446744073709551615,
        "W": -1500.0,
    }


@pytest.mark.parametrize("value", [HUGE + "s", "2562048h", 10**30])
def test_durations_longer_than_go_allows_are_refused(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_duration(value, "Check.TTL")
    assert caught.value.field == "Check.TTL"
    with pytest.raises(ValidationError):
        seconds(value, "Job.X")


def test_check_json_limits_leaves_what_is_not_json_to_the_handler() -> None:
    check_json_limits(b"job { }")  # HCL, or anything else: the endpoint's to judge
    check_json_limits(b'{"Job": ')  # truncated JSON: the endpoint's error message
    with pytest.raises(ValidationError):
        check_json_limits(DEEP)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("b'X-Consul-Token: abc\\x01'\n   ^", "b'X-Consul-Token: [redacted]\n   ^"),
        ("x-nomad-token:abc def", "x-nomad-token:[redacted]"),
        ("b'Authorization: Bearer abc'", "b'Authorization: [redacted]"),
        ("b'GET /v1/kv?token=abc&x=1 HTTP/1.1'", "b'GET /v1/kv?token=[redacted]&x=1 HTTP/1.1'"),
        ("b'GET /?a=1&token=abc HTTP/1.1'", "b'GET /?a=1&token=[redacted] HTTP/1.1'"),
        ("Invalid method encountered", "Invalid method encountered"),
    ],
)
def test_redact_cuts_token_values(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_log_budget_counts_what_it_holds_back() -> None:
    budget = LogBudget(2)
    assert [budget.take(10.1), budget.take(10.5), budget.take(10.9), budget.take(10.95)] == [
        0,
        0,
        None,
        None,
    ]
    assert budget.take(11.0) == 2  # the next second's first line tells of the two
    assert budget.take(11.1) == 0


def test_an_unknown_host_network_names_the_port_field() -> None:
    body = _job({"Label": "http", "HostNetwork": "nope"})
    with pytest.raises(ValidationError) as caught:
        parse_job(body, host_networks=("public",))
    assert caught.value.field == "Job.TaskGroups[0].Networks[0].DynamicPorts[0].HostNetwork"
    assert "'nope'" in caught.value.message and "public" in caught.value.message
    for known in ("public", "default", ""):
        parse_job(_job({"Label": "http", "HostNetwork": known}), host_networks=("public",))


# -- bodies over HTTP ---------------------------------------------------------------------


async def _put(api_url: str, path: str, body: bytes, method: str = "PUT") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, api_url + path, data=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        ) as r,
    ):
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/agent/service/register", DEEP),
        ("/v1/agent/service/register", f'{{"Name": "web", "Port": {HUGE}}}'.encode()),
        ("/v1/agent/check/update/c1", f'{{"Status": "passing", "Output": {HUGE}}}'.encode()),
        ("/v1/agent/check/update/c1", f'{{"Status": {HUGE}}}'.encode()),
    ],
)
async def test_consul_bodies_over_the_limits_are_400(
    http_api: RunningApi, path: str, body: bytes
) -> None:
    status, answer = await _put(http_api.url, path, body)
    assert status == 400
    assert answer["field"] == "body"


async def test_job_bodies_over_the_limits_are_400(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path)) as agent:
        for body in (DEEP, f'{{"Job": {{"ID": "j", "Priority": {HUGE}}}}}'.encode()):
            status, answer = await _put(url(agent, ""), "/v1/jobs", body, method="POST")
            assert (status, answer["field"]) == (400, "body"), answer


async def test_a_huge_index_is_400(http_api: RunningApi) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{http_api.url}/v1/catalog/services?index={HUGE}") as r,
    ):
        assert r.status == 400
        assert (await r.json())["field"] == "index"


# -- aiohttp's own errors, over raw sockets ---------------------------------------------


async def _exchange(server: HttpServer, data: bytes) -> bytes:
    """Send `data`, read until the server closes (every error answer closes)."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


def _split(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), fields, json.loads(body)


MALFORMED = [
    f"GET / HTTP/1.1\r\nHost: x\r\nX-Consul-Token: {SECRET}\x01\r\n\r\n",
    f"GET / HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: {SECRET}\x7f\r\n\r\n",
    f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\x00\r\n\r\n",
    f"GARBAGE?token={SECRET} HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /v1/agent/self?token={SECRET} HTTP/9.9\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED)
async def test_malformed_requests_get_json_without_the_token(
    http_api: RunningApi, request_bytes: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, fields, body = _split(await _exchange(http_api.server, request_bytes.encode()))
    assert status == 400
    assert fields["content-type"].startswith("application/json")
    assert set(body) == {"error"} and body["error"]
    assert SECRET not in json.dumps(body)
    assert caplog.records, "a bad request is logged"
    assert all(SECRET not in r.getMessage() and not r.exc_info for r in caplog.records)
    assert SECRET not in caplog.text


async def test_unknown_routes_and_methods_are_json(http_api: RunningApi) -> None:
    for method, path, status in (("GET", "/nope", 404), ("DELETE", "/v1/agent/services", 405)):
        raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        got, fields, body = _split(await _exchange(http_api.server, raw.encode()))
        assert (got, fields["content-type"].split(";")[0]) == (status, "application/json")
        assert set(body) == {"error"}


async def test_bad_requests_log_a_few_lines_a_second(
    http_api: RunningApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="discovery.httpapi")
    sent = 40
    started = time.monotonic()
    for _ in range(sent):
        raw = await _exchange(http_api.server, f"GARBAGE?token={SECRET} HTTP/1.1\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.")
    seconds = math.ceil(time.monotonic() - started) + 1
    lines = [r for r in caplog.records if r.name == "discovery.httpapi"]
    assert 1 <= len(lines) <= ERROR_LOG_PER_SECOND * seconds
    assert len(lines) < sent
    assert all(r.exc_info is None and SECRET not in r.getMessage() for r in lines)


# -- slow heads and many connections ------------------------------------------------------


@asynccontextmanager
async def _limited(limits: ConnectionLimits) -> AsyncIterator[HttpServer]:
    registry = Registry(LOCAL_NODE, index=1)
    checks = CheckRunner(registry)
    checks.start()
    ctx = ApiContext(registry, MemoryDurability(), checks, "dc1", LOCAL_NODE.name)
    try:
        server = await start_http(
            ctx, api_consul.ROUTES, AclSettings(), "127.0.0.1", 0, limits=limits
        )
        try:
            yield server
        finally:
            await server.close()
    finally:
        await checks.close()


SHORT = ConnectionLimits(head_timeout=0.3)
HALF_HEAD = b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n"
NOT_PLAIN = b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\n"


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return int(head.split()[1]), await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


@pytest.mark.parametrize("before", [b"", NOT_PLAIN], ids=["fast-path", "aiohttp"])
async def test_a_head_that_never_ends_is_answered_408(before: bytes) -> None:
    async with _limited(SHORT) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            if before:  # a request the fast path does not frame: aiohttp has the connection
                writer.write(before)
                assert (await _read_response(reader))[0] == 200
            writer.write(HALF_HEAD)
            await writer.drain()
            status, body = await _read_response(reader)
            assert status == 408
            assert "request head" in json.loads(body)["error"]
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed
        finally:
            writer.close()
            await writer.wait_closed()


@pytest.mark.parametrize("before", [b"", NOT_PLAIN], ids=["fast-path", "aiohttp"])
async def test_a_head_in_pieces_within_the_timeout_is_answered(before: bytes) -> None:
    limits = ConnectionLimits(head_timeout=3.0)
    async with _limited(limits) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            if before:
                writer.write(before)
                assert (await _read_response(reader))[0] == 200
            for _ in range(3):
                writer.write(HALF_HEAD)
                await asyncio.sleep(0.05)
                writer.write(b"\r\n")
                assert (await _read_response(reader))[0] == 200
        finally:
            writer.close()
            await writer.wait_closed()


async def test_one_client_address_has_a_bounded_number_of_connections() -> None:
    async with _limited(ConnectionLimits(per_client=3)) as server:
        opened = [await asyncio.open_connection(server.host, server.port) for _ in range(3)]
        try:
            for reader, writer in opened:  # all three served
                writer.write(b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await _read_response(reader))[0] == 200
            status, _, body = _split(await _exchange(server, b""))
            assert status == 429
            assert "3 connections" in body["error"]
        finally:
            for _, writer in opened:
                writer.close()
                await writer.wait_closed()
        for _ in range(50):  # the server sees the closes: room again
            raw = await _exchange(
                server, b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            if raw.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no connection served after the others closed")
