"""Registry credentials from real auth files and a real credential helper; WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from pytest_envbox.images.auth import (
    Challenge,
    Credentials,
    CredentialsError,
    auth_files,
    find_credentials,
    parse_challenges,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose HOME and config dirs are empty temp dirs, PATH with a bin dir."""
    (tmp_path / "home").mkdir()
    (tmp_path / "bin").mkdir()
    return {"HOME": str(tmp_path / "home"), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}


HELPER = """#!/bin/sh
# A docker-credential helper speaking the real protocol: 'get', the server on stdin.
read -r server
printf '%s\\n' "$server" >> "{log}"
[ "$1" = get ] || exit 2
case "$server" in
  https://index.docker.io/v1/) echo '{{"ServerURL":"x","Username":"hubuser","Secret":"hubpass"}}' ;;
  tok.example.com) echo '{{"ServerURL":"x","Username":"<token>","Secret":"refresh-123"}}' ;;
  broken.example.com) echo 'not json' ;;
  fail.example.com) echo 'keychain is locked' >&2; exit 1 ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
"""


def install_helper(env: dict[str, str], name: str) -> Path:
    log = Path(env["HOME"]).parent / f"{name}.log"
    script = Path(env["PATH"].split(":")[0]) / f"docker-credential-{name}"
    script.write_text(HELPER.format(log=log))
    script.chmod(0o755)
    return log


def test_no_files_means_anonymous(env: dict[str, str]) -> None:
    assert find_credentials("ghcr.io", env=env) is None


def test_auth_entry_base64_and_username_password_and_identity_token(env: dict[str, str]) -> None:
    write(Path(env["HOME"]) / ".docker/config.json", {"auths": {
        "ghcr.io": {"auth": b64("alice:s3:cret")},
        "https://quay.io/v1/": {"username": "bob", "password": "pw"},
        "reg.example.com:5000": {"identitytoken": "idtok"},
        "empty.example.com": {},
    }})
    creds = find_credentials("ghcr.io", "org/app", env=env)
    assert creds is not None and (creds.username, creds.password) == ("alice", "s3:cret")
    assert "s3:cret" not in repr(creds)
    quay = find_credentials("quay.io", env=env)
    assert quay is not None and (quay.username, quay.password) == ("bob", "pw")
    tok = find_credentials("reg.example.com:5000", env=env)
    assert tok is not None and tok.identity_token == "idtok"
    assert find_credentials("empty.example.com", env=env) is None
    assert find_credentials("reg.example.com", env=env) is None  # the port is part of the name


def test_docker_hub_key_matches_docker_io(env: dict[str, str]) -> None:
    write(Path(env["HOME"]) / ".docker/config.json",
          {"auths": {"https://index.docker.io/v1/": {"auth": b64("hub:pw")}}})
    creds = find_credentials("docker.io", "library/redis", env=env)
    assert creds is not None and creds.username == "hub"


def test_a_repository_key_is_more_specific_than_its_registry(env: dict[str, str]) -> None:
    write(Path(env["HOME"]) / ".config/containers/auth.json", {"auths": {
        "quay.io": {"auth": b64("general:a")},
        "quay.io/team/app": {"auth": b64("special:b")},
    }})
    special = find_credentials("quay.io", "team/app", env=env)
    general = find_credentials("quay.io", "team/other", env=env)
    assert special is not None and special.username == "special"
    assert general is not None and general.username == "general"


