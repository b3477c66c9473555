"""Real-world compose files (tests/data/compose, unchanged: see its README for where each comes
from and its licence) run by envbox, their images pointed at locally built ones, or their
services replaced by host programs, through ``[tool.envbox.services.NAME]`` overrides: what runs,
and which keys are reported as ignored (``envbox doctor --config``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox import Environment
from pytest_envbox.config import load_project_config
from tests.imagekit.build import postgres_layout, redis_layout

AWESOME = Path(__file__).resolve().parents[1] / "data" / "compose" / "awesome-compose"
PY = sys.executable


def project(tmp_path: Path, example: str, toml: str) -> Path:
    shutil.copy(AWESOME / example / "compose.yaml", tmp_path / "compose.yaml")
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(toml))
    return tmp_path


def doctor(root: Path) -> str:
    r = subprocess.run([PY, "-m", "pytest_envbox.cli", "doctor", "--config", "--rootdir", str(root)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


# A stand-in for Gitea: what matters here is that it reaches its database by the compose file's
# DB_HOST, as the user and database the compose file's environment names.
GITEA = textwrap.dedent("""
    import http.server, os, subprocess
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = "postgresql://{DB_USER}:{DB_PASSWD}@{DB_HOST}/{DB_NAME}".format(**os.environ)
            r = subprocess.run(["psql", url, "-Atc", "SELECT current_user || '@' || current_database()"],
                               capture_output=True, text=True)
            body = (r.stdout or r.stderr).encode()
            self.send_response(200 if r.returncode == 0 else 500); self.end_headers(); self.wfile.write(body)
    http.server.HTTPServer(("0.0.0.0", 3000), H).serve_forever()
""")


def test_gitea_postgres_runs_its_database_image_with_a_private_named_volume(tmp_path: Path) -> None:
    if shutil.which("psql") is None:
        pytest.skip("psql is missing: apt-get install postgresql-client")
    root = project(tmp_path, "gitea-postgres", f"""
        [tool.envbox]
        compose = ["compose.yaml"]

        [tool.envbox.services.db]
        image = "oci:{postgres_layout()}:latest"
        ready = {{ exec = ["pg_isready", "-q", "-h", "127.0.0.1", "-U", "gitea"], timeout = "120s" }}

        [tool.envbox.services.gitea]
        image = false
        command = ["{PY}", "-c", {json.dumps(GITEA)}]
        ready = {{ http = 3000, status = 200, timeout = "60s" }}
        depends_on = ["db"]
    """)
    catalog = load_project_config(root, environ={})
    assert catalog.services["db"].volumes[0].name == "db_data"
    with Environment(topology="compose", catalog=catalog, rootdir=root) as env:
        answer = env["gitea"].http.get("/", timeout=30)
        assert (answer.status_code, answer.text.strip()) == (200, "gitea@gitea")
        volume = env.volume("db_data")
        # The cluster initdb made is in the named volume (mounted there, the environment's own;
        # rootless, its files belong to subordinate ids this test cannot read: look inside).
        inside = env["db"].exec(["sh", "-c", "cat $PGDATA/PG_VERSION && grep -c ' /var/lib/postgresql/data ' "
                                 "/proc/self/mountinfo"])  # fmt: skip
        assert inside.returncode == 0 and inside.stdout.split()[1] == "1", inside
        assert volume.is_dir() and volume.stat().st_ino == int(env["db"].exec(
            ["stat", "-c", "%i", "/var/lib/postgresql/data"]).stdout)
        assert {p.name for p in volume.parent.iterdir()} == {"db_data", "git_data"}
    assert not volume.exists()
    report = doctor(root)
    assert "compose.yaml: services.gitea.restart" in report
    assert "compose.yaml: services.db.restart" in report
    assert "compose.yaml: volumes (the definitions; each named volume is the environment's own)" in report


def test_prometheus_grafana_bind_mounts_are_relative_to_the_compose_file(tmp_path: Path) -> None:
    root = project(tmp_path, "prometheus-grafana", f"""
        [tool.envbox]
        compose = ["compose.yaml"]

        [tool.envbox.services.prometheus]
        image = false
        command = ["{PY}", "-m", "http.server", "9090", "--directory", "/etc/prometheus"]
        ready = {{ http = 9090 }}

        [tool.envbox.services.grafana]
        image = false
        command = ["{PY}", "-m", "http.server", "3000", "-d", "/etc/grafana/provisioning/datasources"]
        ready = {{ http = 3000 }}
    """)
    (root / "prometheus").mkdir()
    (root / "prometheus" / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    (root / "grafana").mkdir()
    (root / "grafana" / "datasource.yml").write_text("apiVersion: 1\n")
    catalog = load_project_config(root, environ={})
    assert catalog.services["prometheus"].args is None  # its image's command went with the image
    with Environment(topology="compose", catalog=catalog, rootdir=root) as env:
        prometheus = env["prometheus"].http.get("/prometheus.yml", timeout=10)
        assert prometheus.text == "global:\n  scrape_interval: 15s\n"
        assert env["grafana"].http.get("/datasource.yml", timeout=10).text == "apiVersion: 1\n"
        assert env["grafana"].exec(["sh", "-c", "echo $GF_SECURITY_ADMIN_USER"]).stdout == "admin\n"
        # prom_data, a named volume, is the environment's own, writable by the service.
        assert env["prometheus"].exec(["touch", "/prometheus/wal"]).returncode == 0
    report = doctor(root)
    assert "compose.yaml: services.prometheus.container_name" in report
    assert "compose.yaml: services.grafana.restart" in report


def test_nextcloud_redis_mariadb_runs_the_service_a_test_asks_for(tmp_path: Path) -> None:
    root = project(tmp_path, "nextcloud-redis-mariadb", f"""
        [tool.envbox]
        compose = ["compose.yaml"]

        [tool.envbox.services.redis]
        image = "oci:{redis_layout()}:latest"
        ready = {{ tcp = 6379 }}
    """)
    catalog = load_project_config(root, environ={})
    assert catalog.services["nc"].volumes[0].name == "nc_data"
    with Environment(["redis"], catalog=catalog, rootdir=root) as env:
        assert list(env) == ["redis"]  # nc and db are declared, not asked for
        import socket

        with socket.create_connection(("127.0.0.1", env["redis"].port(6379)), timeout=10) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(16) == b"+PONG\r\n"
    report = doctor(root)
    for key in ("services.nc.networks.redisnet", "services.db.networks.dbnet", "services.redis.restart",
                "services.db.restart", "networks"):
        assert f"compose.yaml: {key}" in report, key
