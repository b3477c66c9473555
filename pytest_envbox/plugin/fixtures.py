"""The ``envbox`` fixture and the ``envbox`` marker it reads.

The marker is parsed into a frozen :class:`EnvboxMarker` by binding its arguments to a signature
(as pytest-django does for ``django_db``), so a typo is a clear error naming the test. Environments
of a wider scope are cached on the session and torn down by a finalizer on the scope's own node, so
they end exactly when pytest ends that scope, in order with the user's fixtures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pluggy
import pytest

from pytest_envbox.config import Catalog, load_project_config, merge_services
from pytest_envbox.engine import report
from pytest_envbox.engine.environment import Environment
from pytest_envbox.engine.figures import memory_limit_text
from pytest_envbox.engine.readiness import log_tail
from pytest_envbox.errors import ConfigError, EnvboxError
from pytest_envbox.plugin import failures, unavailable
from pytest_envbox.spec import Service

__all__ = [
    "BAD_MARKER",
    "ENVIRONMENTS",
    "SCOPES",
    "EnvboxMarker",
    "envbox",
    "envbox_autostart",
    "keep_environments",
    "log_sections",
    "modified",
    "oom_notes",
    "parse_marker",
    "project_catalog",
]

SCOPES = ("function", "class", "module", "package", "session")
BAD_MARKER = pytest.StashKey[str]()
_USED = pytest.StashKey[list[Environment]]()
_CATALOG = pytest.StashKey[Catalog]()
#: the project's configuration error, raised again (not read again) for any later test
_CATALOG_ERROR = pytest.StashKey[ConfigError]()
_SHARED = pytest.StashKey[dict[tuple[object, ...], "Environment | BaseException"]]()
#: every environment of the run, for the summary and --envbox-report
ENVIRONMENTS = pytest.StashKey[list[Environment]]()



@dataclass(frozen=True)
class EnvboxMarker:
    """What ``@pytest.mark.envbox(...)`` asks for."""

    services: tuple[str | Service, ...]
    topology: str | None
    scope: str


def _signature(
    *services: str | Service, topology: str | None = None, scope: str = "function"
) -> EnvboxMarker:
    for s in services:
        if not isinstance(s, str | Service):
            raise TypeError(f"services are names or Service objects, not {type(s).__name__}")
    if topology is not None and not isinstance(topology, str):
        raise TypeError(f"topology must be a name, not {type(topology).__name__}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    return EnvboxMarker(tuple(services), topology, scope)


def parse_marker(marker: pytest.Mark) -> EnvboxMarker:
    """Bind a marker's arguments; ``TypeError``/``ValueError`` say what is wrong."""
    return _signature(*marker.args, **marker.kwargs)


def _each_plugin(config: pytest.Config, hook: str, *, call_order: bool
                 ) -> list[tuple[str, str, pluggy.HookCaller]]:  # fmt: skip
    """Each plugin implementing ``hook``: (its name, where it is, a hook caller of its
    implementations alone).

    Called through pluggy's hook caller, never ``impl.function``, so that ``wrapper=True`` and
    ``hookwrapper=True`` implementations and pluggy's tracing work; one plugin at a time, so that
    every result is known to come from that place. Plugins come in registration order, or with
    ``call_order`` in the order pluggy calls them (last registered first, ``tryfirst`` and
    ``trylast`` respected).
    """
    pm = config.pluginmanager
    impls = getattr(pm.hook, hook).get_hookimpls()
    plugins: list[tuple[object, str]] = []
    for impl in reversed(impls) if call_order else impls:
        if not any(p is impl.plugin for p, _ in plugins):
            plugins.append((impl.plugin, impl.plugin_name))
    callers = []
    for plugin, name in plugins:
        caller = pm.subset_hook_caller(hook, remove_plugins=[p for p, _ in plugins if p is not plugin])
        strays = [i.plugin_name for i in caller.get_hookimpls() if i.plugin is not plugin]
        if strays:
            # pluggy (up to 1.6) leaves in a plugin whose implementation is named otherwise
            # (``@hookimpl(specname=...)``): it would be called once per plugin.
            raise ConfigError(f"{hook} in {strays[0]} is a function of another name "
                              f"(hookimpl specname=...); name it {hook} so that pytest-envbox "
                              "can call it alone and say where its results come from")  # fmt: skip
        callers.append((name, str(getattr(plugin, "__file__", None) or name), caller))
    return callers


