"""A client for the OCI distribution / Docker Registry HTTP API v2: manifests, indexes, blobs.

Why ``requests`` and not oras-py: ``requests`` is a dependency already and imports in ~55 ms
here; ``import oras.client`` takes ~90 ms (requests plus jsonschema, two more dependencies), and
oras-py, an artifact client, neither picks a platform from an index nor runs credential helpers
nor streams into the caller's file with progress; it follows redirects with requests' defaults.

What it does, and why:

- Every manifest's digest is computed from the bytes received; pulling by digest checks it (and a
  ``Docker-Content-Digest`` header, when given, is checked too). Schema 1 manifests are refused:
  their digests do not cover what is pulled and registries stopped serving them.
- Auth: anonymous first; a 401 names its scheme. Bearer: the token endpoint is asked for
  ``repository:<repo>:pull`` (with the user's credentials when there are any, see
  :mod:`~pytest_envbox.images.auth`), and the token is cached per registry and scope. Basic: the
  credentials are sent. A 401/403 after that is an :class:`ImageError` quoting the registry.
- Redirects (blob storage) are followed here, not by requests: the ``Authorization`` header goes
  only to the registry's own origin (scheme, host and port), never to storage elsewhere.
- Transient failures (connection errors, 429, 502, 503, 504) are retried ``retries`` times with a
  short backoff; other 4xx are answers, not retried. A body cut short or a registry that stops
  sending mid-blob (no byte for ``timeout`` seconds) is an :class:`ImageError`; not retried,
  because bytes were already written to ``out``.
- Plain HTTP only for loopback registries (``localhost``, ``127.0.0.0/8``, ``::1``, as written:
  names are not resolved, so DNS cannot make a host "loopback") and those listed in ``insecure``
  (``host`` or ``host:port``); HTTPS otherwise, with no silent fallback to HTTP. Environment proxy
  settings apply to remote registries, never to loopback ones; ``~/.netrc`` is not consulted.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import platform as _platform
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from ..errors import ImageError
from .auth import Credentials, CredentialsError, auth_files, find_credentials, parse_challenges
from .reference import DOCKER_HUB, ImageRef

__all__ = ["DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "OCI_INDEX", "OCI_MANIFEST", "Descriptor", "Manifest",
           "Registry", "host_platform"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
_INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
_ACCEPT = ", ".join((*_IMAGE_TYPES, *_INDEX_TYPES))
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
#: containerd's limit: a manifest is a few KiB; a registry sending megabytes is broken or hostile.
_MANIFEST_MAX = 4 << 20
_CHUNK = 256 << 10
_REDIRECTS = 10
_RETRY_STATUS = frozenset({429, 502, 503, 504})
_BACKOFF, _BACKOFF_MAX = 0.2, 5.0
#: platform.machine() -> GOARCH (and variant), the names image indexes use.
_MACHINES = {"x86_64": ("amd64", ""), "aarch64": ("arm64", "v8"), "armv7l": ("arm", "v7"),
             "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"), "i386": ("386", ""), "i686": ("386", ""),
             "loongarch64": ("loong64", "")}  # others (ppc64le, s390x, riscv64) have the same name


@dataclass(frozen=True)
class Descriptor:
    """A blob as a manifest names it."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """An image manifest (after choosing from an index): its digest, config and layers, bottom first."""

    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    raw: bytes


def host_platform() -> str:
    """This host's platform as indexes name it: ``linux/amd64``, ``linux/arm64/v8``, ``linux/arm/v7``."""
    machine = _platform.machine()
    arch, variant = _MACHINES.get(machine, (machine, ""))
    return f"linux/{arch}/{variant}" if variant else f"linux/{arch}"


