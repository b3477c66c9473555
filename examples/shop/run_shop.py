"""Start the shop's services outside pytest, print where they listen, stop them on Enter.

Run it from examples/shop, as root: ``python3 run_shop.py``.
"""

from __future__ import annotations

from pathlib import Path

from pytest_envbox import Environment
from pytest_envbox.config import load_project_config

ROOT = Path(__file__).resolve().parent


def main() -> None:
    catalog = load_project_config(ROOT)  # the [tool.envbox] tables of ./pyproject.toml
    with Environment(topology="shop", catalog=catalog, rootdir=ROOT) as env:
        for name, service in env.services.items():
            for port in service.spec.ports:
                print(f"{name}: port {port} is 127.0.0.1:{service.port(port)}")
        print(f"logs in {env.workdir} (removed on exit)")
        input("press Enter to stop\n")


if __name__ == "__main__":
    main()