def project_catalog(config: pytest.Config) -> Catalog:
    """The project's services: config files plus every ``pytest_envbox_services`` hook result.

    Read once, when a test first needs a service (see plugin/failures.py for why not earlier); a
    ``ConfigError`` is remembered and raised again rather than read again.
    """
    cached = config.stash.get(_CATALOG, None)
    if cached is not None:
        return cached
    failed = config.stash.get(_CATALOG_ERROR, None)
    if failed is not None:
        raise failed
    try:
        catalog = _read_catalog(config)
    except ConfigError as e:
        config.stash[_CATALOG_ERROR] = e
        raise
    config.stash[_CATALOG] = catalog
    return catalog


def _read_catalog(config: pytest.Config) -> Catalog:
    catalog = load_project_config(Path(config.rootpath))
    extra: list[tuple[Service, str]] = []
    for name, where, call in _each_plugin(config, "pytest_envbox_services", call_order=False):
        results: object = call(config=config)  # one list per implementation that returned one
        origin = f"pytest_envbox_services in {where}"
        if not isinstance(results, list):
            raise ConfigError(f"{origin}: a wrapper returned {type(results).__name__}; return the "
                              "list of results its yield gave (changed or not)")  # fmt: skip
        for result in results:
            if not isinstance(result, list | tuple):
                raise ConfigError(f"pytest_envbox_services must return a list of Service objects, "
                                  f"not {type(result).__name__} (in {name})")  # fmt: skip
            for svc in result:
                if not isinstance(svc, Service):
                    raise ConfigError(f"{origin} returned {svc!r}; return Service objects")
                extra.append((svc, origin))
    catalog = merge_services(catalog, extra)
    return dataclasses.replace(
        catalog, services={n: modified(config, svc) for n, svc in catalog.services.items()})


def modified(config: pytest.Config, service: Service) -> Service:
    """``service`` after every ``pytest_envbox_modify_service`` implementation, in turn: each
    plugin, in pluggy's call order, gets what the previous one returned."""
    for _name, where, call in _each_plugin(config, "pytest_envbox_modify_service", call_order=True):
        results: object = call(config=config, service=service)  # [] when it returned None
        origin = f"pytest_envbox_modify_service in {where}"
        if not isinstance(results, list):
            raise ConfigError(f"{origin}: a wrapper returned {type(results).__name__}; return the "
                              "list of results its yield gave (changed or not)")  # fmt: skip
        if not results:
            continue
        if len(results) > 1:
            raise ConfigError(f"{origin} returned {len(results)} services for service "
                              f"{service.name!r} (several implementations in one plugin each "
                              "changed the service as it came in); return one")  # fmt: skip
        result = results[0]
        if not isinstance(result, Service):
            raise ConfigError(f"{origin} returned {result!r} for service {service.name!r}; return "
                              "a Service (dataclasses.replace(service, ...)) or None")  # fmt: skip
        if result.name != service.name:
            raise ConfigError(f"{origin} renamed service {service.name!r} to {result.name!r}; "
                              "the name cannot change (other services and tests refer to it)")  # fmt: skip
        service = result
    return service


def _environment(request: pytest.FixtureRequest, m: EnvboxMarker, catalog: Catalog,
                 workdir: Path) -> Environment:  # fmt: skip
    """An environment for the marker, with the project's hooks wired in, remembered for the
    run's report."""
    config = request.config
    hook = config.pluginmanager.hook

    def closed(env: Environment) -> None:
        stats = {row.name: row for row in report.totals([env.report()])}
        hook.pytest_envbox_environment_closed(environment=env, stats=stats)

    services = [modified(config, s) if isinstance(s, Service) else s for s in m.services]
    env = Environment(services, topology=m.topology, catalog=catalog, rootdir=config.rootpath,
                      workdir=workdir, on_close=closed,
                      on_ready=lambda h: hook.pytest_envbox_service_ready(handle=h),
                      modify_service=lambda s: modified(config, s))  # fmt: skip
    config.stash.setdefault(ENVIRONMENTS, []).append(env)
    return env


