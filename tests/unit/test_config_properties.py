"""Hostile input, property-based: whatever a project's TOML holds, loading it gives a valid catalog
or a ConfigError, never another exception; likewise for Service objects built in Python."""

from __future__ import annotations

import json
import math
import string
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_envbox import ConfigError, Service
from pytest_envbox.config import Catalog, load_project_config, select, start_levels
from pytest_envbox.spec import Limits, Mount

EXAMPLES = settings(max_examples=500, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip

# Names that mean something to the loader, and some that do not: the loader's paths get hit.
KEYS = st.sampled_from([*Service.KEYS, *Limits.KEYS, *Mount.KEYS, "services", "topologies",
                        "subnet", "command", "tcp", "http", "log", "exec", "path", "status",
                        "timeout", "interval", "web", "db", "Web", "a" * 64, "-x", ""])  # fmt: skip
NAMES = st.one_of(KEYS, st.text(string.ascii_lowercase + string.digits + "-_.", max_size=12),
                  st.text(max_size=8))  # fmt: skip
SCALARS = st.one_of(
    st.text(max_size=20), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.sampled_from(["64Mi", "250m", "1.5", "10s", "500ms", "198.18.0.0/24", "10.0.0.0/31",
                     "::1/64", "sleep 1", "nobody", "0:0", "-1", "1e9"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=5),
    max_leaves=25,
)


def toml_value(v: Any) -> str:
    """A TOML rendering of a JSON-like value (every string and key quoted the JSON way, which
    TOML's basic strings accept)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def check_catalog(catalog: Catalog) -> None:
    """A catalog that loaded is usable: every service valid, every topology selectable."""
    for svc in catalog.services.values():
        assert isinstance(svc, Service)
    for name in catalog.topologies:
        start_levels(select(catalog, [], name))


def load(text: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pyproject.toml"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)  # type: ignore[operator]
        try:
            catalog = load_project_config(Path(d))
        except ConfigError:
            return
        try:
            check_catalog(catalog)
        except ConfigError:
            pass  # e.g. a dependency cycle, found when a topology is selected


@EXAMPLES
@given(st.dictionaries(NAMES, VALUES, max_size=4))
def test_any_envbox_table_loads_or_is_a_config_error(table: dict[str, Any]) -> None:
    load("[tool.envbox]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in table.items()))


SERVICE_TABLES = st.dictionaries(
    st.one_of(st.sampled_from(Service.KEYS), NAMES),
    st.one_of(VALUES, st.just(["sleep", "1"]), st.just({"memory": "64Mi", "cpu": "1"}),
              st.just({"tcp": 80}), st.just(["web"])),
    max_size=6,
)  # fmt: skip


@EXAMPLES
@given(st.dictionaries(NAMES, SERVICE_TABLES, max_size=3),
       st.dictionaries(NAMES, st.one_of(st.lists(NAMES, max_size=3), VALUES), max_size=2))  # fmt: skip
def test_any_services_and_topologies_load_or_are_a_config_error(
    services: dict[str, Any], topologies: dict[str, Any]
) -> None:
    load("[tool.envbox]\n" f"services = {toml_value(services)}\n" f"topologies = {toml_value(topologies)}\n")


@EXAMPLES
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_file_content_loads_or_is_a_config_error(text: str | bytes) -> None:
    load(text)


@EXAMPLES
@given(NAMES, st.one_of(VALUES, st.just(["sleep", "1"])),
       st.dictionaries(st.sampled_from([k for k in Service.KEYS if k != "command"]), VALUES,
                       max_size=4))  # fmt: skip
def test_any_service_built_in_python_is_valid_or_a_config_error(
    name: str, command: Any, kwargs: dict[str, Any]
) -> None:
    try:
        svc = Service(name, command, **kwargs)
    except ConfigError:
        return
    assert svc.name == name and svc.command and all(isinstance(a, str) for a in svc.command)


def test_the_generator_writes_toml_the_loader_accepts() -> None:
    """Not vacuous: a valid declaration, written the way the properties write theirs, loads."""
    services = {"web": {"command": ["sleep", "1"], "ports": [80], "limits": {"memory": "64Mi"},
                        "ready": {"tcp": 80}},
                "db": {"command": "sleep 1", "depends_on": ["web"]}}  # fmt: skip
    text = f"[tool.envbox]\nservices = {toml_value(services)}\ntopologies = {toml_value({'t': ['db']})}\n"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "pyproject.toml").write_text(text)
        catalog = load_project_config(Path(d))
    assert set(catalog.services) == {"web", "db"}
    assert [s.name for lvl in start_levels(select(catalog, [], "t")) for s in lvl] == ["web", "db"]