class _Refused(Exception):
    """The registry answered with an error status (raised inside, turned into ImageError)."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class Registry:
    """Talks to registries for one run; holds one connection pool and the bearer tokens it got.

    Usable from several threads (one pull per thread). ``timeout`` bounds connecting and each
    wait for data, not a whole download.
    """

    def __init__(self, *, insecure: Sequence[str] = (), timeout: float = 30.0, retries: int = 3) -> None:
        self.insecure = tuple(insecure)
        self.timeout = timeout
        self.retries = retries
        self._session = requests.Session()
        # A no-op auth object: requests would otherwise read ~/.netrc and replace our header.
        self._session.auth = lambda request: request
        self._tokens: dict[tuple[str, str], tuple[str, float, bool]] = {}  # value, until, with a login
        self._lock = threading.Lock()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def plain_http(self, registry: str) -> bool:
        """Whether ``registry`` is spoken to over plain HTTP (loopback, or listed in ``insecure``)."""
        host = re.sub(r":[0-9]+$", "", registry).strip("[]")
        if registry in self.insecure or host in self.insecure or host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _allowed(self, scheme: str, netloc: str) -> bool:
        return scheme == "https" or (scheme == "http" and self.plain_http(netloc))

    def base_url(self, registry: str) -> str:
        """The API's origin for ``registry``: ``https://registry-1.docker.io`` for "docker.io"."""
        host = "registry-1.docker.io" if registry == DOCKER_HUB else registry
        return f"{'http' if self.plain_http(registry) else 'https'}://{host}"

    # -- manifests ---------------------------------------------------------------------------

    def manifest(self, ref: ImageRef, *, platform: str | None = None) -> Manifest:
        """The image manifest ``ref`` names; from an index, the one for ``platform`` (None: this host)."""
        if ref.transport != "docker":
            raise ValueError(f"{ref} is not a registry reference")
        raw, media_type, digest = self._get_manifest(ref, ref.digest or ref.tag or "latest", ref.digest)
        if media_type in _INDEX_TYPES:
            want = platform or host_platform()
            chosen = _choose(ref, _json(ref, raw), want)
            raw, media_type, digest = self._get_manifest(ref, chosen, chosen)
            if media_type not in _IMAGE_TYPES:
                raise ImageError(f"the index entry for {want} is a {media_type}, not an image manifest",
                                 reference=str(ref))
        return _parse_image(ref, raw, media_type, digest)

    def _get_manifest(self, ref: ImageRef, what: str, expect: str | None) -> tuple[bytes, str, str]:
        url = f"{self.base_url(ref.registry)}/v2/{ref.repository}/manifests/{what}"
        with self._request(ref, url, {"Accept": _ACCEPT}) as resp:
            raw = self._read_all(ref, resp, _MANIFEST_MAX)
            header_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest", "")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if expect is not None and digest != expect:
            raise ImageError(f"the registry sent a manifest whose digest is {digest}, not {expect}",
                             reference=str(ref))
        if header_digest.startswith("sha256:") and header_digest != digest:
            raise ImageError(f"the manifest received has digest {digest}, the registry says {header_digest} "
                             "(Docker-Content-Digest): corrupted in transit?", reference=str(ref))
        data = _json(ref, raw)
        media_type = data.get("mediaType") or header_type
        if data.get("schemaVersion") == 1 or "docker.distribution.manifest.v1" in media_type:
            raise ImageError("the registry serves it as a Docker schema 1 manifest, which is not supported "
                             "(deprecated since 2017; push it again with a current tool)", reference=str(ref))
        if media_type not in (*_IMAGE_TYPES, *_INDEX_TYPES) and ("manifests" in data or "layers" in data):
            media_type = OCI_INDEX if "manifests" in data else OCI_MANIFEST
        if media_type not in (*_IMAGE_TYPES, *_INDEX_TYPES):
            raise ImageError(f"the registry answered a {media_type or 'typeless'} document, not an image "
                             f"manifest or index", reference=str(ref))
        return raw, media_type, digest

    # -- blobs -------------------------------------------------------------------------------

    def blob(self, ref: ImageRef, desc: Descriptor, out: BinaryIO,
             progress: Callable[[int], None] | None = None) -> None:
        """Stream the blob ``desc`` into ``out``, calling ``progress(bytes so far)`` per chunk.

        Raises ImageError on an HTTP error, a body shorter (or longer) than announced, or when no
        byte comes for ``timeout`` seconds. The digest is the store's to verify.
        """
        if not _DIGEST.fullmatch(desc.digest):
            raise ImageError(f"invalid blob digest {desc.digest!r}", reference=str(ref))
        url = f"{self.base_url(ref.registry)}/v2/{ref.repository}/blobs/{desc.digest}"
        with self._request(ref, url, {"Accept-Encoding": "identity"}) as resp:
            announced = resp.headers.get("Content-Length")
            expected = int(announced) if announced and announced.isdigit() else desc.size
            got = 0
            try:
                for chunk in resp.raw.stream(_CHUNK, decode_content=False):
                    got += len(chunk)
                    if got > desc.size >= 0:
                        raise ImageError(f"blob {desc.digest} is larger than the {desc.size} bytes its "
                                         f"manifest says", reference=str(ref))
                    out.write(chunk)
                    if progress is not None:
                        progress(got)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                why = _why(e, self.timeout)
                raise ImageError(f"blob {desc.digest}: the download from {ref.registry} broke off after "
                                 f"{got} of {expected} bytes ({why})", reference=str(ref)) from e
        if got != expected or got != desc.size:
            raise ImageError(f"blob {desc.digest} is truncated: {got} bytes received, {expected} announced, "
                             f"{desc.size} in the manifest", reference=str(ref))

    # -- HTTP: retries, redirects, auth --------------------------------------------------------

    def _request(self, ref: ImageRef, url: str, headers: Mapping[str, str]) -> requests.Response:
        """GET ``url`` with auth, redirects and retries; a 2xx response (streaming) or ImageError."""
        scope = f"repository:{ref.repository}:pull"
        key = (ref.registry, scope)
        fresh = False
        while True:
            auth, used = self._cached(key)
            try:
                return self._follow(ref, url, headers, auth)
            except _Refused as refused:
                resp = refused.response
                # a 401 from blob storage elsewhere is its answer, not a challenge to log in to
                if resp.status_code == 401 and not fresh and _origin(resp.url) == _origin(url):
                    challenge = resp.headers.get("WWW-Authenticate", "")
                    resp.close()
                    self._authenticate(ref, key, challenge)
                    fresh = True
                    continue
                elsewhere = _origin(resp.url) != _origin(url)
                what = f"{urlsplit(resp.url).netloc}, where {ref.registry} redirected," if elsewhere else ""
                raise self._refusal(ref, resp, authed=None if elsewhere else used, what=what) from None

    def _follow(self, ref: ImageRef, url: str, headers: Mapping[str, str],
                auth: str | None) -> requests.Response:
        origin = _origin(self.base_url(ref.registry))
        for _ in range(_REDIRECTS):
            sent = dict(headers)
            if auth is not None and _origin(url) == origin:
                sent["Authorization"] = auth
            resp = self._send(ref, url, sent)
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                parts = urlsplit(url)
                if not self._allowed(parts.scheme, parts.netloc):
                    raise ImageError(f"{ref.registry} redirected to {parts.scheme}://{parts.netloc}, which "
                                     "is not HTTPS (nor a loopback or insecure host)", reference=str(ref))
                continue
            if resp.status_code >= 300:
                raise _Refused(resp)
            return resp
        raise ImageError(f"{ref.registry} redirected more than {_REDIRECTS} times", reference=str(ref))

    def _send(self, ref: ImageRef, url: str, headers: Mapping[str, str],
              method: str = "GET", **kw: Any) -> requests.Response:
        """One request, retried on transient failures; ImageError when the host does not answer."""
        parts = urlsplit(url)
        # requests merges proxies from the environment; None entries switch them off for loopback.
        proxies: Any = {"http": None, "https": None} if self.plain_http(parts.netloc) else None
        for attempt in range(self.retries + 1):
            try:
                resp = self._session.request(
                    method, url, headers=headers, stream=True, allow_redirects=False,
                    timeout=(self.timeout, self.timeout), proxies=proxies, **kw,
                )
            except requests.RequestException as e:
                if attempt < self.retries:
                    time.sleep(min(_BACKOFF * 2**attempt, _BACKOFF_MAX))
                    continue
                why = _why(e, self.timeout)
                what = f"registry {parts.netloc} did not answer ({why})"
                if isinstance(e, requests.exceptions.SSLError):
                    what = (f"registry {parts.netloc} failed the TLS handshake ({why}); HTTPS is required "
                            "unless the registry is on loopback or listed in insecure_registries")
                raise ImageError(what, reference=str(ref)) from e
            if resp.status_code in _RETRY_STATUS and attempt < self.retries:
                wait = min(_BACKOFF * 2**attempt, _BACKOFF_MAX)
                after = resp.headers.get("Retry-After", "")
                if after.isdigit():
                    wait = min(float(after), _BACKOFF_MAX)
                resp.close()
                time.sleep(wait)
                continue
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _cached(self, key: tuple[str, str]) -> tuple[str | None, bool]:
        with self._lock:
            entry = self._tokens.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None, False
        return entry[0], entry[2]

    def _authenticate(self, ref: ImageRef, key: tuple[str, str], header: str) -> None:
        """Answer the 401's challenge: get a bearer token or settle on basic credentials."""
        challenges = {c.scheme: c for c in parse_challenges(header)}
        try:
            creds = find_credentials(ref.registry, ref.repository)
        except CredentialsError as e:
            raise ImageError(str(e), reference=str(ref)) from e
        if "bearer" in challenges and challenges["bearer"].params.get("realm"):
            value = "Bearer " + self._token(ref, challenges["bearer"].params, key[1], creds)
            lifetime = 50.0  # refreshed before the registry's minimum lifetime (60 s) ends
        elif "basic" in challenges:
            if creds is None or not creds.username:
                raise ImageError(f"registry {ref.registry} requires a login and {_no_login()}",
                                 reference=str(ref))
            value = "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            lifetime = float("inf")
        else:
            raise ImageError(f"registry {ref.registry} asks for a login this client does not speak "
                             f"(WWW-Authenticate: {header[:200]!r})", reference=str(ref))
        with self._lock:
            self._tokens[key] = (value, time.monotonic() + lifetime, creds is not None)

    def _token(self, ref: ImageRef, params: Mapping[str, str], scope: str, creds: Credentials | None) -> str:
        realm = params["realm"]
        parts = urlsplit(realm)
        if not self._allowed(parts.scheme, parts.netloc):
            raise ImageError(f"registry {ref.registry} sends for tokens to {realm!r}, which is not HTTPS "
                             "(nor a loopback or insecure host)", reference=str(ref))
        query = {"service": params.get("service", ""), "scope": scope}
        if creds is not None and creds.identity_token:
            # Docker's OAuth2 flow: an identity token is a refresh token, exchanged by POST.
            form = {**query, "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "pytest-envbox"}
            resp = self._send(ref, realm, {}, "POST", data=form)
        else:
            headers = {}
            if creds is not None and creds.username:
                basic = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
                headers["Authorization"] = f"Basic {basic}"
            resp = self._send(ref, realm, headers, params={k: v for k, v in query.items() if v})
        with resp:
            if resp.status_code != 200:
                raise self._refusal(ref, resp, authed=creds is not None, what=f"its token service {realm}")
            try:
                answer = json.loads(self._read_all(ref, resp, 1 << 20))
                token = answer.get("token") or answer.get("access_token")
            except (ValueError, AttributeError):
                token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"the token service {realm} of {ref.registry} answered no token",
                             reference=str(ref))
        return token

    def _refusal(self, ref: ImageRef, resp: requests.Response, *, authed: bool | None,
                 what: str = "") -> ImageError:
        """The ImageError for an error answer; ``authed`` None: credentials are not the matter."""
        try:
            said = _quote(resp.status_code, self._read_all(ref, resp, 64 << 10))
        except ImageError:
            said = f"HTTP {resp.status_code}"
        finally:
            resp.close()
        who = what or f"registry {ref.registry}"
        if resp.status_code in (401, 403):
            how = f"refused the credentials it was given ({said})" if authed else \
                f"refused access ({said})" + (f"; {_no_login()}" if authed is not None else "")
            return ImageError(f"{who} {how}", reference=str(ref))
        if resp.status_code == 404:
            return ImageError(f"{who} has no such image ({said})", reference=str(ref))
        return ImageError(f"{who} answered {said}", reference=str(ref))

    def _read_all(self, ref: ImageRef, resp: requests.Response, limit: int) -> bytes:
        data = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise ImageError(f"{ref.registry} sent more than {limit} bytes for {resp.url}",
                                     reference=str(ref))
        except requests.RequestException as e:
            raise ImageError(f"registry {ref.registry} broke off its answer ({_why(e, self.timeout)})",
                             reference=str(ref)) from e
        return bytes(data)


