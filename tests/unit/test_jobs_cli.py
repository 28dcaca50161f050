"""`waypost agent --job FILE`: reading the job files (discovery.cli.load_jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from discovery.cli import load_jobs
from discovery.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/web.job.json"


def test_the_example_job_file_loads() -> None:
    (spec,) = load_jobs([str(EXAMPLE)])
    assert (spec.id, spec.groups[0].count) == ("web", 3)


def test_a_bad_job_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Job": {"ID": "x", "TaskGroups": [{"Name": "g", "Count": -1}]}}))
    with pytest.raises(ConfigError) as caught:
        load_jobs([str(bad)])
    assert caught.value.path == str(bad) and "Job.TaskGroups[0].Count" in str(caught.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="cannot read the job"):
        load_jobs([str(broken)])


def test_two_files_of_one_job_id_are_an_error(tmp_path: Path) -> None:
    other = tmp_path / "web2.json"
    body = json.loads(EXAMPLE.read_text())
    body["Job"]["TaskGroups"][0]["Count"] = 1
    other.write_text(json.dumps(body))
    with pytest.raises(ConfigError) as caught:
        load_jobs([str(EXAMPLE), str(other)])
    assert caught.value.path == str(other) and str(EXAMPLE) in str(caught.value)
