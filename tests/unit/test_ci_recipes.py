"""The CI recipes of docs/ci.md: each file in examples/ci/ is valid for its CI (GitHub's and
GitLab's own schemas, through check-jsonschema's copies, offline) and is in the page as it is."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
RECIPES = REPO / "examples" / "ci"
PAGE = (REPO / "docs" / "ci.md").read_text()


def check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
        "check-jsonschema")
    assert exe is not None, "check-jsonschema is in the test extra (pyproject.toml)"
    return subprocess.run([exe, "--builtin-schema", schema, str(path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize(("name", "schema"), [
    ("github-actions.yml", "vendor.github-workflows"), ("gitlab-ci.yml", "vendor.gitlab-ci"),
])  # fmt: skip
def test_the_workflow_is_valid_for_its_ci(name: str, schema: str) -> None:
    r = check_jsonschema(schema, RECIPES / name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_validator_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "gitlab-ci.yml"
    bad.write_text((RECIPES / "gitlab-ci.yml").read_text().replace("script:", "scripts:", 1))
    assert check_jsonschema("vendor.gitlab-ci", bad).returncode == 1


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml", "run-in-container.sh"])
def test_the_page_shows_each_file_as_it_is(name: str) -> None:
    assert (RECIPES / name).read_text().rstrip() in PAGE


def test_the_container_script_is_valid_shell() -> None:
    r = subprocess.run(["sh", "-n", str(RECIPES / "run-in-container.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_section_a_refusal_or_the_docs_point_at_is_on_the_page() -> None:
    from pytest_envbox.kernel.refusal import ANCHORS

    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", PAGE, re.M)}  # fmt: skip
    assert ANCHORS | {"skip-or-error", "github-actions", "gitlab-ci"} <= headings
