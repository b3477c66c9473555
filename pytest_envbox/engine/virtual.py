"""Virtual addresses of an environment: Kubernetes Services, as kube-proxy makes them.

A Service's ClusterIP is a virtual address of the environment's subnet; each of its ports leads
to the ``targetPort`` of one of its endpoints (the services behind it), chosen at random per
connection. The supervisor makes them in the environment's hub (supervisor/vips.py), where the
services cannot undo them and the network's faults still apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pytest_envbox.engine.client import SupervisorClient, SupervisorError
from pytest_envbox.errors import EnvboxError
from pytest_envbox.supervisor.protocol import VirtualAddressRequest

__all__ = ["set_virtual_address"]


def set_virtual_address(sup: SupervisorClient, env_id: str, address: str,
                        ports: Mapping[int, Sequence[tuple[str, int]]]) -> None:  # fmt: skip
    """Make ``address`` (of the environment's subnet, no service's) lead, on each port of
    ``ports``, to one of its backends ``(address, port)``, at random per connection (TCP and
    UDP). Called again for the same address, it replaces all its ports; with no ports, the
    address goes. The environment's end frees them all.

    Example (a Service ``web`` with port 80 -> targetPort 8080 on two pods)::

        vip = env._subnet().address("service/web")
        set_virtual_address(sup, env.id, vip, {80: [(env["web-0"].ip, 8080),
                                                     (env["web-1"].ip, 8080)]})

    Raises :class:`~pytest_envbox.errors.HostUnsupported` when the kernel lacks nf_tables NAT,
    :class:`EnvboxError` when the supervisor refuses (an address not of the subnet or a
    service's, a port out of range, a port without backends...).
    """
    request = VirtualAddressRequest(env_id, address, [
        (port, [(backend, target) for backend, target in backends])
        for port, backends in sorted(ports.items())
    ])  # fmt: skip
    try:
        sup.call(request)
    except SupervisorError as e:
        raise EnvboxError(f"virtual address {address}: {e}") from None
