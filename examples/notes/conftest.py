"""Load pytest-envbox from a checkout of its repository, where it is not installed.

An installed pytest-envbox is a pytest plugin already (its pytest11 entry point): then this file
does nothing, and a project of yours does not need it.
"""

from importlib.metadata import entry_points

if not any(ep.value == "pytest_envbox.plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["pytest_envbox.plugin"]
