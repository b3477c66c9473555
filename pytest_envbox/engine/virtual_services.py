"""Kubernetes Services in an environment (:class:`~pytest_envbox.sources.VirtualService`): their
names in the environment's ``/etc/hosts`` and their addresses' rules in its hub.

A Service's name resolves to an address of its own in the environment's subnet (a ClusterIP);
each of its ports leads to the target port of one of the selected pods that run in this
environment, chosen per connection as kube-proxy does (the hub's DNAT rules, see
supervisor/vips.py). A headless Service (``clusterIP: None``) resolves to the pods' own addresses.
A Service none of whose pods runs in the environment is left out: its name does not resolve.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from pytest_envbox.sources import VirtualService

__all__ = ["claimed_names", "host_lines", "key", "rules"]


def key(name: str) -> str:
    """The name a Service's address is assigned under in the environment's subnet (no service
    name has a ``/``)."""
    return f"service/{name}"


def claimed_names(virtual: Mapping[str, VirtualService], running: Collection[str]) -> set[str]:
    """Names a Service of this environment takes from a workload of the same name (guestbook's
    ``redis-master`` Deployment and Service): inside the environment the name is the Service's."""
    return {h for vs in virtual.values() if _backends(vs, running) for h in vs.hostnames}


def _backends(vs: VirtualService, running: Collection[str]) -> list[tuple[str, int, int]]:
    return [b for b in vs.backends if b[0] in running]


def host_lines(virtual: Mapping[str, VirtualService], running: Collection[str],
               address: Callable[[str], str], listed: set[str]) -> list[str]:  # fmt: skip
    """``/etc/hosts`` lines for the Services with a pod in ``running`` not listed yet (``listed``
    is updated); ``address(name)`` gives a service's address, ``address(key(name))`` a
    Service's."""
    lines: list[str] = []
    for vs in virtual.values():
        backends = _backends(vs, running)
        if not backends or key(vs.name) in listed:
            continue
        listed.add(key(vs.name))
        names = " ".join(vs.hostnames)
        if vs.headless:
            lines.extend(f"{ip}\t{names}\n" for ip in dict.fromkeys(address(b[0]) for b in backends))
        else:
            lines.append(f"{address(key(vs.name))}\t{names}\n")
    return lines


def rules(virtual: Mapping[str, VirtualService], running: Collection[str],
          address: Callable[[str], str]) -> dict[str, dict[int, list[tuple[str, int]]]]:  # fmt: skip
    """Service address -> port -> the (pod address, target port) it leads to, for the Services
    (not headless) with a pod in ``running``."""
    out: dict[str, dict[int, list[tuple[str, int]]]] = {}
    for vs in virtual.values():
        backends = _backends(vs, running)
        if vs.headless or not backends:
            continue
        ports: dict[int, list[tuple[str, int]]] = {}
        for owner, port, target in backends:
            dest = (address(owner), target)
            if dest not in ports.setdefault(port, []):
                ports[port].append(dest)
        out[address(key(vs.name))] = ports
    return out
