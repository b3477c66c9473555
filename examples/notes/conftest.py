"""Load pytest-envbox from a checkout of its repository, where it is not installed.

An installed pytest-envbox is a pytest plugin already (its pytest11 entry point): then this part
does nothing, and a project of yours does not need it. The other part skips the tests, saying what
to install, where Debian's servers that this example runs are missing.
"""

import glob
import os
import shutil
from importlib.metadata import entry_points

import pytest

if not any(ep.value == "pytest_envbox.plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["pytest_envbox.plugin"]


#: The servers this example runs, from Debian's packages (program -> package).
SERVERS = {"redis-server": "redis-server", "/usr/lib/postgresql/*/bin/postgres": "postgresql"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without those servers the tests skip, saying what to install; in CI (``$CI`` set), where
    they must be there, they run, and fail with envbox's own error."""
    missing = sorted({pkg for prog, pkg in SERVERS.items()
                      if not (shutil.which(prog) or glob.glob(prog))})
    if missing and os.environ.get("CI", "").lower() in ("", "0", "false", "no", "off"):
        skip = pytest.mark.skip(reason=f"apt-get install {' '.join(missing)}: this example runs "
                                       "Debian's servers")
        for item in items:
            item.add_marker(skip)