def _workdir(factory: pytest.TempPathFactory, name: str) -> Path:
    return factory.mktemp("envbox-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40], numbered=True)


def _scope_node(request: pytest.FixtureRequest, scope: str) -> pytest.Item | pytest.Collector:
    node: pytest.Item | pytest.Collector | None = None
    if scope == "class":
        node = request.node.getparent(pytest.Class)
        scope = "module" if node is None else scope
    if scope == "module":
        node = request.node.getparent(pytest.Module)
    if scope == "package":
        node = request.node.getparent(pytest.Package)
    return node if node is not None else request.session


@pytest.fixture
def envbox(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Environment]:  # fmt: skip
    """The test's :class:`~pytest_envbox.Environment`, with the marker's services started.

    Without a marker it is empty: ``envbox.start(...)`` starts services on demand.
    """
    config = request.config
    unavailable.before_start(request)  # a host that refused once: skip, or one line
    try:
        catalog = project_catalog(config)
    except ConfigError as e:
        failures.stop_for_project_error(request, e)
        raise
    marker = request.node.get_closest_marker("envbox")
    m = parse_marker(marker) if marker is not None else EnvboxMarker((), None, "function")
    if m.scope != "function":
        env = _shared_env(request, m, catalog, tmp_path_factory)
        request.node.stash.setdefault(_USED, []).append(env)
        yield env
        return
    env = _environment(request, m, catalog, _workdir(tmp_path_factory, request.node.name))
    if marker is None:
        env.missing_hint = _without_marker(request.node)
    request.node.stash.setdefault(_USED, []).append(env)
    try:
        if m.services or m.topology:
            env.open()
        yield env
    finally:
        env.close()


def _without_marker(node: pytest.Item | pytest.Collector) -> str:
    """Why a test without an envbox marker has none of the project's services, and the marker it
    may have meant (``envbx``: pytest warns of an unknown marker, but a warning is easily missed)."""
    text = ("this test has no @pytest.mark.envbox(...) marker, so its environment has only the "
            "services it started (envbox.start)")  # fmt: skip
    names = sorted({mark.name for mark in node.iter_markers()})
    close = difflib.get_close_matches("envbox", names, n=1)
    if close:
        text += f"; did you mean @pytest.mark.envbox? this test has @pytest.mark.{close[0]}"
    return text


def _shared_env(request: pytest.FixtureRequest, m: EnvboxMarker, catalog: Catalog,
                factory: pytest.TempPathFactory) -> Environment:  # fmt: skip
    node = _scope_node(request, m.scope)
    key = (m.scope, node.nodeid, tuple(repr(s) for s in m.services), m.topology)
    cache = request.config.stash.setdefault(_SHARED, {})
    found = cache.get(key)
    if isinstance(found, BaseException):
        raise found  # start-up failed for an earlier test of this scope: fail fast, same error
    if found is not None:
        return found
    env = _environment(request, m, catalog, _workdir(factory, node.name or "session"))

    def finish() -> None:
        cache.pop(key, None)
        env.close()

    node.addfinalizer(finish)
    try:
        env.open()
    except BaseException as e:
        cache[key] = e
        raise
    cache[key] = env
    return env


@pytest.fixture(autouse=True, name="_envbox_auto")
def envbox_autostart(request: pytest.FixtureRequest) -> None:
    """Start a marked test's services even when it does not ask for ``envbox`` by name."""
    node = request.node
    bad = node.stash.get(BAD_MARKER, None)
    if bad is not None:
        raise ConfigError(bad)
    if node.get_closest_marker("envbox") is not None and "envbox" not in request.fixturenames:
        request.getfixturevalue("envbox")


def keep_environments(item: pytest.Item, why: str) -> None:
    """--envbox-keep: the item's environments stay up after the run (see Environment.keep)."""
    for env in item.stash.get(_USED, []):
        if len(env):
            env.keep(why)


def log_sections(item: pytest.Item) -> list[tuple[str, str]]:
    """(service name, text) for each service the item used: its log tail and where the rest is."""
    out = []
    for env in item.stash.get(_USED, []):
        for name, h in env.services.items():
            state = h.exit_reason or "running"
            text = log_tail(h.log_path, 50)
            out.append((name, f"[{name}: {state}; full log: {h.log_path}]\n{text}"))
    return out


def oom_notes(item: pytest.Item) -> list[str]:
    """One line per service of the item that lost a process to its memory limit."""
    notes = []
    for env in item.stash.get(_USED, []):
        for name, h in env.services.items():
            if not h.running:
                if h.runs and h.runs[-1].oom_kills:
                    notes.append(f"service {name!r} {h.exit_reason}")
                continue
            with contextlib.suppress(EnvboxError):
                kills = h.stats().oom_kills
                if kills:
                    notes.append(f"service {name!r} had {kills} process(es) OOM-killed "
                                 f"({memory_limit_text(h.spec)})")
    return notes
