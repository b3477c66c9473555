"""The registry client against real ``docker-registry`` servers (distribution 2.8) on 127.0.0.1.

Open, htpasswd and bearer-token registries (tests/imagekit/registry.py), images built with umoci
and pushed with skopeo; a small loopback HTTP proxy in front of a real registry cuts, stalls,
redirects, fails or tampers with answers for the failure cases.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pytest_envbox.errors import ImageError
from pytest_envbox.images.reference import parse_reference
from pytest_envbox.images.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    host_platform,
)
from tests.imagekit.registry import (
    PASSWORD,
    REFRESH_TOKEN,
    SERVICE,
    USER,
    Proxy,
    RegistryServer,
    basic_registry,
    free_port,
    make_layout,
    need_registry_tools,
    open_registry,
    push_layout,
    token_registry,
)

__all__ = ["basic_registry", "open_registry", "token_registry"]  # fixtures, imported to be found


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_registry_tools()
    root = tmp_path_factory.mktemp("layouts") / "layout"
    make_layout(root, "1", {"hello.txt": b"hello\n", "big.bin": random.Random(17).randbytes(600_000)})
    make_layout(root, "2", {"other.txt": b"another image\n"})
    return root


def layout_manifest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    return next(m["digest"] for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)


@pytest.fixture(scope="session")
def pushed(layout: Path, open_registry: RegistryServer, basic_registry: RegistryServer,
           token_registry: RegistryServer) -> dict[str, str]:
    """Pushes the test images; returns the manifest digests of tags 1 and 2 and both indexes."""
    push_layout(layout, "1", open_registry, "test/hello:1")
    push_layout(layout, "1", open_registry, "test/multi:a")
    push_layout(layout, "2", open_registry, "test/multi:b")
    push_layout(layout, "1", basic_registry, "test/hello:1")
    push_layout(layout, "1", open_registry, "test/docker:1", fmt="v2s2")
    push_layout(layout, "1", token_registry, "private/hello:1")
    push_layout(layout, "1", token_registry, "public/hello:1")
    digests = {"1": layout_manifest(layout, "1"), "2": layout_manifest(layout, "2")}
    host_os, host_arch, *variant = host_platform().split("/")
    other = "s390x" if host_arch != "s390x" else "riscv64"

    def entry(tag: str, os_: str, arch: str, variant: str = "") -> dict[str, Any]:
        blob = layout / "blobs" / "sha256" / digests[tag].split(":")[1]
        plat = {"os": os_, "architecture": arch} | ({"variant": variant} if variant else {})
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digests[tag],
                "size": blob.stat().st_size, "platform": plat}

    attestation = entry("2", "unknown", "unknown") | {
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}
    for name, entries in {
        "both": [entry("2", "linux", other), entry("1", host_os, host_arch, *variant)],
        "foreign": [entry("1", "linux", other), entry("2", "linux", "arm", "v7"), attestation],
        "arm": [entry("1", "linux", "arm64"), entry("2", "linux", "arm", "v7")],
    }.items():
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        put = requests.put(f"{open_registry.url}/v2/test/multi/manifests/{name}", data=body,
                           headers={"Content-Type": OCI_INDEX}, timeout=10)
        assert put.status_code == 201, put.text
        digests[name] = "sha256:" + hashlib.sha256(body).hexdigest()
    # a Docker manifest list over the schema 2 manifest, as `docker manifest push` makes
    v2s2 = requests.get(f"{open_registry.url}/v2/test/docker/manifests/1", timeout=10,
                        headers={"Accept": DOCKER_MANIFEST})
    assert v2s2.headers["Content-Type"] == DOCKER_MANIFEST
    digests["v2s2"] = "sha256:" + hashlib.sha256(v2s2.content).hexdigest()
    plat = {"os": host_os, "architecture": host_arch} | ({"variant": variant[0]} if variant else {})
    entries = [{"mediaType": DOCKER_MANIFEST, "digest": digests["v2s2"], "size": len(v2s2.content),
                "platform": plat}]
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": entries})
    put = requests.put(f"{open_registry.url}/v2/test/docker/manifests/list", data=body.encode(),
                       headers={"Content-Type": DOCKER_MANIFEST_LIST}, timeout=10)
    assert put.status_code == 201, put.text
    return digests


@pytest.fixture
def auth_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points every auth-file location at an empty temp dir; returns the REGISTRY_AUTH_FILE path."""
    for name in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    return tmp_path / "auth.json"


