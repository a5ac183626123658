"""The version is written in one place (src/intercloud/__init__.py) and everything reports that one.

Why: a version repeated in pyproject.toml and in the code drifts at the first release; then
``intercloud --version``, the start-up log line and ``pip show`` disagree about what runs.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest

import intercloud
from intercloud.cli import main
from tests.support.gateway import REPO_ROOT

VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.M)


def test_pyproject_reads_the_version_from_the_package():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml repeats the version; keep it in __init__.py only"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "src/intercloud/__init__.py"
    init = (REPO_ROOT / "src" / "intercloud" / "__init__.py").read_text()
    assert VERSION_LINE.findall(init) == [intercloud.__version__]


def test_version_is_pep440():
    # Digits and dots with an optional pre/post/dev suffix: what pip and hatch accept.
    assert re.fullmatch(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", intercloud.__version__)


def test_installed_metadata_matches_the_package():
    try:
        installed = importlib.metadata.version("intercloud")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("intercloud is not installed in this environment (pip install -e . / scripts/setup)")
    assert installed == intercloud.__version__


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"intercloud {intercloud.__version__}"
