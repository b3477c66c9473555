"""``Environment`` and its ``Network``: the engine's public face, usable without pytest.

An :class:`Environment` is a set of services started together (in dependency order, independent
ones in parallel) and torn down together. Each running service is a
:class:`~pytest_envbox.engine.handle.ServiceHandle`, which refers to its
:class:`~pytest_envbox.spec.Service` (the frozen declaration) but never is one.

Everything is checked before anything is started: users, commands, working directories and mount
sources are resolved when the environment is built, so bad input is a ``ConfigError`` with nothing
to clean up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pytest_envbox.config import Catalog, select, start_levels
from pytest_envbox.engine import refused, virtual_services
from pytest_envbox.engine.client import SupervisorClient, get_supervisor, rootless
from pytest_envbox.engine.faults import Network
from pytest_envbox.engine.handle import ServiceHandle, published_ports, start_level, stop_all
from pytest_envbox.engine.hostports import reserve_host_ports
from pytest_envbox.engine.imageplan import PreparedImage, prepare_image_service
from pytest_envbox.engine.planning import Subnet, check_cgroups, check_ids, plan_for
from pytest_envbox.engine.volumes import make_volumes
from pytest_envbox.errors import EnvboxError, HostUnsupported
from pytest_envbox.kernel import refusal
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.spec import POD_IP, Service, Volume
from pytest_envbox.supervisor.protocol import KeepRequest, OwnDirRequest

__all__ = ["Environment"]

_env_ids = itertools.count(1)
#: Each environment's start and end (INFO); its services log under ``pytest_envbox.engine.handle``.
_log = logging.getLogger(__name__)


class Environment:
    """A set of sandboxed services, started together and torn down together.

    Example::

        with Environment([Service("web", "python -m http.server 8000", ports=[8000],
                                  ready=probe.http(8000))]) as env:
            assert env["web"].http.get("/").status_code == 200

    ``services`` are :class:`~pytest_envbox.Service` objects or names from ``catalog`` (the project's
    declarations); every dependency is added. ``rootdir`` anchors relative paths (default: the
    current directory), ``workdir`` too. Logs and generated files go to ``workdir`` (default: a
    temporary directory removed on exit, which also holds the logs: pass a directory to keep them).
    """

    def __init__(
        self,
        services: Iterable[Service | str] = (),
        *,
        topology: str | None = None,
        catalog: Catalog | None = None,
        rootdir: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        subnet: str | None = None,
        on_ready: Callable[[ServiceHandle], None] | None = None,
        on_close: Callable[[Environment], None] | None = None,
        modify_service: Callable[[Service], Service] | None = None,
        images: Mapping[str, PreparedImage] | None = None,
    ) -> None:
        self.catalog = catalog if catalog is not None else Catalog({}, {}, {})
        wanted = subnet or self.catalog.subnet  # None: one of the host's free ones, at open
        if wanted is not None:
            Subnet(wanted)  # a bad one is a ConfigError now, before anything starts
        self._net: Subnet | None = None  # known once the supervisor gave the network (_subnet)
        #: called after each start of a service has passed its readiness probe, and once the
        #: environment is closed (the pytest plugin calls its hooks from these)
        self.on_ready = on_ready
        self.on_close = on_close
        #: applied to the Service objects given to start() (the plugin's modify_service hook)
        self.modify_service = modify_service
        self.rootdir = Path(rootdir if rootdir is not None else os.getcwd()).resolve()
        #: service name -> its image, pulled and unpacked (engine/imageplan.py)
        self._images = dict(images or {})
        self.id = f"{os.getpid()}-{next(_env_ids)}"
        specs = select(self.catalog, list(services), topology)
        self._plans: dict[str, SandboxPlan] = {}
        specs = [self._plan(s) for s in specs]
        self._levels = start_levels(specs)
        self._specs = {s.name: s for s in specs}
        # Absolute: the sandbox binds files of it (hosts) from another mount namespace's view.
        self._given_workdir = (self.rootdir / workdir).resolve() if workdir is not None else None
        self.workdir: Path | None = None
        self._handles: dict[str, ServiceHandle] = {}
        self._order: list[str] = []  # start order, for teardown in reverse
        self._listed: set[str] = set()  # services in the environment's /etc/hosts
        self._volumes: dict[str, Volume] = {}  # the volumes made, by name (engine/volumes.py)
        self._volume_dir: Path | None = None  # where they are, made with the first
        #: Kubernetes Services' addresses -> their ports' backends, as the hub has them
        self._virtual: dict[str, dict[int, list[tuple[str, int]]]] = {}
        self.network = Network(self.id, wanted, lambda: self._handles.keys(), lambda: self._sup)
        self._sup: SupervisorClient | None = None
        self._closed = False
        #: why the environment is to outlive the process (``--envbox-keep``), see ``keep()``
        self._keep_reason: str | None = None
        self._kept = False
        #: said when a name is not in the environment: why it may be missing (the pytest plugin
        #: says that the test has no envbox marker, and which marker it may have meant)
        self.missing_hint: str | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._sup is not None else "not started")
        return f"<Environment {self.id} {state}: {', '.join(self._handles) or 'no services'}>"

    # --- mapping of running services ------------------------------------------------------

    @property
    def services(self) -> Mapping[str, ServiceHandle]:
        """The services of this environment by name (a read-only view)."""
        from types import MappingProxyType

        return MappingProxyType(self._handles)

    def __getitem__(self, name: str) -> ServiceHandle:
        __tracebackhide__ = True  # pytest: the KeyError's message is the whole story
        try:
            return self._handles[name]
        except KeyError:
            known = ", ".join(sorted(self._handles)) or "none"
            if name in self.catalog.virtual:
                raise KeyError(f"{name!r} is a Kubernetes Service, not a service: its pods' "
                               f"services are handles; this environment has: {known}") from None
            why = f": {self.missing_hint}" if self.missing_hint else ""
            raise KeyError(f"no service {name!r} in this environment (it has: {known}){why}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Environment:
        self.open()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def open(self) -> None:
        """Start every declared service; on any failure, tear down what started and raise."""
        if self._closed:
            raise EnvboxError("this environment is closed; create a new Environment to start services")
        if self._sup is not None:
            return
        if not sys.platform.startswith("linux"):
            found = refusal.platform_refusal()
            raise HostUnsupported(found.block(), refusal=found.kind)
        if os.geteuid() != 0 and not rootless():
            raise HostUnsupported(
                "rootless mode is off (--envbox-rootless=no, or ENVBOX_ROOTLESS=no) and this "
                "process is not root: namespaces, mounts and networks need root or a user "
                "namespace. Run the tests as root, or allow rootless mode (auto or yes)."
            )
        self._specs = {s.name: s for s in self._pull_images(self._specs.values(), self._plans)}
        self._levels = [[self._specs[s.name] for s in level] for level in self._levels]
        try:
            sup = get_supervisor()
        except Exception as e:
            better = refused.explain(e)  # a host that says no: what, why, and the fix
            if better is not None:
                raise better from None  # (its text ends with the original error)
            raise
        check_cgroups(sup, self._specs.values())
        if sup.ids:
            check_ids(sup, self._specs.values(), self._plans)
        self._sup = sup
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = self._given_workdir
        else:
            # mkdtemp: a new directory, mode 0700, of a random name; that name is what the
            # janitor recognises (supervisor/statedir.py) if this process dies before removing it.
            self.workdir = Path(tempfile.mkdtemp(prefix="envbox-"))
            self._sup.send(OwnDirRequest(str(self.workdir), own=True))
        _log.info("environment %s: starting %s in %d level(s), workdir %s", self.id,
                  ", ".join(repr(n) for n in self._specs) or "no services", len(self._levels),
                  self.workdir)  # fmt: skip
        try:
            self._list_hosts(self._specs.values(), fresh=True)
            self._start_levels(self._levels)
        except BaseException as e:
            self.close()
            better = refused.explain(e)  # a host that says no: what, why, and the fix
            if better is not None:
                raise better from None  # (its text ends with the original error)
            raise

    def start(self, service: Service | str) -> ServiceHandle:
        """Start one more service (and whatever it depends on that is not here yet)."""
        if self._closed:
            raise EnvboxError("this environment is closed; create a new Environment to start services")
        if self._sup is None:
            self.open()
        if isinstance(service, Service) and self.modify_service is not None:
            service = self.modify_service(service)
        if isinstance(service, str) and service in self._handles:
            h = self._handles[service]
            if not h.running:
                h.start()
            return h
        specs = select(self.catalog, [service, *self._specs.values()], None)
        new = [s for s in specs if s.name not in self._handles]
        assert self._sup is not None
        planned = dict(self._plans)
        new = [self._specs[s.name] if s.name in self._plans else self._plan(s, planned) for s in new]
        new = self._pull_images(new, planned)
        check_cgroups(self._sup, new)
        levels = start_levels([*self._specs.values(), *(s for s in new if s.name not in self._specs)])
        plans = {s.name: planned[s.name] for s in new}
        if self._sup.ids:
            check_ids(self._sup, new, plans)
        for s in new:
            self._plans[s.name] = plans[s.name]
            self._specs[s.name] = s
        wanted = {s.name for s in new}
        self._list_hosts(new)
        # Only the levels with a new service: the others (all running already) have nothing to do.
        self._start_levels([lvl for lvl in ([s for s in lvl if s.name in wanted] for lvl in levels) if lvl])
        name = service if isinstance(service, str) else service.name
        return self._handles[name]

    def _plan(self, spec: Service, plans: dict[str, SandboxPlan] | None = None) -> Service:
        """Plan ``spec`` into ``plans`` (default: the environment's); return the spec as it will
        run (an image service with its image's defaults). An image service whose image is not
        prepared yet only has its reference checked: :meth:`_pull_images` plans it at open."""
        plans = self._plans if plans is None else plans
        if spec.image is None:
            plans[spec.name] = plan_for(spec, self.rootdir)
        else:
            image = self._images.get(spec.name)
            if image is None:
                from pytest_envbox.engine.imageref import check_reference  # no requests here

                check_reference(spec, self.rootdir)
                return spec
            spec, plans[spec.name] = prepare_image_service(spec, image, self.rootdir, self.id)
        if spec.stop_signal is not None:  # the declaration's, over the image's
            plans[spec.name].stop_signal = int(signal.Signals[spec.stop_signal])
        return spec

    def _pull_images(self, specs: Iterable[Service], plans: dict[str, SandboxPlan]) -> list[Service]:
        """Pull (as each ``pull`` policy says) and unpack the images of ``specs`` not planned
        yet, then plan them; before anything starts, so a missing image starts nothing."""
        out = []
        for spec in specs:
            if spec.image is not None and spec.name not in plans:
                from pytest_envbox.engine.images import prepare  # requests: only for images

                self._images[spec.name] = prepare(spec, self.rootdir, self.catalog.insecure_registries)
                spec = self._plan(spec, plans)
            out.append(spec)
        return out

    def _list_hosts(self, specs: Iterable[Service], *, fresh: bool = False) -> None:
        """Add services (name and aliases) to the environment's ``/etc/hosts``, in place.

        One file, bound into every service: appending to it (same inode) is how running services
        learn of one started later. Programs that cache lookups keep their old answers.
        """
        assert self.workdir is not None
        lines = []
        if fresh:
            lines.append("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        virtual = self.catalog.virtual
        claimed = virtual_services.claimed_names(virtual, self._specs) if virtual else set()
        for spec in specs:
            if spec.name not in self._listed:
                address = self._address(spec.name)  # may fail (subnet full): before listing
                self._listed.add(spec.name)
                names = [n for n in (spec.name, *spec.aliases) if n not in claimed]
                if names:
                    lines.append(f"{address}\t{' '.join(names)}\n")
        if virtual:
            lines += virtual_services.host_lines(virtual, self._specs, self._address_of, self._listed)
        with open(self.workdir / "hosts", "w" if fresh else "a") as f:
            f.write("".join(lines))  # one write: a reader sees the old file or the new one
        if virtual:
            self._route_virtual()

    def _address_of(self, name: str) -> str:
        """A service's address, or a Kubernetes Service's (``virtual_services.key(name)``)."""
        return self._address(name) if name in self._specs else self._subnet().address(name)

    def _route_virtual(self) -> None:
        """The hub's rules for the Kubernetes Services of this environment, where they changed."""
        from pytest_envbox.engine.virtual import set_virtual_address

        assert self._sup is not None
        wanted = virtual_services.rules(self.catalog.virtual, self._specs, self._address_of)
        for address, ports in wanted.items():
            if self._virtual.get(address) != ports:
                set_virtual_address(self._sup, self.id, address, ports)
                self._virtual[address] = ports

    def volume(self, name: str) -> Path:
        """The host directory of the environment's volume ``name`` (or its file, for a volume of
        one file), to look at from a test. Rootless, the files a service wrote there belong to
        subordinate ids: read them from inside (``exec``) instead."""
        if name not in self._volumes or self._volume_dir is None:
            known = ", ".join(sorted(self._volumes)) or "none"
            raise KeyError(f"no volume {name!r} in this environment; it has: {known}")
        return self._volume_dir / name

    def _volume_base(self) -> Path:
        """The environment's directory of volumes: apart from its work directory, which may be
        kept (logs); owned by the supervisor until it removes it, so a killed run leaves none."""
        if self._volume_dir is None:
            assert self._sup is not None
            self._volume_dir = Path(tempfile.mkdtemp(prefix="envbox-"))  # 0700: bound, not reached
            self._sup.send(OwnDirRequest(str(self._volume_dir), own=True))
        return self._volume_dir

    def _address(self, name: str) -> str:
        """A service's address: its own, or the one of the service whose network it joins."""
        return self._subnet().address(self._net_owner(name))

    def _net_owner(self, name: str) -> str:
        """The service whose network namespace ``name`` is in (``network_of``, followed)."""
        while (owner := self._specs[name].network_of) is not None and owner in self._specs:
            name = owner
        return name

    def _subnet(self) -> Subnet:
        """The environment's subnet, given by the supervisor on first need (unique on this host
        unless configured), from which its services' addresses follow."""
        if self._net is None:
            assert self._sup is not None
            self._net = Subnet(self.network.bind(self._sup))
        return self._net

    def _start_levels(self, levels: Sequence[Sequence[Service]]) -> None:
        """Start level after level (see :func:`~pytest_envbox.engine.handle.start_level`); a
        level starts once every service of the one before is ready."""
        assert self._sup is not None and self.workdir is not None
        # Every fixed host port first, all or none: a taken one fails before anything starts.
        reserve_host_ports(self._sup, self.id, [spec for level in levels for spec in level])
        for level in levels:
            if any(spec.volumes for spec in level):
                make_volumes(self._volume_base(), level, self._plans, self._volumes)
            handles = []
            for spec in level:
                address = self._address(spec.name)
                plan = self._plans[spec.name]
                plan.env = {k: v.replace(POD_IP, address) for k, v in plan.env.items()}
                plan.argv = [a.replace(POD_IP, address) for a in plan.argv]
                wire = self._subnet().wire(self._net_owner(spec.name))
                h = ServiceHandle(spec, plan, self._sup, env_id=self.id, wire=wire,
                                  workdir=self.workdir, on_ready=self._service_ready)  # fmt: skip
                self._handles[spec.name] = h
                self._order.append(spec.name)
                handles.append(h)
            start_level(self._sup, handles)

    def _service_ready(self, handle: ServiceHandle) -> None:
        # ``on_ready`` as it is at each start (it may be set after open()), not as it was.
        if self.on_ready is not None:
            self.on_ready(handle)

    def report(self) -> dict[str, Any]:
        """What happened in this environment: per service, its limits and one record per run
        (start, ready and stop times as Unix time; return code; peak memory, cpu seconds and
        OOM kills from its cgroup, once the run ended). The JSON of ``--envbox-report``."""
        services: dict[str, dict[str, Any]] = {}
        for name, h in self._handles.items():
            lim = h.spec.limits
            services[name] = {"limits": {"memory": lim.memory, "cpu": lim.cpu, "pids": lim.pids},
                              "ip": h.ip, "runs": [dataclasses.asdict(r) for r in h.runs],
                              "log": str(h.log_path)}  # fmt: skip
            if self._kept:  # how to reach it now: its host pid and published ports
                services[name].update(pid=h.pid, ports={str(p): hp for p, hp in published_ports(h).items()})
        subnet = str(self._net.network) if self._net is not None else None
        return {"id": self.id, "subnet": subnet, "services": services,
                "kept": self._keep_reason if self._kept else None, "rootless": rootless()}  # fmt: skip

    def keep(self, reason: str) -> None:
        """Leave the services running when the environment closes, and after this process ends,
        until ``envbox clean`` stops them (the plugin's ``--envbox-keep`` does this for a failed
        test's environments).

        ``reason`` says why; ``envbox clean`` and the report (``report()["kept"]``) show it, and
        the report then has each service's pid and published ports, to reach it. Call it before
        :meth:`close`, which does the keeping; an environment none of whose services is running
        any more is closed as usual. A later call replaces the reason.

        Example::

            env = Environment(["api"])
            env.open()
            try:
                run_the_scenario(env)
            except Exception:
                env.keep("the scenario failed: inspect it, then run `envbox clean`")
                raise
            finally:
                env.close()
        """
        self._keep_reason = reason

    def close(self) -> None:
        """Stop every service (reverse start order) and release everything. Idempotent."""
        if self._closed or self._sup is None:
            self._closed = True
            return
        self._closed = True
        handles = [self._handles[n] for n in reversed(self._order)]
        if self._keep_reason is not None and any(h.running for h in handles):
            with contextlib.suppress(EnvboxError, OSError):
                self._sup.call(KeepRequest(self.id, self._keep_reason))
                self._kept = True
        if self._kept:
            _log.info("environment %s: kept (%s)", self.id, self._keep_reason)
            if self.on_close is not None:
                self.on_close(self)
            return
        owned = self._given_workdir is None and self.workdir is not None
        # Volumes may hold files of the services' users, which only the supervisor (root in its
        # user namespace, rootless) can remove: it removes their directory.
        stop_all(self._sup, handles, str(self.workdir) if owned else None,
                 remove=None if self._volume_dir is None else str(self._volume_dir))
        self.network.release()
        if owned and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _log.info("environment %s: closed", self.id)
        if self.on_close is not None:
            self.on_close(self)