def login(auth_file: Path, host: str, user: str = USER, password: str = PASSWORD) -> None:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    auth_file.write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def pull(registry: Registry, text: str, **kw: Any) -> tuple[str, list[bytes], list[int]]:
    """Manifest and every blob of ``text``; returns the digest, the blobs and the progress calls."""
    ref = parse_reference(text)
    manifest = registry.manifest(ref, **kw)
    blobs, seen = [], []
    for desc in (manifest.config, *manifest.layers):
        out = io.BytesIO()
        registry.blob(ref, desc, out, seen.append)
        data = out.getvalue()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc.digest
        assert len(data) == desc.size and seen[-1] == desc.size
        blobs.append(data)
    assert "sha256:" + hashlib.sha256(manifest.raw).hexdigest() == manifest.digest
    return manifest.digest, blobs, seen


def test_anonymous_pull_by_tag_and_by_digest(open_registry: RegistryServer, pushed: dict[str, str],
                                             auth_env: Path) -> None:
    with Registry() as reg:
        digest, blobs, seen = pull(reg, f"{open_registry.host}/test/hello:1")
        assert digest == pushed["1"]
        assert len(blobs) == 2 and len(seen) > 2  # the ~600 KB layer came in several chunks
        assert pull(reg, f"{open_registry.host}/test/hello@{digest}")[0] == digest
        assert pull(reg, f"{open_registry.host}/test/hello:whatever@{digest}")[0] == digest


def test_docker_schema_2_manifests_and_manifest_lists(open_registry: RegistryServer, pushed: dict[str, str],
                                                      auth_env: Path) -> None:
    with Registry() as reg:
        for tag in ("1", "list"):
            manifest = reg.manifest(parse_reference(f"{open_registry.host}/test/docker:{tag}"))
            assert (manifest.digest, manifest.media_type) == (pushed["v2s2"], DOCKER_MANIFEST)
            assert manifest.config.media_type == "application/vnd.docker.container.image.v1+json"
            assert [d.media_type for d in manifest.layers] == [
                "application/vnd.docker.image.rootfs.diff.tar.gzip"]
        oci = reg.manifest(parse_reference(f"{open_registry.host}/test/hello:1"))
        assert oci.media_type == OCI_MANIFEST and oci.layers[0].media_type.startswith("application/vnd.oci.")
        assert pull(reg, f"{open_registry.host}/test/docker:list")[0] == pushed["v2s2"]


def test_basic_auth_with_credentials_from_the_auth_file(basic_registry: RegistryServer,
                                                        pushed: dict[str, str], auth_env: Path) -> None:
    text = f"{basic_registry.host}/test/hello:1"
    with Registry() as reg, pytest.raises(ImageError, match="requires a login and no credentials were found"):
        reg.manifest(parse_reference(text))
    login(auth_env, basic_registry.host, password="wrong")
    with Registry() as reg, pytest.raises(ImageError) as info:
        reg.manifest(parse_reference(text))
    said = str(info.value)
    assert said.startswith(f"image '{text}': registry {basic_registry.host} refused the credentials")
    assert "HTTP 401 UNAUTHORIZED: authentication required" in str(info.value)
    login(auth_env, basic_registry.host)
    with Registry() as reg:
        assert pull(reg, text)[0] == pushed["1"]


def test_bearer_token_flow_asks_for_the_pull_scope_once(token_registry: RegistryServer,
                                                        pushed: dict[str, str], auth_env: Path) -> None:
    assert token_registry.token is not None
    asked = token_registry.token.asked
    login(auth_env, token_registry.host)
    before = len(asked)
    with Registry() as reg:
        assert pull(reg, f"{token_registry.host}/private/hello:1")[0] == pushed["1"]
    # one token for the manifest and both blobs: cached per registry and scope
    assert asked[before:] == [(USER, SERVICE, "repository:private/hello:pull")]


def test_bearer_anonymous_token_for_a_public_repository(token_registry: RegistryServer,
                                                        pushed: dict[str, str], auth_env: Path) -> None:
    assert token_registry.token is not None
    asked = token_registry.token.asked
    before = len(asked)
    with Registry() as reg:
        assert pull(reg, f"{token_registry.host}/public/hello:1")[0] == pushed["1"]
        with pytest.raises(ImageError, match=r"refused access \(HTTP 401 UNAUTHORIZED: authentication "
                           r"required\); no credentials were found for it"):
            reg.manifest(parse_reference(f"{token_registry.host}/private/hello:1"))
    assert asked[before:] == [("", SERVICE, "repository:public/hello:pull"),
                              ("", SERVICE, "repository:private/hello:pull")]


