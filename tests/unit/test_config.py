"""Unit tests of reading declarations and planning: catalogs, merging, selection, start levels."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_envbox.config import Catalog, load_project_config, merge_services, select, start_levels
from pytest_envbox.errors import ConfigError
from pytest_envbox.spec import Service

PYPROJECT = """
[project]
name = "shop"

[tool.envbox.services.cache]
command = ["redis-server", "--port", "6379", "--save", ""]
ports = [6379]
ready = { tcp = 6379 }
limits = { memory = "64Mi", cpu = "250m", pids = 64 }

[tool.envbox.services.api]
command = "python -m shop.api --port 8000"
env = { CACHE_URL = "redis://cache:6379/0" }
ports = [8000]
depends_on = ["cache"]
ready = { http = 8000, path = "/health", timeout = "20s" }
limits = { memory = "128Mi", cpu = "1", pids = 128 }
mounts = [{ source = "./fixtures", target = "/data" }]
aliases = ["shop-api"]

[tool.envbox.topologies]
shop = ["api", "cache"]
"""


def svc(name: str, *deps: str, aliases: tuple[str, ...] = ()) -> Service:
    return Service(name, ["run", name], depends_on=deps, aliases=aliases)


def catalog_of(*services: Service, topologies: dict[str, tuple[str, ...]] | None = None) -> Catalog:
    return Catalog(
        {s.name: s for s in services},
        topologies or {},
        {s.name: f"test [{s.name}]" for s in services},
    )


# --- loading -------------------------------------------------------------------------------------


def test_load_reads_services_and_topologies_from_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    catalog = load_project_config(tmp_path)
    assert catalog.names() == ["api", "cache"]
    assert catalog.services["api"].command == ("python", "-m", "shop.api", "--port", "8000")
    assert catalog.services["cache"].limits.memory == 64 * 2**20
    assert catalog.topologies == {"shop": ("api", "cache")}
    assert catalog.origins["api"] == "pyproject.toml [tool.envbox.services.api]"


def test_envbox_toml_wins_over_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "envbox.toml").write_text('[services.echo]\ncommand = ["echo"]\n')
    catalog = load_project_config(tmp_path)
    assert catalog.names() == ["echo"]
    assert catalog.topologies == {}
    assert catalog.origins["echo"] == "envbox.toml [services.echo]"


def test_no_declarations_give_an_empty_catalog(tmp_path: Path) -> None:
    assert load_project_config(tmp_path) == Catalog()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert load_project_config(tmp_path).names() == []


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text("[services.api\ncommand = 1\n")
    with pytest.raises(ConfigError, match=r"envbox\.toml is not valid TOML"):
        load_project_config(tmp_path)


def test_unknown_top_level_key_is_rejected_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.envbox.service.api]\ncommand = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_project_config(tmp_path)
    assert info.value.key == "tool.envbox.service"
    assert "did you mean 'services'" in str(info.value)


def test_a_bad_service_names_its_file_and_table(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text('[services.api]\ncommand = "x"\nports = [0]\n')
    with pytest.raises(ConfigError) as info:
        load_project_config(tmp_path)
    assert (info.value.service, info.value.key) == ("api", "ports[0]")
    assert "(in envbox.toml [services.api])" in str(info.value)


def test_topology_members_must_be_declared_services(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text(
        '[services.db]\ncommand = "x"\n[services.api]\ncommand = "x"\n'
        '[topologies]\nshop = ["api", "cache"]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_project_config(tmp_path)
    assert info.value.key == "topologies.shop[1]"
    assert "'cache' is not a declared service; known services: api, db" in str(info.value)


def test_topology_names_are_dns_labels(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text(
        '[services.api]\ncommand = "x"\n[topologies]\nMy_Shop = ["api"]\n'
    )
    with pytest.raises(ConfigError, match="not a valid topology name"):
        load_project_config(tmp_path)


# --- merging -------------------------------------------------------------------------------------


def test_merge_adds_services_with_their_origins() -> None:
    merged = merge_services(
        catalog_of(svc("db")), [(svc("api"), "conftest hook (tests/conftest.py)")]
    )
    assert merged.names() == ["api", "db"]
    assert merged.origins["api"] == "conftest hook (tests/conftest.py)"


def test_a_name_defined_twice_names_both_origins(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    catalog = load_project_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        merge_services(catalog, [(svc("api"), "conftest hook (tests/conftest.py)")])
    message = str(info.value)
    assert info.value.service == "api"
    assert "pyproject.toml [tool.envbox.services.api]" in message
    assert "conftest hook (tests/conftest.py)" in message


def test_a_name_defined_twice_by_hooks_is_rejected() -> None:
    with pytest.raises(ConfigError, match="in hook a and in hook b"):
        merge_services(Catalog(), [(svc("api"), "hook a"), (svc("api"), "hook b")])


# --- selection -----------------------------------------------------------------------------------


def names(services: list[Service]) -> list[str]:
    return [s.name for s in services]


def test_select_adds_the_dependency_closure_in_dependency_order() -> None:
    catalog = catalog_of(svc("api", "cache", "db"), svc("cache"), svc("db", "disk"), svc("disk"))
    assert names(select(catalog, ["api"], None)) == ["cache", "disk", "db", "api"]


def test_select_keeps_request_order_and_drops_repeats() -> None:
    catalog = catalog_of(svc("a"), svc("b"), svc("c", "a"))
    assert names(select(catalog, ["b", "c", "b"], None)) == ["b", "a", "c"]


def test_select_by_topology() -> None:
    catalog = catalog_of(svc("api", "cache"), svc("cache"), svc("x"), topologies={"shop": ("api",)})
    assert names(select(catalog, [], "shop")) == ["cache", "api"]
    assert names(select(catalog, ["x"], "shop")) == ["cache", "api", "x"]


def test_unknown_service_lists_the_known_names_sorted() -> None:
    catalog = catalog_of(svc("db"), svc("api"), svc("cache"))
    with pytest.raises(ConfigError) as info:
        select(catalog, ["cahce"], None)
    message = str(info.value)
    assert "unknown service 'cahce'" in message
    assert "did you mean 'cache'" in message
    assert "known services: api, cache, db" in message


def test_unknown_dependency_names_the_dependent_service() -> None:
    with pytest.raises(ConfigError, match="service 'api', key 'depends_on': depends on 'ghost'"):
        select(catalog_of(svc("api", "ghost")), ["api"], None)


def test_unknown_topology_lists_the_known_topologies() -> None:
    catalog = catalog_of(svc("a"), topologies={"shop": ("a",), "blog": ("a",)})
    with pytest.raises(
        ConfigError, match=r"unknown topology 'shoop'.*known topologies: blog, shop"
    ):
        select(catalog, [], "shoop")


def test_inline_services_are_used_as_they_are_and_satisfy_dependencies() -> None:
    catalog = catalog_of(svc("db"))
    inline_dep = svc("helper")
    inline = svc("tmp", "helper", "db")
    assert select(catalog, [inline, inline_dep], None) == [
        inline_dep,
        catalog.services["db"],
        inline,
    ]


def test_inline_service_may_repeat_a_declared_one_identically() -> None:
    catalog = catalog_of(svc("db"))
    assert select(catalog, [svc("db")], None) == [svc("db")]


def test_inline_service_shadowing_a_different_declared_one_is_an_error() -> None:
    catalog = catalog_of(svc("db"))
    with pytest.raises(ConfigError, match=r"service 'db'.*differs from the one declared in test"):
        select(catalog, [Service("db", ["other"])], None)


def test_two_services_may_not_claim_the_same_hostname() -> None:
    catalog = catalog_of(svc("api", aliases=("web",)), svc("web"))
    with pytest.raises(ConfigError, match="'web' already names service 'api'"):
        select(catalog, ["api", "web"], None)


def test_select_reports_a_dependency_cycle() -> None:
    catalog = catalog_of(svc("a", "b"), svc("b", "a"))
    with pytest.raises(ConfigError, match="a -> b -> a"):
        select(catalog, ["a"], None)


# --- start levels --------------------------------------------------------------------------------


def test_start_levels_group_services_by_dependency_depth() -> None:
    services = [svc("api", "cache", "db"), svc("cache"), svc("db", "disk"), svc("disk"), svc("x")]
    levels = [names(level) for level in start_levels(services)]
    assert levels == [["cache", "disk", "x"], ["db"], ["api"]]


def test_start_levels_of_nothing_is_empty() -> None:
    assert start_levels([]) == []


def test_start_levels_require_every_dependency_in_the_set() -> None:
    with pytest.raises(ConfigError, match=r"service 'api'.*'cache', which is not part of"):
        start_levels([svc("api", "cache")])


@pytest.mark.parametrize(
    ("services", "cycle"),
    [
        ([svc("a", "b"), svc("b", "a")], "a -> b -> a"),
        ([svc("x"), svc("a", "b"), svc("b", "c"), svc("c", "a")], "a -> b -> c -> a"),
        ([svc("top", "a"), svc("a", "b"), svc("b", "a")], "a -> b -> a"),
    ],
    ids=["two", "three", "below-an-acyclic-service"],
)
def test_start_levels_report_a_cycle_as_a_path(services: list[Service], cycle: str) -> None:
    with pytest.raises(ConfigError, match=f"depends_on forms a cycle: {cycle};"):
        start_levels(services)


def test_subnet_is_read_checked_and_named_in_errors(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.envbox]\nsubnet = "10.77.0.0/24"\n')
    assert load_project_config(tmp_path).subnet == "10.77.0.0/24"
    for bad, words in (('"10.77.0.1/24"', "host bits set"), ('"10.77.0.0/30"', "too small"),
                       ("24", "not a subnet")):  # fmt: skip
        (tmp_path / "pyproject.toml").write_text(f"[tool.envbox]\nsubnet = {bad}\n")
        with pytest.raises(ConfigError, match=words) as info:
            load_project_config(tmp_path)
        assert info.value.key == "tool.envbox.subnet"
        assert "pyproject.toml [tool.envbox]" in str(info.value)
