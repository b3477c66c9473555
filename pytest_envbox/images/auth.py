"""Registry credentials from the files Docker and Podman write, and the WWW-Authenticate challenge.

Where credentials come from (the first file that has an entry for the registry wins; a later file
is read only when the earlier ones have none), as ``containers-auth.json(5)`` orders them:

1. ``$REGISTRY_AUTH_FILE`` when set (Podman's ``--authfile``: it replaces the next one), else
   ``$XDG_RUNTIME_DIR/containers/auth.json`` (where ``podman login`` writes);
2. ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/containers/auth.json``);
3. ``$DOCKER_CONFIG/config.json`` when ``DOCKER_CONFIG`` is set, else ``~/.docker/config.json``
   (Docker reads only one of the two: ``DOCKER_CONFIG`` replaces the default directory).

Podman's files come first, Docker's last, as Podman and skopeo read them. The legacy
``~/.dockercfg`` (Docker before 1.7) is not read.

Within one file: ``credHelpers[registry]`` first (Docker's per-registry override), then an
``auths`` entry that holds credentials (``auth``: base64 ``user:password``; or ``username`` and
``password``; ``identitytoken``), then ``credsStore`` (every registry in one helper). Keys of
``auths`` may be written with a scheme and a path (``https://index.docker.io/v1/``); a key naming a
repository (``quay.io/org/repo``, as Podman allows) is more specific than its registry's. Docker
Hub's credentials live under ``https://index.docker.io/v1/``; "docker.io", ``index.docker.io``
and ``registry-1.docker.io`` are accepted too.

A credential helper is ``docker-credential-<name> get`` with the server on stdin and JSON
(``Username``, ``Secret``) on stdout; the username ``<token>`` means the secret is an identity
token (an OAuth2 refresh token), as in Docker's credential-helpers protocol.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DOCKER_HUB_AUTH_KEY",
    "Challenge",
    "Credentials",
    "CredentialsError",
    "auth_files",
    "find_credentials",
    "parse_challenges",
]

#: The key Docker writes Docker Hub's credentials under, and gives its helpers as the server.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
#: A credential helper that hangs (a locked keychain waiting for a prompt) must not hang the run.
HELPER_TIMEOUT = 30.0


class CredentialsError(Exception):
    """An auth file or credential helper is broken: the message names the file or helper."""


@dataclass(frozen=True)
class Credentials:
    """A registry login: a username and password, or an identity (refresh) token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""  # the file or helper they came from, for messages


def auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files to read, in order (see the module docstring); missing ones included."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    elif env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env["DOCKER_CONFIG"]) / "config.json" if env.get("DOCKER_CONFIG")
                 else home / ".docker" / "config.json")
    return files


