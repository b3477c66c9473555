"""A Kubernetes manifest's pods as envbox runs them, seen from inside (busybox image): init
containers complete first, a pod's containers share its network and its emptyDir, ConfigMap and
Secret files are mounted, each replica gets its own name and address, a Service leads to every
replica's named target port, a Job completes before its dependents are asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_envbox import Environment, ServiceFailed
from pytest_envbox.config import load_project_config
from tests.imagekit.build import busybox_layout

MANIFEST = """\
apiVersion: v1
kind: ConfigMap
metadata: {{name: web-config}}
data: {{greeting: "hello from a ConfigMap"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: web-secret}}
stringData: {{token: s3cret}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      initContainers:
      - name: init
        image: "{image}"
        command: ["sh", "-c", "echo made by init for $(POD_NAME) > /www/index.html"]
        env:
        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        volumeMounts: [{{name: www, mountPath: /www}}]
      containers:
      - name: httpd
        image: "{image}"
        command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
        ports: [{{containerPort: 8080, name: http}}]
        readinessProbe: {{tcpSocket: {{port: http}}, periodSeconds: 1}}
        env:
        - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
        volumeMounts:
        - {{name: www, mountPath: /www}}
        - {{name: config, mountPath: /etc/web}}
        - {{name: secret, mountPath: /etc/secret, readOnly: true}}
      - name: sidecar
        image: "{image}"
        command: ["sleep", "1000"]
      volumes:
      - {{name: www, emptyDir: {{}}}}
      - {{name: config, configMap: {{name: web-config}}}}
      - {{name: secret, secret: {{secretName: web-secret, defaultMode: 0400}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
---
apiVersion: batch/v1
kind: Job
metadata: {{name: check}}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: check
        image: "{image}"
        command: ["sh", "-c", "wget -q -O - http://web.default.svc.cluster.local/ && exit {code}"]
"""


def project(tmp_path: Path, code: int = 0) -> Path:
    (tmp_path / "app.yaml").write_text(MANIFEST.format(image=f"oci:{busybox_layout()}:latest", code=code))
    (tmp_path / "pyproject.toml").write_text('[tool.envbox]\nkubernetes = ["app.yaml"]\n'
                                             '[tool.envbox.services.check]\ndepends_on = ["web-0-httpd", '
                                             '"web-1-httpd"]\n')  # fmt: skip
    return tmp_path


def test_a_deployments_pods_run_as_in_the_cluster(tmp_path: Path) -> None:
    catalog = load_project_config(project(tmp_path))
    with Environment(topology="kubernetes", catalog=catalog, rootdir=tmp_path) as env:
        for i in (0, 1):
            httpd, sidecar, init = env[f"web-{i}-httpd"], env[f"web-{i}-sidecar"], env[f"web-{i}-init"]
            assert init.returncode == 0 and not init.running  # completed, before the others started
            assert httpd.ip == sidecar.ip == init.ip  # one pod, one address
            # The sidecar reaches its pod's server on localhost; the page the init container wrote
            # into the pod's emptyDir, with its pod's name.
            page = sidecar.exec(["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]).stdout
            assert page == f"made by init for web-{i}\n"
            assert httpd.exec(["sh", "-c", "echo $POD_IP"]).stdout.strip() == httpd.ip
            assert httpd.exec(["cat", "/etc/web/greeting"]).stdout == "hello from a ConfigMap"
            secret = httpd.exec(["sh", "-c", "cat /etc/secret/token; echo; stat -c %a /etc/secret/token"])
            assert secret.stdout.split() == ["s3cret", "400"]
            assert httpd.exec(["sh", "-c", "echo x > /etc/web/y"]).returncode != 0  # read-only
        assert env["web-0-httpd"].ip != env["web-1-httpd"].ip
        # The Job ran to completion through the Service (port 80 to the pods' port named http).
        assert env["check"].returncode == 0 and "made by init for web-" in env["check"].logs()
        # Through the Service, both replicas answer, from a sidecar (any pod).
        sidecar = env["web-0-sidecar"]
        seen = {sidecar.exec(["wget", "-q", "-O", "-", "http://web/"]).stdout for _ in range(30)}
        assert seen == {"made by init for web-0\n", "made by init for web-1\n"}


def test_a_job_that_fails_fails_the_environment(tmp_path: Path) -> None:
    catalog = load_project_config(project(tmp_path, code=4))
    assert catalog.services["check"].retries == 1  # its backoffLimit
    env = Environment(["check"], catalog=catalog, rootdir=tmp_path)
    with pytest.raises(ServiceFailed, match="return code 4"):
        env.open()
    assert len(env.report()["services"]["check"]["runs"]) == 2  # tried, and retried once
