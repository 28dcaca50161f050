"""The README's examples, run against `make run`'s agent: what they show is what they print.

Every ```console block of README.md that follows a `<!-- readme: make run -->`
line is run, in README order, by one bash (so a variable set by one command is
there for the next), against one agent started with the arguments of the
Makefile's `run` target (read from the Makefile, so the two cannot drift), on a
fresh data dir and on free ports: `-p 8600` and `localhost:4646` in a command
are rewritten to them.  Before the first block the test waits, as a reader
would, for the example job's three instances to pass their checks.

Each command's output (stdout and stderr) must be the lines the README shows
under it, in any order (SRV answers are shuffled), after the same normalisation
of both: dynamic ports (20000-32000), allocation ids (and the CLI's short ones),
times, runs of spaces (table columns), the SOA serial, the node name (`vm` in
the README) and the data dir (`./data`).  The CLI finds the agent through
NOMAD_ADDR, set for the script.  A plain ``` block after
`<!-- readme: make run stderr -->` is the agent's first lines on stderr, each of
which must have been printed.

    python -m tests.integration.test_readme   prints every command's real output
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.agentproc import ROOT, AgentProcess, wait_for
from tests.integration.conftest import task_processes

README = ROOT / "README.md"
MARK = "<!-- readme: make run -->"
STDERR_MARK = "<!-- readme: make run stderr -->"
SCRIPT_TIMEOUT = 180.0  # seconds for every block together (they sleep a little)
WAIT = 40.0  # seconds for the example job to pass its checks on a busy machine
SEPARATOR = "@@readme-command@@"
CGROUP_V2 = Path("/sys/fs/cgroup/cgroup.controllers")  # there, the no-cgroup line is not printed


@dataclass
class Command:
    line: int  # in README.md
    text: str
    expected: list[str] = field(default_factory=list)


def console_blocks(readme: str, mark: str) -> list[list[tuple[int, str]]]:
    """The lines (number, text) of each fenced block right after a `mark` line."""
    lines = readme.splitlines()
    blocks: list[list[tuple[int, str]]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == mark:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j == len(lines) or not lines[j].startswith("```"):
                raise AssertionError(f"README.md:{i + 1}: {mark} is not followed by a fence")
            block: list[tuple[int, str]] = []
            j += 1
            while j < len(lines) and not lines[j].startswith("```"):
                block.append((j + 1, lines[j]))
                j += 1
            blocks.append(block)
            i = j
        i += 1
    return blocks


def commands(readme: str) -> list[Command]:
    """The `$ ` commands of the marked console blocks, continuation lines joined."""
    found: list[Command] = []
    for block in console_blocks(readme, MARK):
        current: Command | None = None
        continued = False
        for number, text in block:
            if continued and current is not None:
                current.text += "\n" + text
                continued = text.endswith("\\")
            elif text.startswith("$ "):
                current = Command(number, text[2:])
                found.append(current)
                continued = text.endswith("\\")
            elif current is None:
                raise AssertionError(f"README.md:{number}: output before any command")
            else:
                current.expected.append(text)
    return found


def run_args(makefile: str) -> list[str]:
    """The agent arguments of the Makefile's `run` recipe (after `waypost agent`)."""
    recipe = re.search(r"^run:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe, "no run: target in the Makefile"
    words = shlex.split(recipe[1])
    assert words[0].endswith("/waypost") and words[1] == "agent", words
    return words[2:]


def localise(command: str, dns_port: int, http_port: int) -> str:
    return command.replace("-p 8600", f"-p {dns_port}").replace(
        "localhost:4646", f"127.0.0.1:{http_port}"
    )


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DYNAMIC_PORT = re.compile(r"(?<![\d.-])(2\d{4}|3[01]\d{3}|32000)(?![\d-])")
SOA = re.compile(r"(hostmaster\.\S+ )\d+ ")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
SHORT_ID = re.compile(r'(?<=")[0-9a-f]{8}(?=")')  # the CLI's short ids, as it quotes them


def normalise(line: str, node: str, data_dir: str) -> str:
    line = line.replace(data_dir, "./data").replace(f"{node}.node.", "vm.node.")
    line = line.replace(f"node {node} (", "node vm (")
    line = UUID.sub("<uuid>", line)
    line = SOA.sub(r"\1<serial> ", line)
    line = SHORT_ID.sub("<id>", TIME.sub("<time>", line))
    line = " ".join(line.split())  # table columns and dig's tabs
    return DYNAMIC_PORT.sub("<port>", line)


INDEX = re.compile(r"\(index \d+\)")


def startup_line(line: str, node: str, data_dir: str, agent: AgentProcess | None = None) -> str:
    """A start-up log line, normalised; the agent's ports are the README's (8600, 4646)."""
    if agent is not None:
        line = line.replace(f"127.0.0.1:{agent.dns_port} ", "127.0.0.1:8600 ")
        line = re.sub(f"127\\.0\\.0\\.1:{agent.http_port}$", "127.0.0.1:4646", line)
    return INDEX.sub("(index <n>)", normalise(line, node, data_dir))


def run_all(found: list[Command], agent: AgentProcess) -> list[list[str]]:
    """Run every command in one bash; each one's output lines."""
    script = ["set -u"]
    for command in found:
        script.append(f"echo {SEPARATOR}")
        script.append(localise(command.text, agent.dns_port, agent.http_port))
    script.append(f"echo {SEPARATOR}")
    env = {**os.environ, "NOMAD_ADDR": f"http://127.0.0.1:{agent.http_port}"}
    env.pop("NOMAD_TOKEN", None)
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr
    parts = output.split(SEPARATOR + "\n")
    assert len(parts) == len(found) + 2, output
    return [[line for line in part.splitlines() if line.strip()] for part in parts[1:-1]]


def start(data_dir: Path) -> AgentProcess:
    args = run_args((ROOT / "Makefile").read_text())
    args += ["--data-dir", str(data_dir), "--dns-addr", "127.0.0.1:0"]
    args += ["--http-addr", "127.0.0.1:0"]
    agent = AgentProcess(args).started()
    agent.expect(r"^waypost: node \S+ \(")
    wait_for(
        lambda: len(agent.srv_ports("web.service.nomad")) == 3,
        "the example job's three instances in DNS",
        WAIT,
    )
    return agent


def node_name(agent: AgentProcess) -> str:
    for line in agent.stderr:
        found = re.match(r"^waypost: node (\S+) \(", line)
        if found:
            return found[1]
    raise AssertionError(agent.stderr)


def test_the_readme_examples_print_what_the_readme_shows(tmp_path: Path) -> None:
    readme = README.read_text()
    found = commands(readme)
    assert len(found) >= 20, [c.text for c in found]  # the marks are where they should be
    agent = start(tmp_path)
    try:
        node = node_name(agent)
        outputs = run_all(found, agent)
        problems = []
        for command, output in zip(found, outputs, strict=True):
            want = sorted(normalise(x, node, str(tmp_path)) for x in command.expected if x.strip())
            got = sorted(normalise(x, node, str(tmp_path)) for x in output)
            if want != got:
                problems.append(
                    f"README.md:{command.line}: $ {command.text}\n  shows {want}\n  prints {got}"
                )
        assert not problems, "\n".join(problems)

        (stderr_block,) = console_blocks(readme, STDERR_MARK)
        printed = {startup_line(x, node, str(tmp_path), agent) for x in agent.stderr}
        for number, text in stderr_block:
            if text.startswith("waypost: ") and not (
                "no cgroup of their own" in text and CGROUP_V2.exists()
            ):
                line = startup_line(text, node, str(tmp_path))
                assert line in printed, (number, line, printed)
    finally:
        agent.stop()
    wait_for(lambda: not task_processes(tmp_path), "the example job's tasks gone", WAIT)


def main() -> None:
    """Print each marked command with what it prints here (for writing the README)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        agent = start(Path(tmp))
        try:
            found = commands(README.read_text())
            for command, output in zip(found, run_all(found, agent), strict=True):
                print(f"README.md:{command.line}: $ {command.text}")
                for line in output:
                    print(line.replace(f"{node_name(agent)}.node.", "vm.node."))
        finally:
            agent.stop()
            time.sleep(0.5)
    sys.exit(0)


if __name__ == "__main__":
    main()
