"""Manifests load_manifests refuses: each a ConfigError naming the file, the document (Kind/name),
the field path, and what to do instead."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_envbox.compose.yamlfile import YamlError
from pytest_envbox.errors import ConfigError
from pytest_envbox.kubernetes import KubeError, load_manifests


def refused(tmp_path: Path, *docs: str) -> KubeError:
    files = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"m{i}.yaml"
        path.write_text(textwrap.dedent(doc))
        files.append(path)
    with pytest.raises(KubeError) as info:
        load_manifests(files)
    assert isinstance(info.value, ConfigError)
    assert str(info.value.file) in str(info.value)
    return info.value


def pod(spec: str, name: str = "app") -> str:
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\n"
            f"spec: {spec}\n")  # fmt: skip


def one(container: str, volumes: str = "[]") -> str:
    return pod(f"{{volumes: {volumes}, containers: [{container}]}}")


CM = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {LEVEL: debug}\n"
SVC = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: SELECTOR, ports: [PORT]}\n"

CASES = {
    "service selecting no pod": (
        [one("{name: c, image: a}"), SVC.replace("SELECTOR", "{app: other}").replace("PORT", "{port: 80}")],
        "Service/web", "spec.selector", "selects no pod"),
    "service without selector": (
        [one("{name: c, image: a}"), "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n"],  # noqa: E501
        "Service/web", "spec.selector", "select a workload's pod labels"),
    "targetPort name nobody declares": (
        [one("{name: c, image: a, ports: [{containerPort: 80, name: web}]}"),
         SVC.replace("SELECTOR", "{app: app}").replace("PORT", "{port: 80, targetPort: http}")],
        "Service/web", "spec.ports[0].targetPort", "'http' is no port name"),
    "service port over UDP": (
        [one("{name: c, image: a}"), SVC.replace("SELECTOR", "{app: app}").replace("PORT", "{port: 53, protocol: UDP}")],  # noqa: E501
        "Service/web", "spec.ports[0].protocol", "'UDP' is not supported"),
    "ExternalName service": (
        [one("{name: c, image: a}"), "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
                                     "spec: {type: ExternalName, externalName: example.com}\n"],
        "Service/web", "spec.externalName", "declare a workload"),
    "missing ConfigMap": (
        [one("{name: c, image: a, envFrom: [{configMapRef: {name: nowhere}}]}")],
        "Pod/app", "spec.containers[0].envFrom[0].configMapRef", "ConfigMap 'nowhere' is not in the manifests"),  # noqa: E501
    "missing Secret": (
        [one("{name: c, image: a, env: [{name: X, valueFrom: {secretKeyRef: {name: creds, key: pw}}}]}")],
        "Pod/app", "spec.containers[0].env[0].valueFrom.secretKeyRef", "optional: true"),
    "missing ConfigMap key": (
        [one("{name: c, image: a, env: [{name: X, valueFrom: {configMapKeyRef: {name: settings, key: NOPE}}}]}"), CM],  # noqa: E501
        "Pod/app", "spec.containers[0].env[0].valueFrom.configMapKeyRef.key", "has no key 'NOPE' (it has LEVEL)"),  # noqa: E501
    "missing volume item key": (
        [one("{name: c, image: a, volumeMounts: [{name: v, mountPath: /etc/x}]}",
             "[{name: v, configMap: {name: settings, items: [{key: NOPE, path: x}]}}]"), CM],
        "Pod/app", "spec.volumes[0].configMap.items[0].key", "has no key 'NOPE'"),
    "missing volume ConfigMap": (
        [one("{name: c, image: a, volumeMounts: [{name: v, mountPath: /etc/x}]}", "[{name: v, configMap: {name: gone}}]")],  # noqa: E501
        "Pod/app", "spec.volumes[0].configMap", "ConfigMap 'gone' is not in the manifests"),
    "hostNetwork": (
        [pod("{hostNetwork: true, containers: [{name: c, image: a}]}")],
        "Pod/app", "spec.hostNetwork", "own namespaces"),
    "hostPID": (
        [pod("{hostPID: true, containers: [{name: c, image: a}]}")],
        "Pod/app", "spec.hostPID", "remove it"),
    "privileged": (
        [one("{name: c, image: a, securityContext: {privileged: true}}")],
        "Pod/app", "spec.containers[0].securityContext.privileged", "remove privileged: true"),
    "capabilities.add": (
        [one("{name: c, image: a, securityContext: {capabilities: {add: [NET_ADMIN]}}}")],
        "Pod/app", "spec.containers[0].securityContext.capabilities.add", "no capabilities"),
    "duplicate container name": (
        [pod("{initContainers: [{name: c, image: a}], containers: [{name: c, image: b}]}")],
        "Pod/app", "spec.containers[0].name", "used twice (also at spec.initContainers[0])"),
    "grpc probe field": (
        [one("{name: c, image: a, readinessProbe: {grpc: {port: 9555, tls: true}}}")],
        "Pod/app", "spec.containers[0].readinessProbe.grpc.tls", "unknown field"),
    "https probe": (
        [one("{name: c, image: a, readinessProbe: {httpGet: {port: 443, scheme: HTTPS}}}")],
        "Pod/app", "spec.containers[0].readinessProbe.httpGet.scheme", "plain HTTP"),
    "probe port name unknown": (
        [one("{name: c, image: a, ports: [{containerPort: 80, name: web}], readinessProbe: {tcpSocket: {port: http}}}")],  # noqa: E501
        "Pod/app", "spec.containers[0].readinessProbe.tcpSocket.port", "'http' is not a name of the container's ports (web)"),  # noqa: E501
    "two probe kinds": (
        [one("{name: c, image: a, readinessProbe: {tcpSocket: {port: 1}, exec: {command: [x]}}}")],
        "Pod/app", "spec.containers[0].readinessProbe", "exactly one of"),
    "hostPath": (
        [one("{name: c, image: a, volumeMounts: [{name: v, mountPath: /data}]}", "[{name: v, hostPath: {path: /srv}}]")],  # noqa: E501
        "Pod/app", "spec.volumes[0].hostPath", "put the files in a ConfigMap"),
    "projected volume": (
        [one("{name: c, image: a}", "[{name: v, projected: {sources: []}}]")],
        "Pod/app", "spec.volumes[0].projected", "use configMap, secret or emptyDir"),
    "configMap volume without its mapping": (
        [one("{name: c, image: a, volumeMounts: [{name: v, mountPath: /etc/x}]}", "[{name: v, configMap: }]")],  # noqa: E501
        "Pod/app", "spec.volumes[0].configMap", "None (a NoneType) is not a mapping"),
    "mount of an undeclared volume": (
        [one("{name: c, image: a, volumeMounts: [{name: v, mountPath: /data}]}")],
        "Pod/app", "spec.containers[0].volumeMounts[0].name", "no volume 'v' in the pod"),
    "container port over UDP": (
        [one("{name: c, image: a, ports: [{containerPort: 53, protocol: UDP}]}")],
        "Pod/app", "spec.containers[0].ports[0].protocol", "'UDP' is not supported"),
    "GPU resource": (
        [one("{name: c, image: a, resources: {limits: {nvidia.com/gpu: 1}}}")],
        "Pod/app", "spec.containers[0].resources.limits.nvidia.com/gpu", "no host devices"),
    "bad memory quantity": (
        [one("{name: c, image: a, resources: {limits: {memory: lots}}}")],
        "Pod/app", "spec.containers[0].resources.limits.memory", "'lots'"),
    "unknown fieldPath": (
        [one("{name: c, image: a, env: [{name: N, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]}")],
        "Pod/app", "spec.containers[0].env[0].valueFrom.fieldRef.fieldPath", "status.podIP"),
    "resourceFieldRef": (
        [one("{name: c, image: a, env: [{name: N, valueFrom: {resourceFieldRef: {resource: limits.cpu}}}]}")],
        "Pod/app", "spec.containers[0].env[0].valueFrom", "write the value"),
    "typo in a container key": (
        [one("{name: c, image: a, imagePulPolicy: Always}")],
        "Pod/app", "spec.containers[0].imagePulPolicy", "did you mean 'imagePullPolicy'?"),
    "typo in a pod key": (
        [pod("{containers: [{name: c, image: a}], nodeSelecter: {}}")],
        "Pod/app", "spec.nodeSelecter", "did you mean 'nodeSelector'?"),
    "container without image": (
        [one("{name: c}")],
        "Pod/app", "spec.containers[0].image", "not a non-empty string"),
    "env value not a string": (
        [one("{name: c, image: a, env: [{name: PORT, value: 80}]}")],
        "Pod/app", "spec.containers[0].env[0].value", 'quote it: value: "80"'),
    "secret data not base64": (
        [one("{name: c, image: a}"), "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {pw: 'not base64!'}\n"],  # noqa: E501
        "Secret/s", "data.pw", "is not base64"),
    "selector not matching the template": (
        ["apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: x}}\n"  # noqa: E501
         "  template: {metadata: {labels: {app: web}}, spec: {containers: [{name: c, image: a}]}}\n"],
        "Deployment/web", "spec.selector.matchLabels", "make them match"),
    "invalid envbox service name": (
        [pod("{containers: [{name: c, image: a}, {name: Sidecar_1, image: b}]}")],
        "Pod/app", "spec.containers[1].name", "'app-Sidecar_1', which is not a DNS label"),
    "envbox service name too long": (
        [pod("{containers: [{name: c, image: a}]}", name="a" * 60),
         "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: " + "b" * 62 + "}\nspec:\n"
         "  selector: {matchLabels: {a: b}}\n  template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: a}]}}\n"],  # noqa: E501
        "StatefulSet/" + "b" * 62, "spec.template.spec.containers[0].name", "shorten or rename"),
    "two workloads making one envbox name": (
        [pod("{containers: [{name: b, image: a}, {name: c, image: a}]}", name="a"),
         pod("{containers: [{name: c, image: a}]}", name="a-b")],
        "Pod/a-b", "metadata.name", "'a-b', which Pod/a makes too"),
    "unknown top-level field": (
        [pod("{containers: [{name: c, image: a}]}") + "spec2: {}\n"], "Pod/app", "spec2", "unknown field 'spec2'"),  # noqa: E501
    "emptyDir size": (
        [one("{name: c, image: a, volumeMounts: [{name: v, mountPath: /v}]}", "[{name: v, emptyDir: {sizeLimit: huge}}]")],  # noqa: E501
        "Pod/app", "spec.volumes[0].emptyDir.sizeLimit", "'huge'"),
    "an object declared twice": (
        [CM, CM], "ConfigMap/settings", "metadata.name", "declared twice"),
    "an object without a name": (
        ["apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n"], "ConfigMap (document 1)", "metadata.name", "has no name"),  # noqa: E501
    "a document that is no object": (
        ["- just\n- a list\n"], "document 1", None, "is not a Kubernetes object"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_refused(tmp_path: Path, case: str) -> None:
    docs, document, path, fragment = CASES[case]
    err = refused(tmp_path, *docs)
    assert (err.document, err.path, err.key) == (document, path, path)
    assert fragment in str(err)
    assert err.file.parent == tmp_path


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(CM + "---\napiVersion: v1\nkind: Pod: x\nmetadata: {name: p}\n")
    with pytest.raises(ConfigError, match=r"app\.yaml, line 7, column 10: not valid YAML: .*fix its syntax"):
        load_manifests([path])


@pytest.mark.parametrize("tag", [
    '!!python/object/apply:os.system ["touch PWNED"]',
    "!!python/name:os.system",
    '!!python/object:pathlib.Path {}',
    "!custom x",
])  # fmt: skip
def test_an_unsafe_tag_is_refused_not_executed(tmp_path: Path, tag: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # where os.system("touch PWNED") would leave its file
    path = tmp_path / "app.yaml"
    path.write_text(CM + f"---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {tag}\n")
    with pytest.raises(YamlError) as info:
        load_manifests([path])
    # Named by file, line and column, as for malformed YAML; the safe loader built nothing, so
    # the command was never run.
    assert (info.value.file, info.value.line, info.value.column) == (path, 9, 9)
    assert "app.yaml, line 9, column 9: a tag envbox does not read: " in str(info.value)
    assert isinstance(info.value, ConfigError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.yaml"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read Kubernetes manifest .*missing\.yaml"):
        load_manifests([tmp_path / "missing.yaml"])


def test_no_file() -> None:
    with pytest.raises(ConfigError, match="no manifest given"):
        load_manifests([])


def test_optional_references_are_no_error(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(one("{name: c, image: a, volumeMounts: [{name: v, mountPath: /etc/x}], "
                        "env: [{name: X, valueFrom: {configMapKeyRef: {name: s, key: k, optional: true}}}]}",
                        "[{name: v, secret: {secretName: gone, optional: true}}]"))  # fmt: skip
    (c,) = load_manifests([path]).workloads["app"].containers
    assert c.service.env == {} and c.files[0].files == ()
    volumes = ("[{name: v, configMap: {name: settings, optional: true, "
               "items: [{key: NOPE, path: x}, {key: LEVEL, path: level}]}}]")  # fmt: skip
    mounts = "{name: c, image: a, volumeMounts: [{name: v, mountPath: /etc/x}]}"
    path.write_text(one(mounts, volumes) + "---\n" + CM)
    (c,) = load_manifests([path]).workloads["app"].containers
    assert [f.path for f in c.files[0].files] == ["level"]