def test_files_are_read_in_order_first_with_an_entry_wins(env: dict[str, str], tmp_path: Path) -> None:
    home = Path(env["HOME"])
    env |= {"REGISTRY_AUTH_FILE": str(tmp_path / "authfile.json"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
            "DOCKER_CONFIG": str(tmp_path / "dockercfg")}
    files = auth_files(env)
    assert files == [tmp_path / "authfile.json", home / ".config/containers/auth.json",
                     tmp_path / "dockercfg/config.json"]
    for i, path in enumerate(files):
        write(path, {"auths": {"r.io": {"auth": b64(f"user{i}:p")}, f"only{i}.io": {"auth": b64(f"u{i}:p")}}})
    write(home / ".docker/config.json", {"auths": {"home.io": {"auth": b64("home:p")}}})
    write(tmp_path / "run/containers/auth.json", {"auths": {"run.io": {"auth": b64("run:p")}}})
    for i in range(3):
        creds = find_credentials(f"only{i}.io", env=env)
        assert creds is not None and creds.username == f"u{i}" and creds.source.startswith(str(files[i]))
    first = find_credentials("r.io", env=env)
    assert first is not None and first.username == "user0"
    # REGISTRY_AUTH_FILE replaces podman login's file, as Podman's --authfile does
    assert find_credentials("run.io", env=env) is None
    del env["REGISTRY_AUTH_FILE"]
    assert auth_files(env)[0] == tmp_path / "run/containers/auth.json"
    run = find_credentials("run.io", env=env)
    assert run is not None and run.username == "run"
    # DOCKER_CONFIG replaces ~/.docker, as in Docker
    assert find_credentials("home.io", env=env) is None
    del env["DOCKER_CONFIG"]
    home_creds = find_credentials("home.io", env=env)
    assert home_creds is not None and home_creds.username == "home"


def test_cred_helpers_per_registry_then_creds_store(env: dict[str, str]) -> None:
    log = install_helper(env, "testhelper")
    write(Path(env["HOME"]) / ".docker/config.json", {
        "auths": {"ghcr.io": {"auth": b64("fromfile:p")}, "plain.io": {"auth": b64("plain:p")}},
        "credHelpers": {"tok.example.com": "testhelper", "ghcr.io": "testhelper"},
        "credsStore": "testhelper",
    })
    tok = find_credentials("tok.example.com", env=env)
    assert tok == Credentials(identity_token="refresh-123", source="docker-credential-testhelper")
    hub = find_credentials("docker.io", env=env)  # through credsStore, asked with Hub's key
    assert hub is not None and (hub.username, hub.password) == ("hubuser", "hubpass")
    # credHelpers beats auths for its registry; the helper has nothing: anonymous
    assert find_credentials("ghcr.io", env=env) is None
    plain = find_credentials("plain.io", env=env)
    assert plain is not None and plain.username == "plain"
    assert log.read_text().split() == ["tok.example.com", "https://index.docker.io/v1/", "ghcr.io"]


def test_helper_failures_name_the_helper(env: dict[str, str]) -> None:
    install_helper(env, "testhelper")
    write(Path(env["HOME"]) / ".docker/config.json", {"credHelpers": {
        "broken.example.com": "testhelper", "fail.example.com": "testhelper", "gone.example.com": "absent"}})
    with pytest.raises(CredentialsError, match="docker-credential-testhelper answered no JSON"):
        find_credentials("broken.example.com", env=env)
    with pytest.raises(CredentialsError, match=r"docker-credential-testhelper failed .*keychain is locked"):
        find_credentials("fail.example.com", env=env)
    with pytest.raises(CredentialsError, match="docker-credential-absent is configured but not on PATH"):
        find_credentials("gone.example.com", env=env)


def test_broken_files_name_the_file(env: dict[str, str]) -> None:
    path = write(Path(env["HOME"]) / ".docker/config.json", "{not json")
    with pytest.raises(CredentialsError, match=f"auth file {path} is not valid JSON"):
        find_credentials("x.io", env=env)
    write(path, {"auths": {"x.io": {"auth": "%%%"}}})
    with pytest.raises(CredentialsError, match="'auth' is not base64"):
        find_credentials("x.io", env=env)
    write(path, {"auths": {"x.io": {"auth": b64("nocolon")}}})
    with pytest.raises(CredentialsError, match="no 'user:password'"):
        find_credentials("x.io", env=env)
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(CredentialsError, match="cannot read auth file"):
            find_credentials("x.io", env=env)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:library/redis:pull"',
         [Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                               "scope": "repository:library/redis:pull"})]),
        ('Bearer realm="https://ghcr.io/token", service="ghcr.io", scope="repository:a/b:pull,push"',
         [Challenge("bearer", {"realm": "https://ghcr.io/token", "service": "ghcr.io",
                               "scope": "repository:a/b:pull,push"})]),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ('Negotiate, BASIC Realm="a, b", Bearer realm=tok,error="insufficient_scope"',
         [Challenge("negotiate", {}), Challenge("basic", {"realm": "a, b"}),
          Challenge("bearer", {"realm": "tok", "error": "insufficient_scope"})]),
        ('Basic realm="quote \\" inside"', [Challenge("basic", {"realm": 'quote " inside'})]),
        ("Basic dXNlcjpwYXNz, Bearer realm=x", [Challenge("basic", {}), Challenge("bearer", {"realm": "x"})]),
        ("", []),
    ],
)
def test_www_authenticate_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected
