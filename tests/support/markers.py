"""Skip markers for environment needs (root, external binaries).

Why: integration and end-to-end tests need things a developer laptop may lack (squid, nginx,
root for network namespaces). Those tests must skip with a reason that says what to install,
never fail obscurely. The same checks are available as ``@pytest.mark.needs_root`` and
``@pytest.mark.needs_binary("squid", ...)`` (handled in ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["needs_root", "needs_binary", "find_binary", "is_root"]

# Daemons such as squid and nginx live in sbin, which a non-login PATH may lack.
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def is_root() -> bool:
    return os.geteuid() == 0


def find_binary(name: str) -> str | None:
    """Path of executable ``name`` on PATH or in the sbin dirs, else None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_DIRS])
    return shutil.which(name, path=path)


needs_root = pytest.mark.skipif(not is_root(), reason="needs root (run as root or in CI)")


def needs_binary(*names: str) -> pytest.MarkDecorator:
    """skipif-mark unless every executable in ``names`` is installed."""
    missing = [n for n in names if not find_binary(n)]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs executables not installed: {', '.join(missing)}"
    )