def test_bearer_identity_token_is_exchanged_by_the_oauth2_post(
        token_registry: RegistryServer, pushed: dict[str, str], auth_env: Path) -> None:
    assert token_registry.token is not None
    auth_env.write_text(json.dumps({"auths": {token_registry.host: {"identitytoken": REFRESH_TOKEN}}}))
    posted = len(token_registry.token.posted)
    with Registry() as reg:
        assert pull(reg, f"{token_registry.host}/private/hello:1")[0] == pushed["1"]
    assert token_registry.token.posted[posted:] == [(USER, SERVICE, "repository:private/hello:pull")]
    auth_env.write_text(json.dumps({"auths": {token_registry.host: {"identitytoken": "stale"}}}))
    with Registry() as reg, pytest.raises(ImageError, match="HTTP 401 UNAUTHORIZED: invalid refresh token"):
        reg.manifest(parse_reference(f"{token_registry.host}/private/hello:1"))


def test_bearer_wrong_password_quotes_the_token_service(token_registry: RegistryServer,
                                                        pushed: dict[str, str], auth_env: Path) -> None:
    assert token_registry.token is not None
    login(auth_env, token_registry.host, password="nope")
    refused = token_registry.token.refused
    with Registry() as reg, pytest.raises(ImageError) as info:
        reg.manifest(parse_reference(f"{token_registry.host}/private/hello:1"))
    assert f"its token service {token_registry.token.url}/token refused the credentials" in str(info.value)
    assert "HTTP 401 UNAUTHORIZED: wrong user or password" in str(info.value)
    assert token_registry.token.refused == refused + 1


@pytest.mark.parametrize(("what", "code"), [
    ("test/hello:nope", "MANIFEST_UNKNOWN"),
    ("test/nothere:1", "MANIFEST_UNKNOWN"),  # distribution 2.8 says NAME_UNKNOWN only for tag lists
    ("test/hello@sha256:" + "0" * 64, "MANIFEST_UNKNOWN"),
])
def test_unknown_tag_repository_or_digest_names_the_reference_and_the_registrys_answer(
        open_registry: RegistryServer, pushed: dict[str, str], auth_env: Path, what: str, code: str) -> None:
    text = f"{open_registry.host}/{what}"
    with Registry() as reg, pytest.raises(ImageError) as info:
        reg.manifest(parse_reference(text))
    assert str(info.value).startswith(f"image '{text}': registry {open_registry.host} has no such image")
    assert f"HTTP 404 {code}: " in str(info.value)


def test_index_picks_the_platform_or_lists_the_ones_there_are(open_registry: RegistryServer,
                                                              pushed: dict[str, str], auth_env: Path) -> None:
    with Registry() as reg:
        chosen = reg.manifest(parse_reference(f"{open_registry.host}/test/multi:both"))
        assert chosen.digest == pushed["1"]
        other = "linux/s390x" if host_platform() != "linux/s390x" else "linux/riscv64"
        assert reg.manifest(parse_reference(f"{open_registry.host}/test/multi:both"),
                            platform=other).digest == pushed["2"]
        by_digest = reg.manifest(parse_reference(f"{open_registry.host}/test/multi@{pushed['both']}"))
        assert by_digest.digest == pushed["1"]
        with pytest.raises(ImageError) as info:
            reg.manifest(parse_reference(f"{open_registry.host}/test/multi:foreign"))
    assert f"no manifest for platform {host_platform()}; it has: linux/arm/v7, {other}" in str(info.value)
    assert "unknown" not in str(info.value)


@pytest.mark.parametrize(("platform", "tag"), [
    ("linux/arm64/v8", "1"), ("linux/arm64", "1"), ("linux/arm/v7", "2"), ("linux/arm", "2"),
    ("linux/arm/v6", None), ("windows/arm64", None), ("linux", "invalid"),
])
def test_platform_variants(open_registry: RegistryServer, pushed: dict[str, str], auth_env: Path,
                           platform: str, tag: str | None) -> None:
    ref = parse_reference(f"{open_registry.host}/test/multi:arm")
    with Registry() as reg:
        if tag is None:
            with pytest.raises(ImageError, match=f"no manifest for platform {platform}; "
                               "it has: linux/arm/v7, linux/arm64$"):
                reg.manifest(ref, platform=platform)
        elif tag == "invalid":
            with pytest.raises(ImageError, match=r"invalid platform 'linux' \(expected os/arch\[/variant\]"):
                reg.manifest(ref, platform=platform)
        else:
            assert reg.manifest(ref, platform=platform).digest == pushed[tag]


