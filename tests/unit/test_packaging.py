"""Tier: unit (static). The package metadata is the one truth about dependencies: requirements.txt
pins exactly pyproject's dependencies plus its tensorboard, plots and hf extras, and
requirements-test.txt adds exactly its test extra, each at the same version. And git keeps the
study records."""

import subprocess
import tomllib

import pytest

from tests.conftest import REPO


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, sep, version = line.partition("==")
            assert sep, f"{line!r} is not pinned with =="
            pins[name.strip().lower()] = version.strip()
    return pins


def test_requirement_files_follow_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = _pins(project["dependencies"] + extras["tensorboard"] + extras["plots"]
                    + extras["hf"])
    assert _pins((REPO / "requirements.txt").read_text().splitlines()) == runtime
    test_lines = (REPO / "requirements-test.txt").read_text().splitlines()
    assert "-r requirements.txt" in test_lines
    assert _pins(test_lines) == _pins(extras["test"])


def test_study_records_are_not_ignored_by_git():
    """The work folder runs/ (checkpoints) is ignored; a study's committed records under
    docs/results/<plan>/runs/ are not (a rule 'runs/' once matched both, and a fresh clone had
    the report without its records)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["runs/l10n10/iter_0000010/common.pt", "docs/results/l10n10/runs/top2-s1/run.json",
             "docs/results/l10n10/runs/top2-s1/curve.jsonl"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO,
                         capture_output=True, text=True).stdout.split()
    assert out == paths[:1]
