"""The wheel users install works on its own: built from this checkout, installed into a fresh venv.

Why: every other test imports intercloud from ``src/`` (editable install or PYTHONPATH), so a file
the wheel leaves out (the admin dashboard, a subpackage hatch does not pick up), a dependency missing
from pyproject.toml, or a console script that points nowhere passes the whole suite and breaks only
for users. Here the wheel goes into a venv that has never seen the checkout, and the README's own
check, ``intercloud demo --walkthrough``, runs from that venv with the repository out of reach
(another working directory, no PYTHONPATH).

Needs a package index: the build backend (hatchling) and the runtime dependencies are downloaded by
pip. Without one the test skips and says so (``-m "not network"`` leaves it out on purpose); it
never passes without having installed the wheel.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import intercloud
from tests.support.gateway import REPO_ROOT
from tests.support.timeouts import scaled

pytestmark = [
    pytest.mark.network,
    pytest.mark.timeout(scaled(240)),
]

# Clear of tests/e2e/test_demo.py (20000) and of a demo a developer runs on the default ports, so
# both tests can run at once under pytest-xdist.
PORT_OFFSET = 21000


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: nothing that would import the checkout's src/."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd: list[str | Path], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=scaled(timeout))


def _index_reachable(tmp: Path) -> str | None:
    """None when pip can download the build backend, else why not (the tail of pip's output)."""
    tmp.mkdir(parents=True, exist_ok=True)
    probe = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp, "hatchling>=1.27"],
                 cwd=tmp, timeout=120)
    if probe.returncode == 0:
        return None
    lines = (probe.stdout + probe.stderr).strip().splitlines()
    return lines[-1] if lines else f"pip exited {probe.returncode}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``python -m build --wheel`` makes from this checkout."""
    pytest.importorskip("build", reason="needs the 'build' package: pip install -e '.[test]' (scripts/setup)")
    tmp = tmp_path_factory.mktemp("wheel")
    why = _index_reachable(tmp / "probe")
    if why is not None:
        pytest.skip(f"pip cannot reach a package index to fetch hatchling and the dependencies: {why}")
    out = _run([sys.executable, "-m", "build", "--wheel", "--outdir", tmp / "dist", REPO_ROOT], cwd=tmp, timeout=180)
    assert out.returncode == 0, f"python -m build failed:\n{out.stdout}\n{out.stderr}"
    wheels = sorted((tmp / "dist").glob("intercloud-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv (no system site-packages) with only the wheel and its dependencies installed."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True, symlinks=True).create(env_dir)
    out = _run([env_dir / "bin" / "python", "-m", "pip", "install", "--no-input", wheel], cwd=root, timeout=240)
    assert out.returncode == 0, f"pip install {wheel.name} failed:\n{out.stdout}\n{out.stderr}"
    return env_dir


def test_wheel_metadata_and_package_data(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"intercloud-{intercloud.__version__}.dist-info"
        meta = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert wheel.name.startswith(f"intercloud-{intercloud.__version__}-"), wheel.name
    assert meta["Version"] == intercloud.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().lstrip().startswith("# intercloud"), "README.md is not the long description"
    assert meta.get_all("Project-URL"), "no project URLs"
    assert "intercloud = intercloud.cli:main" in entry_points
    # Package data the code reads at run time (admin/server.py serves the dashboard from here).
    assert "intercloud/admin/static/dashboard.html" in names
    # Every file under src/intercloud made it in: modules, the dashboard, JSON schemas.
    src = REPO_ROOT / "src"
    for path in (src / "intercloud").rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        rel = path.relative_to(src).as_posix()
        assert rel in names, f"{rel} missing from the wheel"


def test_installed_wheel_runs_version_and_demo(fresh_venv, tmp_path):
    bin_dir = fresh_venv / "bin"
    # Imported from the venv, not from the checkout.
    where = _run([bin_dir / "python", "-c", "import intercloud, importlib.metadata as m; "
                  "print(intercloud.__file__); print(m.version('intercloud'))"], cwd=tmp_path, timeout=30)
    assert where.returncode == 0, where.stderr
    path, dist_version = where.stdout.split()
    assert Path(path).is_relative_to(fresh_venv), f"intercloud imported from {path}, not from the fresh venv"
    assert dist_version == intercloud.__version__

    version = _run([bin_dir / "intercloud", "--version"], cwd=tmp_path, timeout=30)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"intercloud {intercloud.__version__}"

    # Package data read through importlib.resources, from the installed files.
    data = _run([bin_dir / "python", "-c", "from intercloud.admin.server import _dashboard; "
                 "from intercloud.audit import schema; print(len(_dashboard()), len(schema()))"],
                cwd=tmp_path, timeout=30)
    assert data.returncode == 0, data.stderr
    dashboard_bytes, schema_keys = map(int, data.stdout.split())
    assert dashboard_bytes > 1000 and schema_keys > 0

    demo = _run([bin_dir / "intercloud", "demo", "--walkthrough", "--port-offset", str(PORT_OFFSET)],
                cwd=tmp_path, timeout=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "walkthrough: PASSED" in demo.stdout
    assert "FAIL" not in demo.stdout.replace("FAILED", "")