@pytest.fixture
def proxy(open_registry: RegistryServer) -> Iterator[Proxy]:
    p = Proxy(open_registry.url)
    yield p
    p.close()


def big_layer(reg: Registry, host: str) -> tuple[Any, Any]:
    ref = parse_reference(f"{host}/test/hello:1")
    manifest = reg.manifest(ref)
    return ref, max(manifest.layers, key=lambda d: d.size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["cut", "stall"])
def test_a_blob_cut_short_or_stalled_midway_is_an_image_error(proxy: Proxy, pushed: dict[str, str],
                                                              auth_env: Path, mode: str) -> None:
    proxy.mode = mode
    with Registry(timeout=0.5, retries=0) as reg:
        ref, desc = big_layer(reg, proxy.host)
        out = io.BytesIO()
        with pytest.raises(ImageError) as info:
            reg.blob(ref, desc, out)
    written = len(out.getvalue())
    assert 0 < written <= desc.size // 2
    assert f"blob {desc.digest}: the download from {proxy.host} broke off after {written} of {desc.size} " \
        "bytes (" in str(info.value)
    if mode == "stall":
        assert "(no data for 0.5s)" in str(info.value)


def test_a_blob_shorter_than_its_descriptor_is_truncated(proxy: Proxy, pushed: dict[str, str],
                                                         auth_env: Path) -> None:
    proxy.mode = "short"
    with Registry() as reg:
        ref, desc = big_layer(reg, proxy.host)
        with pytest.raises(ImageError) as info:
            reg.blob(ref, desc, io.BytesIO())
    assert f"blob {desc.digest} is truncated: {desc.size - 1} bytes received, {desc.size - 1} announced, " \
        f"{desc.size} in the manifest" in str(info.value)


def test_redirected_blobs_do_not_carry_the_registry_credentials(
        basic_registry: RegistryServer, pushed: dict[str, str], auth_env: Path) -> None:
    upstream_auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    front = Proxy(basic_registry.url, "redirect")
    storage = Proxy(basic_registry.url, auth=upstream_auth)
    front.storage = storage
    try:
        login(auth_env, front.host)
        with Registry() as reg:
            digest, _, _ = pull(reg, f"{front.host}/test/hello:1")
        assert digest == pushed["1"]
    finally:
        front.close()
        storage.close()
    blob_paths = [p for p, _ in storage.seen]
    assert len(blob_paths) == 2 and all("/blobs/" in p for p in blob_paths)
    assert all("Authorization" not in h for _, h in storage.seen), storage.seen
    front_blobs = [h for p, h in front.seen if "/blobs/" in p]
    assert front_blobs and all(h.get("Authorization") == upstream_auth for h in front_blobs)


def test_a_refusal_by_blob_storage_names_the_storage_not_the_registry(
        basic_registry: RegistryServer, pushed: dict[str, str], auth_env: Path) -> None:
    front = Proxy(basic_registry.url, "redirect")
    storage = Proxy(basic_registry.url)  # no login upstream: the registry's 401 comes back
    front.storage = storage
    try:
        login(auth_env, front.host)
        with Registry() as reg:
            ref, desc = big_layer(reg, front.host)
            with pytest.raises(ImageError) as info:
                reg.blob(ref, desc, io.BytesIO())
    finally:
        front.close()
        storage.close()
    assert f"{storage.host}, where {front.host} redirected, refused access (HTTP 401 UNAUTHORIZED" \
        in str(info.value)
    assert "no credentials were found" not in str(info.value)
    assert len(storage.seen) == 1  # its 401 is an answer, not a challenge to log in to


def test_transient_errors_are_retried_and_4xx_are_not(proxy: Proxy, pushed: dict[str, str],
                                                      auth_env: Path) -> None:
    proxy.mode, proxy.fail = "flaky", 2
    with Registry(retries=3) as reg:
        assert pull(reg, f"{proxy.host}/test/hello:1")[0] == pushed["1"]
        with pytest.raises(ImageError, match="MANIFEST_UNKNOWN"):
            reg.manifest(parse_reference(f"{proxy.host}/test/hello:nope"))
    assert set(proxy.counts.values()) == {3}  # each path: two 503s, then the answer (the 404 once)
    proxy.counts.clear()
    with Registry(retries=1) as reg, pytest.raises(ImageError, match="answered HTTP 503 UNAVAILABLE: try"):
        reg.manifest(parse_reference(f"{proxy.host}/test/hello:1"))
    assert proxy.counts == {"/v2/test/hello/manifests/1": 2}


