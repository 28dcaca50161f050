"""discovery.tasks.logs: finding offsets, cutting and rotating log files.

find_start and cut are pure (Nomad's findClosest, logmon's cut); the rotator's
tests write real files in tmp_path and read them back; no pipes are read and no
process is started.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from discovery.tasks.logs import (
    LogNotifier,
    LogRotator,
    cut,
    ensure_fifo,
    fifo_path,
    find_start,
    log_files,
)

# A test waits this long at most for a waiter that should already be awake; the
# waiters themselves wait an hour, so one that is not woken fails the test.
WAKE_BOUND = 30.0
HOUR = 3600.0

# -- find_start ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "offset", "expected"),
    [
        ([100], 0, (0, 0)),
        ([100], 50, (0, 50)),
        ([100], 100, (0, 100)),
        ([100], 150, (0, 100)),  # past the end: the end
        ([100, 200, 50], 0, (0, 0)),
        ([100, 200, 50], 99, (0, 99)),
        ([100, 200, 50], 100, (0, 100)),  # a file's end, as Nomad's `offset <= size`
        ([100, 200, 50], 101, (1, 1)),
        ([100, 200, 50], 300, (1, 200)),
        ([100, 200, 50], 301, (2, 1)),
        ([100, 200, 50], 350, (2, 50)),
        ([100, 200, 50], 10_000, (2, 50)),
        ([0, 100], 0, (0, 0)),
        ([0, 100], 30, (1, 30)),
        ([100, 0], 150, (1, 0)),
    ],
)
def test_find_start_from_the_start(
    sizes: list[int], offset: int, expected: tuple[int, int]
) -> None:
    assert find_start(sizes, offset, from_end=False) == expected


@pytest.mark.parametrize(
    ("sizes", "offset", "expected"),
    [
        ([100], 0, (0, 100)),
        ([100], 30, (0, 70)),
        ([100], 100, (0, 0)),
        ([100], 150, (0, 0)),  # before the first file: its start
        ([100, 200, 50], 0, (2, 50)),
        ([100, 200, 50], 10, (2, 40)),
        ([100, 200, 50], 50, (2, 0)),
        ([100, 200, 50], 51, (1, 199)),
        ([100, 200, 50], 250, (1, 0)),
        ([100, 200, 50], 251, (0, 99)),
        ([100, 200, 50], 350, (0, 0)),
        ([100, 200, 50], 10_000, (0, 0)),
        ([100, 0], 10, (0, 90)),  # an empty newest file
    ],
)
def test_find_start_from_the_end(sizes: list[int], offset: int, expected: tuple[int, int]) -> None:
    assert find_start(sizes, offset, from_end=True) == expected


@pytest.mark.parametrize("from_end", [False, True])
def test_find_start_without_files(from_end: bool) -> None:
    with pytest.raises(ValueError):
        find_start([], 0, from_end=from_end)


@pytest.mark.parametrize("offset", [*range(0, 350, 7), 99, 100, 101, 299, 300, 301, 350])
def test_find_start_from_both_ends_agree(offset: int) -> None:
    """`offset` from the start is `total - offset` from the end, the same byte."""
    sizes = [100, 200, 50]
    i, at = find_start(sizes, offset, from_end=False)
    j, back = find_start(sizes, sum(sizes) - offset, from_end=True)
    assert sum(sizes[:i]) + at == sum(sizes[:j]) + back == offset


# -- cut -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "room", "empty", "n"),
    [
        (b"abc\n", 10, False, 4),  # fits
        (b"abc\n", 4, False, 4),  # fits exactly
        (b"abc", 10, False, 3),  # fits, even without a newline
        (b"ab\ncd\nef", 7, False, 6),  # up to the last newline that fits
        (b"ab\ncd\nef", 5, False, 3),
        (b"ab\ncd\nef", 6, False, 6),
        (b"ab\ncdef", 3, False, 3),
        (b"ab\ncdef", 2, False, 0),  # the newline does not fit: next file
        (b"abcdef", 4, True, 4),  # an empty file takes a long line mid-way
        (b"abcdef", 4, False, 0),  # a non-empty one does not
        (b"ab\ncdef", 2, True, 2),
        (b"\n\n\n", 2, False, 2),
        (b"", 0, False, 0),
        (b"", 0, True, 0),
    ],
)
def test_cut(data: bytes, room: int, empty: bool, n: int) -> None:
    assert cut(data, room, empty=empty) == n
    assert cut(memoryview(data), room, empty=empty) == n


# -- log_files -----------------------------------------------------------------------


def test_log_files_by_index(tmp_path: Path) -> None:
    for name in ["web.stdout.0", "web.stdout.2", "web.stdout.10", "web.stdout.1"]:
        (tmp_path / name).write_bytes(b"x")
    assert log_files(tmp_path, "web", "stdout") == [
        (0, tmp_path / "web.stdout.0"),
        (1, tmp_path / "web.stdout.1"),
        (2, tmp_path / "web.stdout.2"),
        (10, tmp_path / "web.stdout.10"),  # by number, not by name
    ]


def test_log_files_ignores_everything_else(tmp_path: Path) -> None:
    ensure_fifo(fifo_path(tmp_path, "web", "stdout"))  # the task's pipe, `.web.stdout.fifo`
    ensure_fifo(fifo_path(tmp_path, "web", "stderr"))
    others = ["web.stdout.x", "web.stdout.1a", "web.stdout.", "web.stdout.-1", "web.stdout.²"]
    others += ["web.stdout.0.bak", "web.stderr.0", "api.stdout.0", "web.stdout", "xweb.stdout.3"]
    for name in [*others, "web.stdout.4"]:
        (tmp_path / name).write_bytes(b"x")
    assert log_files(tmp_path, "web", "stdout") == [(4, tmp_path / "web.stdout.4")]
    assert log_files(tmp_path, "web", "stderr") == [(0, tmp_path / "web.stderr.0")]


def test_log_files_of_a_dotted_task_name(tmp_path: Path) -> None:
    for name in ["a.b.stdout.0", "a.stdout.0", "a.b.stdout.1"]:
        (tmp_path / name).write_bytes(b"x")
    assert [i for i, _ in log_files(tmp_path, "a.b", "stdout")] == [0, 1]
    assert [i for i, _ in log_files(tmp_path, "a", "stdout")] == [0]


def test_log_files_of_a_missing_dir(tmp_path: Path) -> None:
    assert log_files(tmp_path / "gone", "web", "stdout") == []


def test_fifo_names_are_nomads(tmp_path: Path) -> None:
    assert fifo_path(tmp_path, "web", "stderr") == tmp_path / ".web.stderr.fifo"


# -- LogRotator ----------------------------------------------------------------------


def contents(log_dir: Path, task: str = "web", kind: str = "stdout") -> dict[int, bytes]:
    return {i: path.read_bytes() for i, path in log_files(log_dir, task, kind)}


def rotate(log_dir: Path, writes: list[bytes], *, files: int = 100, size: int = 10) -> None:
    rotator = LogRotator(log_dir, "web.stdout", max_files=files, max_size=size)
    try:
        for data in writes:
            rotator.write(data)
    finally:
        rotator.close()


def test_writes_land_in_the_first_file(tmp_path: Path) -> None:
    rotate(tmp_path, [b"hello\n", b"world\n"], size=100)
    assert contents(tmp_path) == {0: b"hello\nworld\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.stdout.0"]


def test_a_rotator_makes_its_first_file_before_any_write(tmp_path: Path) -> None:
    rotate(tmp_path, [])
    assert contents(tmp_path) == {0: b""}


def test_stdout_and_stderr_have_their_own_files(tmp_path: Path) -> None:
    out = LogRotator(tmp_path, "web.stdout", max_files=2, max_size=100)
    err = LogRotator(tmp_path, "web.stderr", max_files=2, max_size=100)
    out.write(b"out\n")
    err.write(b"err\n")
    out.close()
    err.close()
    assert (contents(tmp_path), contents(tmp_path, kind="stderr")) == ({0: b"out\n"}, {0: b"err\n"})


ROTATIONS: list[tuple[str, list[bytes], int, dict[int, bytes]]] = [
    ("fits", [b"aaaa\n", b"bbbb\n"], 10, {0: b"aaaa\nbbbb\n"}),
    ("line to the next file", [b"aaaa\n", b"bbbbbb\n"], 10, {0: b"aaaa\n", 1: b"bbbbbb\n"}),
    ("one write, two files", [b"aaaa\nbbbbbb\n"], 10, {0: b"aaaa\n", 1: b"bbbbbb\n"}),
    ("cut after the last newline", [b"aa\nbb\ncc\ndd\n"], 7, {0: b"aa\nbb\n", 1: b"cc\ndd\n"}),
    ("long line mid-way", [b"abcdefghij\n"], 4, {0: b"abcd", 1: b"efgh", 2: b"ij\n"}),
    ("partial line to a new file", [b"abc\n", b"defghijk"], 10, {0: b"abc\n", 1: b"defghijk"}),
    ("full file exactly", [b"abcd", b"e\n"], 4, {0: b"abcd", 1: b"e\n"}),
    (
        "rotation to .1, .2, .3",
        [b"aaa\n", b"bbb\n", b"ccc\n", b"ddd\n"],
        4,
        {0: b"aaa\n", 1: b"bbb\n", 2: b"ccc\n", 3: b"ddd\n"},
    ),
]


@pytest.mark.parametrize(
    ("writes", "size", "files"),
    [(w, s, f) for _, w, s, f in ROTATIONS],
    ids=[i for i, _, _, _ in ROTATIONS],
)
def test_rotation(tmp_path: Path, writes: list[bytes], size: int, files: dict[int, bytes]) -> None:
    rotate(tmp_path, writes, size=size)
    assert contents(tmp_path) == files


CHUNKS = [
    [b"x" * 37],
    [b"line %d\n" % i for i in range(40)],
    [b"a\nbb\nccc\ndddd\neeeee\n" * 5, b"tail without newline", b"\n"],
    [b"%s\n" % (b"y" * n) for n in (1, 15, 16, 17, 31, 2, 0, 40)],
    [b"no newline at all " * 10],
]


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("size", [1, 5, 16, 64])
def test_no_file_exceeds_the_size_and_nothing_is_lost(
    tmp_path: Path, chunks: list[bytes], size: int
) -> None:
    rotate(tmp_path, chunks, size=size, files=10_000)
    files = contents(tmp_path)
    assert all(len(data) <= size for data in files.values())
    assert list(files) == list(range(len(files)))  # no index skipped
    assert b"".join(files.values()) == b"".join(chunks)


@pytest.mark.parametrize("size", [8, 16, 64])
def test_lines_are_not_split_when_they_fit(tmp_path: Path, size: int) -> None:
    lines = [b"%s\n" % (b"z" * (n % 7)) for n in range(50)]  # every line fits a file
    rotate(tmp_path, lines, size=size, files=10_000)
    for data in contents(tmp_path).values():
        assert data.endswith(b"\n")


@pytest.mark.parametrize(
    ("max_files", "kept"),
    [(1, [4]), (2, [3, 4]), (3, [2, 3, 4]), (5, [0, 1, 2, 3, 4]), (9, [0, 1, 2, 3, 4])],
)
def test_files_beyond_max_files_go_oldest_first(
    tmp_path: Path, max_files: int, kept: list[int]
) -> None:
    lines = [b"aaa\n", b"bbb\n", b"ccc\n", b"ddd\n", b"eee\n"]  # one file each
    rotate(tmp_path, lines, size=4, files=max_files)
    assert contents(tmp_path) == {i: lines[i] for i in kept}


def test_a_new_rotator_appends_to_the_highest_index(tmp_path: Path) -> None:
    rotate(tmp_path, [b"aaaaaa\n", b"bb\n"], size=8)  # .0 "aaaaaa\n", .1 "bb\n"
    rotate(tmp_path, [b"cc\n"], size=8)
    assert contents(tmp_path) == {0: b"aaaaaa\n", 1: b"bb\ncc\n"}


def test_a_new_rotator_rotates_a_full_highest_file(tmp_path: Path) -> None:
    rotate(tmp_path, [b"aaaaaaa\n"], size=8)  # .0 is full
    rotate(tmp_path, [b"b\n"], size=8)
    assert contents(tmp_path) == {0: b"aaaaaaa\n", 1: b"b\n"}


def test_a_new_rotator_after_rotations_and_deletions(tmp_path: Path) -> None:
    rotate(tmp_path, [b"111\n", b"222\n", b"333\n"], size=4, files=2)  # .1 and .2 kept
    rotate(tmp_path, [b"444\n"], size=4, files=2)
    assert contents(tmp_path) == {2: b"333\n", 3: b"444\n"}


def test_a_smaller_size_after_a_restart_rotates_the_oversized_file(tmp_path: Path) -> None:
    rotate(tmp_path, [b"0123456789\n"], size=100)
    rotate(tmp_path, [b"x\n"], size=4)
    assert contents(tmp_path) == {0: b"0123456789\n", 1: b"x\n"}


# -- LogNotifier ---------------------------------------------------------------------


async def test_notify_wakes_a_waiter() -> None:
    notifier = LogNotifier()
    waiter = asyncio.create_task(notifier.wait(HOUR))
    await asyncio.sleep(0)  # it is waiting now
    assert not waiter.done()
    notifier.notify()
    await asyncio.wait_for(waiter, WAKE_BOUND)


async def test_notify_wakes_every_waiter() -> None:
    notifier = LogNotifier()
    waiters = [asyncio.create_task(notifier.wait(HOUR)) for _ in range(3)]
    await asyncio.sleep(0)
    notifier.notify()
    await asyncio.wait_for(asyncio.gather(*waiters), WAKE_BOUND)


async def test_wait_ends_by_itself_after_its_time() -> None:
    notifier = LogNotifier()
    await asyncio.wait_for(notifier.wait(0.01), WAKE_BOUND)
    notifier.notify()  # nobody waits: nothing to do


async def test_a_waiter_that_is_cancelled_is_not_woken_later() -> None:
    notifier = LogNotifier()
    waiter = asyncio.create_task(notifier.wait(HOUR))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    notifier.notify()  # must not set a result on the cancelled waiter's future


async def test_a_write_wakes_the_readers_of_its_log(tmp_path: Path) -> None:
    rotator = LogRotator(tmp_path, "web.stdout", max_files=2, max_size=100)
    try:
        waiter = asyncio.create_task(rotator.notifier.wait(HOUR))
        await asyncio.sleep(0)
        rotator.write(b"hello\n")
        await asyncio.wait_for(waiter, WAKE_BOUND)
        assert contents(tmp_path) == {0: b"hello\n"}
    finally:
        rotator.close()


async def test_closing_the_rotator_wakes_the_readers(tmp_path: Path) -> None:
    rotator = LogRotator(tmp_path, "web.stdout", max_files=2, max_size=100)
    waiter = asyncio.create_task(rotator.notifier.wait(HOUR))
    await asyncio.sleep(0)
    rotator.close()
    await asyncio.wait_for(waiter, WAKE_BOUND)
