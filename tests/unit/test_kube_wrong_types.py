"""Every field of a manifest that uses most of what load_manifests reads, replaced in turn by a
value of the wrong type: each load either succeeds or raises a ConfigError, never another
exception (a TypeError from deep inside would tell the user nothing about their file)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pytest_envbox.errors import ConfigError
from pytest_envbox.kubernetes import load_manifests

MANIFEST = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {LEVEL: debug, app.conf: "a"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
data: {PW: czNjcmV0}
stringData: {USER: u}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web, annotations: {a: b}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  volumeClaimTemplates: [{metadata: {name: data}, spec: {}}]
  template:
    metadata: {labels: {app: web}}
    spec:
      securityContext: {runAsUser: 1, runAsGroup: 2}
      initContainers: [{name: init, image: a, command: [x, $(LEVEL)]}]
      volumes:
      - {name: conf, configMap: {name: settings, items: [{key: app.conf, path: a.conf, mode: 0600}]}}
      - {name: sec, secret: {secretName: creds, defaultMode: 0644}}
      - {name: tmp, emptyDir: {medium: Memory, sizeLimit: 1Mi}}
      containers:
      - name: server
        image: app:1
        imagePullPolicy: Always
        command: [run]
        args: [--x=$(PW)]
        workingDir: /srv
        env:
        - {name: A, value: a}
        - {name: PW, valueFrom: {secretKeyRef: {name: creds, key: PW}}}
        - {name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        envFrom: [{configMapRef: {name: settings}, prefix: C_}]
        ports: [{containerPort: 8080, name: http}]
        resources: {limits: {memory: 1Gi}, requests: {cpu: 100m}}
        readinessProbe: {httpGet: {port: http, path: /h}, periodSeconds: 2, failureThreshold: 2}
        securityContext: {runAsUser: 3}
        volumeMounts:
        - {name: conf, mountPath: /etc/app}
        - {name: sec, mountPath: /run/sec, readOnly: true, subPath: PW}
        - {name: tmp, mountPath: /tmp/x}
        - {name: data, mountPath: /data}
      - {name: side, image: b, readinessProbe: {exec: {command: ["true"]}, timeoutSeconds: 2}}
---
apiVersion: v1
kind: Service
metadata: {name: web-svc}
spec: {selector: {app: web}, clusterIP: None, ports: [{port: 80, targetPort: http}]}
"""
DOCS = list(yaml.safe_load_all(MANIFEST))


def _paths(node: object, prefix: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


PATHS = [(i, p) for i, doc in enumerate(DOCS) for p in _paths(doc)]


def test_the_manifest_loads_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    project = load_manifests([path])
    assert project.workloads["web"].containers[0].service.command == ("run", "--x=s3cret")
    assert len(PATHS) > 100


@pytest.mark.parametrize("bad", [None, 5, [], {"x": 1}], ids=["null", "int", "list", "mapping"])
def test_a_field_of_the_wrong_type_is_a_config_error(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "m.yaml"
    crashes = []
    for index, where in PATHS:
        docs = copy.deepcopy(DOCS)
        node = docs[index]
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = bad
        path.write_text(yaml.safe_dump_all(docs))
        try:
            load_manifests([path])
        except ConfigError:
            pass
        except Exception as exc:  # every other exception is the finding
            crashes.append(f"document {index + 1} {'.'.join(map(str, where))} = {bad!r}: {exc!r}")
    assert not crashes, "\n".join(crashes)
