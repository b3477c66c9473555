"""``envbox doctor --config``: what the project declares, where each service comes from, and what
was read from its compose files and manifests but ignored.

Reading the configuration starts nothing, so this runs anywhere (no root, no namespaces): the
place to see how envbox understood a compose file before a test runs it.
"""

from __future__ import annotations

from pathlib import Path

from pytest_envbox.config import load_project_config

__all__ = ["config_report"]


def config_report(rootdir: Path) -> int:
    """Print the report for the project at ``rootdir``; a ``ConfigError`` propagates."""
    catalog = load_project_config(rootdir)
    if not catalog.services:
        print(f"envbox: no services are declared at {rootdir} (looked for envbox.toml, then "
              "[tool.envbox] in pyproject.toml)")  # fmt: skip
        return 0
    print(f"services ({len(catalog.services)}), from {rootdir}:")
    width = max(map(len, catalog.services))
    for name, service in catalog.services.items():
        what = service.image or " ".join(service.command[:3]) + (" ..." if len(service.command) > 3 else "")
        flags = [f for f, on in (("oneshot", service.oneshot),
                                 (f"network of {service.network_of}", service.network_of)) if on]  # fmt: skip
        extra = f" [{', '.join(flags)}]" if flags else ""
        print(f"  {name:<{width}}  {what}{extra}")
        print(f"  {'':<{width}}  from {catalog.origins.get(name, '?')}")
    if catalog.virtual:
        print(f"Kubernetes Services ({len(catalog.virtual)}):")
        for vs in catalog.virtual.values():
            ports = sorted({(p, t) for _, p, t in vs.backends})
            pods = sorted({b[0] for b in vs.backends})
            shown = ", ".join(f"{p}->{t}" for p, t in ports)
            kind = "headless, " if vs.headless else ""
            print(f"  {vs.name}: {kind}ports {shown or 'none'} to {', '.join(pods) or 'no pod'}")
    if catalog.topologies:
        print("topologies:")
        for topology, members in catalog.topologies.items():
            print(f"  {topology}: {', '.join(members)}")
    for warning in catalog.warnings:
        print(f"warning: {warning}")
    if catalog.ignored:
        print(f"ignored ({len(catalog.ignored)}): read, and not needed for a test run")
        for line in catalog.ignored:
            print(f"  {line}")
    else:
        print("ignored: nothing")
    return 0