def _no_login() -> str:
    looked = ", ".join(str(p) for p in auth_files())
    return f"no credentials were found for it (looked in {looked}; `podman login` or `docker login` add them)"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


def _json(ref: ImageRef, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ImageError(f"the registry sent a manifest that is not JSON ({e})", reference=str(ref)) from e
    if not isinstance(data, dict):
        raise ImageError("the registry sent a manifest that is not a JSON object", reference=str(ref))
    return data


def _descriptor(ref: ImageRef, data: object) -> Descriptor:
    if not isinstance(data, dict) or not isinstance(data.get("digest"), str) or \
            not _DIGEST.fullmatch(data["digest"]) or not isinstance(data.get("size"), int):
        raise ImageError(f"the manifest has an invalid descriptor {json.dumps(data)[:200]} (sha256 digests "
                         f"and sizes are required)", reference=str(ref))
    urls = data.get("urls") or ()
    return Descriptor(str(data.get("mediaType", "")), data["digest"], data["size"],
                      tuple(u for u in urls if isinstance(u, str)))


def _parse_image(ref: ImageRef, raw: bytes, media_type: str, digest: str) -> Manifest:
    data = _json(ref, raw)
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise ImageError("the image manifest has no layers list", reference=str(ref))
    return Manifest(digest=digest, media_type=media_type, config=_descriptor(ref, data.get("config")),
                    layers=tuple(_descriptor(ref, layer) for layer in layers), raw=raw)


def _platform_of(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    p = entry.get("platform") or {}
    return str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", ""))


def _choose(ref: ImageRef, index: Mapping[str, Any], want: str) -> str:
    """The digest of the index entry for ``want``; ImageError listing the platforms there are."""
    parts = want.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"invalid platform {want!r} (expected os/arch[/variant], e.g. 'linux/arm64/v8')",
                         reference=str(ref))
    os_, arch, variant = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    entries = [e for e in index.get("manifests") or () if isinstance(e, dict)
               # buildx's attestations ride in the index as unknown/unknown manifests
               and (e.get("annotations") or {}).get("vnd.docker.reference.type") != "attestation-manifest"]
    exact, loose = [], []
    for entry in entries:
        e_os, e_arch, e_variant = _platform_of(entry)
        if (e_os, e_arch) != (os_, arch):
            continue
        if e_variant == variant or (arch == "arm64" and {e_variant, variant} <= {"", "v8"}):
            exact.append(entry)
        elif not e_variant or not variant:
            loose.append(entry)
    for entry in exact + loose:
        return str(_descriptor(ref, entry).digest)
    present = sorted({"/".join(p for p in _platform_of(e) if p) or "(no platform)" for e in entries})
    raise ImageError(f"the image index has no manifest for platform {want}; it has: "
                     f"{', '.join(present) or 'none'}", reference=str(ref))


def _quote(status: int, body: bytes) -> str:
    """``HTTP 404 MANIFEST_UNKNOWN: manifest unknown``: the registry's own words, short."""
    try:
        errors = json.loads(body).get("errors")
        said = "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors)
    except (ValueError, AttributeError, TypeError):
        said = body.decode(errors="replace").strip()[:300]
    return f"HTTP {status} {said}".strip()


def _why(exc: BaseException, timeout: float) -> str:
    """A short cause for a failed connection or read: 'connection refused', 'no data for 30s'..."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        reason = getattr(seen, "reason", None)
        seen = seen.__cause__ or seen.__context__ or (reason if isinstance(reason, BaseException) else None) \
            or next((a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)), None)
    # urllib3's NewConnectionError is a ConnectTimeoutError too: look for the OS's reason first.
    for e in chain:
        if isinstance(e, OSError) and e.strerror and not isinstance(e, TimeoutError):
            return "connection refused" if isinstance(e, ConnectionRefusedError) else e.strerror
    if any(isinstance(e, (TimeoutError, urllib3.exceptions.TimeoutError, requests.Timeout)) for e in chain):
        return f"no data for {timeout:g}s"
    if any(isinstance(e, (urllib3.exceptions.ProtocolError, http.client.IncompleteRead)) for e in chain):
        return "the connection closed before the end"
    return str(exc)[:300]