def test_a_manifest_not_matching_its_digest_or_in_schema_1_is_refused(proxy: Proxy, pushed: dict[str, str],
                                                                      auth_env: Path) -> None:
    proxy.mode = "tamper"
    wrong = rf"digest is sha256:[0-9a-f]{{64}}, not {pushed['1']}"
    with Registry() as reg, pytest.raises(ImageError, match=wrong):
        reg.manifest(parse_reference(f"{proxy.host}/test/hello@{pushed['1']}"))
    with Registry() as reg, pytest.raises(ImageError, match=r"the registry says .* corrupted in transit"):
        reg.manifest(parse_reference(f"{proxy.host}/test/hello:1"))
    proxy.mode = "schema1"
    with Registry() as reg, pytest.raises(ImageError, match="schema 1 manifest, which is not supported"):
        reg.manifest(parse_reference(f"{proxy.host}/test/hello:1"))


def test_a_registry_that_is_not_there_did_not_answer(auth_env: Path) -> None:
    port = free_port()
    with Registry(retries=1) as reg, pytest.raises(ImageError) as info:
        reg.manifest(parse_reference(f"127.0.0.1:{port}/x:1"))
    assert str(info.value) == (f"image '127.0.0.1:{port}/x:1': registry 127.0.0.1:{port} did not answer "
                               "(connection refused)")


def test_plain_http_only_for_loopback_or_insecure_registries() -> None:
    reg = Registry(insecure=["registry.test:5000", "lan-host"])
    assert reg.base_url("docker.io") == "https://registry-1.docker.io"
    assert reg.base_url("ghcr.io") == "https://ghcr.io"
    assert reg.base_url("registry.test") == "https://registry.test"
    assert reg.base_url("registry.test:5001") == "https://registry.test:5001"
    assert reg.base_url("registry.test:5000") == "http://registry.test:5000"
    assert reg.base_url("lan-host:7000") == "http://lan-host:7000"
    for loopback in ("localhost:5000", "127.0.0.1:5000", "127.8.9.10", "[::1]:5000"):
        assert reg.base_url(loopback) == f"http://{loopback}"
    assert reg.base_url("localhost.example.com:5000").startswith("https://")
    reg.close()


def _hosts_name_for_loopback() -> str | None:
    """A name /etc/hosts maps to 127.0.0.1 (not 'localhost'), so using it sends no DNS query."""
    for line in Path("/etc/hosts").read_text().splitlines():
        fields = line.split("#")[0].split()
        if fields and fields[0] == "127.0.0.1":
            names = [n for n in fields[1:] if n != "localhost" and "localhost" not in n]
            if names:
                return names[0]
    return None


def test_a_non_loopback_name_is_spoken_to_over_https_without_falling_back(
        open_registry: RegistryServer, pushed: dict[str, str], auth_env: Path) -> None:
    name = _hosts_name_for_loopback()
    if name is None:
        pytest.skip("no name other than localhost maps to 127.0.0.1 in /etc/hosts (no DNS may be asked)")
    host = f"{name}:{open_registry.port}"
    with Registry(retries=0) as reg, pytest.raises(ImageError) as info:
        reg.manifest(parse_reference(f"{host}/test/hello:1"))
    assert f"registry {host} failed the TLS handshake (" in str(info.value)
    assert "HTTPS is required unless the registry is on loopback or listed in insecure_registries" \
        in str(info.value)
    with Registry(insecure=[name]) as reg:
        assert pull(reg, f"{host}/test/hello:1")[0] == pushed["1"]


@pytest.mark.parametrize(("machine", "expected"), [
    ("x86_64", "linux/amd64"), ("aarch64", "linux/arm64/v8"), ("armv7l", "linux/arm/v7"),
    ("armv6l", "linux/arm/v6"), ("i686", "linux/386"), ("ppc64le", "linux/ppc64le"), ("s390x", "linux/s390x"),
    ("riscv64", "linux/riscv64"),
])
def test_host_platform_uses_the_names_indexes_use(monkeypatch: pytest.MonkeyPatch, machine: str,
                                                  expected: str) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert host_platform() == expected
