"""Compose files written by others (tests/data/compose, see its README): what load_compose maps,
ignores and refuses in them, and the override files that make the refused ones load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_envbox.compose import ComposeProject, VolumeMount, load_compose
from pytest_envbox.errors import ConfigError
from pytest_envbox.probe import ExecProbe
from pytest_envbox.spec import Mount

DATA = Path(__file__).resolve().parents[1] / "data" / "compose"
AWESOME = DATA / "awesome-compose"


def ignored(project: ComposeProject) -> set[tuple[str | None, str]]:
    return {(i.service, i.key) for i in project.ignored}


def test_gitea_postgres() -> None:
    project = load_compose([AWESOME / "gitea-postgres" / "compose.yaml"], environ={})
    assert list(project.services) == ["gitea", "db"]
    gitea, db = project.services["gitea"], project.services["db"]
    assert (gitea.image, gitea.ports) == ("gitea/gitea:latest", (3000,))
    assert gitea.env["DB_HOST"] == "db:5432"
    assert (db.image, db.ports) == ("postgres:alpine", (5432,))  # from expose
    assert db.env == {"POSTGRES_USER": "gitea", "POSTGRES_PASSWORD": "gitea", "POSTGRES_DB": "gitea"}
    assert project.volumes == {"gitea": (VolumeMount("git_data", "/data"),),
                               "db": (VolumeMount("db_data", "/var/lib/postgresql/data"),)}  # fmt: skip
    assert ignored(project) == {("gitea", "restart"), ("db", "restart"), (None, "volumes")}
    assert gitea.depends_on == () and db.ready is None


def test_nextcloud_redis_mariadb() -> None:
    project = load_compose([AWESOME / "nextcloud-redis-mariadb" / "compose.yaml"], environ={})
    assert list(project.services) == ["nc", "redis", "db"]
    nc, redis, db = (project.services[n] for n in ("nc", "redis", "db"))
    assert (nc.ports, redis.ports, db.ports) == ((80,), (6379,), (3306,))
    assert db.args == ("--transaction-isolation=READ-COMMITTED", "--binlog-format=ROW")
    assert nc.aliases == () and db.command == ()
    assert set(project.volumes) == {"nc", "db"}
    assert ignored(project) == {("nc", "restart"), ("redis", "restart"), ("db", "restart"),
                                (None, "volumes"), (None, "networks"),
                                # each on the environment's one network: redis reaches db there
                                ("nc", "networks.redisnet"), ("nc", "networks.dbnet"),
                                ("redis", "networks.redisnet"), ("db", "networks.dbnet")}  # fmt: skip


def test_prometheus_grafana_bind_mounts_start_at_the_compose_files_directory() -> None:
    here = AWESOME / "prometheus-grafana"
    project = load_compose([here / "compose.yaml"], environ={})
    prometheus, grafana = project.services["prometheus"], project.services["grafana"]
    assert prometheus.args == ("--config.file=/etc/prometheus/prometheus.yml",)
    assert prometheus.mounts == (Mount(str(here / "prometheus"), "/etc/prometheus", readonly=False),)
    assert project.volumes == {"prometheus": (VolumeMount("prom_data", "/prometheus"),)}
    assert grafana.mounts == (Mount(str(here / "grafana"), "/etc/grafana/provisioning/datasources",
                                    readonly=False),)  # fmt: skip
    assert (prometheus.ports, grafana.ports) == ((9090,), (3000,))
    services, keys = ("prometheus", "grafana"), ("container_name", "restart")
    assert ignored(project) == {(s, k) for s in services for k in keys} | {(None, "volumes")}


def test_elasticsearch_logstash_kibana_refuses_the_udp_port() -> None:
    compose = AWESOME / "elasticsearch-logstash-kibana" / "compose.yaml"
    with pytest.raises(ConfigError) as info:
        load_compose([compose], environ={})
    assert (info.value.service, info.value.key) == ("logstash", "ports[1]")
    assert "5000/udp" in str(info.value) and str(compose) in str(info.value)


def test_elasticsearch_logstash_kibana_with_an_override(tmp_path: Path) -> None:
    compose = AWESOME / "elasticsearch-logstash-kibana" / "compose.yaml"
    override = tmp_path / "envbox.override.yaml"
    override.write_text("services:\n  logstash:\n    ports: !override ['5000:5000/tcp', '5044', '9600']\n")
    project = load_compose([compose, override], environ={})
    es, logstash, kibana = (project.services[n] for n in ("elasticsearch", "logstash", "kibana"))
    assert es.ports == (9200, 9300)
    assert es.env == {"discovery.type": "single-node", "ES_JAVA_OPTS": "-Xms512m -Xmx512m"}
    assert isinstance(es.ready, ExecProbe)
    assert es.ready.argv == ("/bin/sh", "-c", "curl --silent --fail localhost:9200/_cluster/health || exit 1")
    assert es.ready.timeout == 3 * (10 + 10)
    assert logstash.ports == (5000, 5044, 9600)
    assert logstash.args == ("logstash", "-f", "/usr/share/logstash/pipeline/logstash-nginx.config")
    assert logstash.depends_on == ("elasticsearch",) and kibana.depends_on == ("elasticsearch",)
    assert [m.target for m in logstash.mounts] == ["/usr/share/logstash/pipeline/logstash-nginx.config",
                                                   "/home/nginx.log"]  # fmt: skip
    assert ignored(project) == {(s, k) for s in ("elasticsearch", "logstash", "kibana")
                                for k in ("container_name", "networks.elastic")} | {(None, "networks")}
    assert {i.file for i in project.ignored} == {compose}


@pytest.fixture
def airflow(tmp_path: Path) -> Path:
    """A copy of Airflow's compose file with the .env its documentation asks users to write."""
    shutil.copy(DATA / "airflow" / "docker-compose.yaml", tmp_path / "docker-compose.yaml")
    (tmp_path / ".env").write_text("AIRFLOW_UID=50000\n")
    return tmp_path