def find_credentials(
    registry: str, repository: str = "", *, env: Mapping[str, str] | None = None
) -> Credentials | None:
    """The credentials for ``registry`` (and ``repository``), or None for anonymous access.

    Raises CredentialsError when a file is not valid JSON or a helper fails other than by
    having nothing for this server.
    """
    env = os.environ if env is None else env
    for path in auth_files(env):
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise CredentialsError(f"cannot read auth file {path}: {e.strerror}") from e
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CredentialsError(f"auth file {path} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise CredentialsError(f"auth file {path} is not a JSON object")
        found = _from_file(data, str(path), registry, repository, env)
        if found is not None:
            return found
    return None


def _from_file(
    data: dict[str, object], source: str, registry: str, repository: str, env: Mapping[str, str]
) -> Credentials | None:
    server = DOCKER_HUB_AUTH_KEY if registry in _HUB_NAMES else registry
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if isinstance(name, str) and name and _normalise(key) == _normalise(registry):
                return _run_helper(name, server, env)
    auths = data.get("auths")
    if isinstance(auths, dict):
        best: tuple[int, Credentials] | None = None
        wanted = f"{_normalise(registry)}/{repository}".rstrip("/")
        for key, entry in auths.items():
            k = _normalise(key)
            if not isinstance(entry, dict) or not (wanted == k or wanted.startswith(k + "/")):
                continue
            creds = _from_entry(entry, f"{source} ({key})")
            if creds is not None and (best is None or len(k) > best[0]):
                best = (len(k), creds)
        if best is not None:
            return best[1]
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        return _run_helper(store, server, env)
    return None


def _normalise(key: str) -> str:
    """``https://index.docker.io/v1/`` -> "docker.io"; ``http://host:5000/v2/`` -> ``host:5000``."""
    key = re.sub(r"^[a-z]+://", "", key.strip()).rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    host, slash, rest = key.partition("/")
    if host in _HUB_NAMES:
        host = "docker.io"
    return host + slash + rest


def _from_entry(entry: dict[str, object], source: str) -> Credentials | None:
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    username, password = entry.get("username"), entry.get("password")
    if isinstance(auth, str) and auth:
        try:
            username, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise CredentialsError(f"{source}: 'auth' is not base64 of 'user:password' ({e})") from e
        if not sep:
            raise CredentialsError(f"{source}: 'auth' decodes to no 'user:password' pair")
    if isinstance(token, str) and token:
        return Credentials(username=str(username or ""), identity_token=token, source=source)
    if isinstance(username, str) and username and isinstance(password, str):
        return Credentials(username=username, password=password, source=source)
    return None


def _run_helper(name: str, server: str, env: Mapping[str, str]) -> Credentials | None:
    program = f"docker-credential-{name}"
    try:
        done = subprocess.run(
            [program, "get"], input=server, capture_output=True, text=True,
            timeout=HELPER_TIMEOUT, env=dict(env), check=False,
        )
    except FileNotFoundError as e:
        raise CredentialsError(f"credential helper {program} is configured but not on PATH") from e
    except subprocess.TimeoutExpired as e:
        raise CredentialsError(f"credential helper {program} did not answer in {HELPER_TIMEOUT:g}s") from e
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip()
        # The helpers' protocol says "credentials not found in native keychain" for no entry.
        if "not found" in said.lower():
            return None
        raise CredentialsError(f"credential helper {program} failed for {server}: {said[:300]}")
    try:
        data = json.loads(done.stdout)
        username, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError) as e:
        raise CredentialsError(
            f"credential helper {program} answered no JSON with Username and Secret: {done.stdout[:200]!r}"
        ) from e
    if not isinstance(username, str) or not isinstance(secret, str) or not secret:
        return None
    if username == "<token>":
        return Credentials(identity_token=secret, source=program)
    return Credentials(username=username, password=secret, source=program)


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: its scheme (lowercase) and parameters."""

    scheme: str
    params: Mapping[str, str]


# RFC 9110 section 11.6.1: challenge = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*({_QUOTED}|{_TOKEN})\s*(?:,|$)")
_SCHEME = re.compile(rf"[\s,]*({_TOKEN})(?=[\s,]|$)\s*")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into its challenges, in order.

    Handles quoted strings holding commas and escapes (``scope="repository:a:pull,push"``),
    several challenges in one header (``Basic realm="x", Bearer realm="y"``) and parameters
    without quotes. Scheme and parameter names are lowercased; what cannot be parsed is skipped.

    >>> parse_challenges('Bearer realm="https://a/token",service="a",scope="repository:x:pull,push"')[0].params["scope"]
    'repository:x:pull,push'
    """
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = _SCHEME.match(header, pos)
        if m is None:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM.match(header, pos)
            if p is None:
                break
            name, value = p.group(1).lower(), p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[name] = value
            pos = p.end()
        if pos < len(header) and not params:
            # token68 (Basic's old "Basic xyz==" credentials form) or junk: skip to the next comma
            nxt = header.find(",", pos)
            pos = len(header) if nxt < 0 else nxt + 1
        challenges.append(Challenge(scheme, params))
    return challenges