def test_airflow_runs_its_init_job_to_completion_first(airflow: Path) -> None:
    project = load_compose([airflow / "docker-compose.yaml"], environ={})
    assert project.services["airflow-init"].oneshot
    assert "airflow-init" in project.services["airflow-apiserver"].depends_on


AIRFLOW_OVERRIDE = """
services:
  airflow-apiserver: &without-init
    depends_on: {airflow-init: !reset null}
  airflow-scheduler: *without-init
  airflow-dag-processor: *without-init
  airflow-worker: *without-init
  airflow-triggerer: *without-init
  flower: *without-init
  airflow-init: !reset null
"""


def test_airflow_with_an_override_that_drops_the_init_job(airflow: Path) -> None:
    (airflow / "envbox.yaml").write_text(AIRFLOW_OVERRIDE)
    environ = {"AIRFLOW_IMAGE_NAME": "apache/airflow:3.0.2", "FERNET_KEY": "k"}
    project = load_compose([airflow / "docker-compose.yaml", airflow / "envbox.yaml"], environ=environ)
    assert list(project.services) == [
        "postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
        "airflow-worker", "airflow-triggerer",
    ]  # fmt: skip
    api = project.services["airflow-apiserver"]
    assert api.image == "apache/airflow:3.0.2"  # ${AIRFLOW_IMAGE_NAME:-...} from the environment
    assert api.user == "50000:0"  # ${AIRFLOW_UID:-50000} from .env
    assert api.args == ("api-server",) and api.ports == (8080,)
    assert api.depends_on == ("redis", "postgres")
    assert api.env["AIRFLOW__CORE__FERNET_KEY"] == "k"
    assert api.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert api.env["AIRFLOW_UID"] == "50000"  # env_file: .env
    assert api.env["_PIP_ADDITIONAL_REQUIREMENTS"] == ""
    assert [m.target for m in api.mounts] == ["/opt/airflow/dags", "/opt/airflow/logs", "/opt/airflow/config",
                                              "/opt/airflow/plugins"]  # fmt: skip
    assert api.mounts[0].source == str(airflow / "dags")
    worker = project.services["airflow-worker"]
    assert worker.depends_on == ("redis", "postgres", "airflow-apiserver")
    assert worker.env["DUMB_INIT_SETSID"] == "0"
    assert worker.ready.argv[-1].count('"celery@${HOSTNAME}"') == 2  # $$ left for the shell
    redis = project.services["redis"]
    assert (redis.ports, redis.ready.argv, redis.ready.timeout) == ((6379,), ("redis-cli", "ping"),
                                                                   30 + 50 * (10 + 30))  # fmt: skip
    postgres = project.services["postgres"]
    assert postgres.ready.timeout == 5 + 5 * (10 + 30)
    assert project.volumes == {"postgres": (VolumeMount("postgres-db-volume", "/var/lib/postgresql/data"),)}
    assert ignored(project) == {(s, "restart") for s in project.services} | {(None, "volumes")}
    assert project.warnings == ()


def test_airflow_profiles(airflow: Path) -> None:
    (airflow / "envbox.yaml").write_text(AIRFLOW_OVERRIDE)
    files = [airflow / "docker-compose.yaml", airflow / "envbox.yaml"]
    project = load_compose(files, environ={}, profiles=["flower", "debug"])
    assert {"flower", "airflow-cli"} <= set(project.services)
    assert project.services["flower"].ports == (5555,)
    assert project.services["airflow-cli"].args == ("bash", "-c", "airflow")
    assert project.services["airflow-cli"].env["CONNECTION_CHECK_MAX_COUNT"] == "0"
    # FERNET_KEY is unset: an empty string, and a warning for each place it is used
    assert any("FERNET_KEY" in w for w in project.warnings)
