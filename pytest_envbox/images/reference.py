"""Image references: what a user writes in ``image = ...``, parsed into an :class:`ImageRef`.

Registry references follow Docker's grammar (``github.com/distribution/reference``, the one
``docker pull`` and ``podman pull`` accept)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component [ "/" path-component ]*
    domain     := host [ ":" port ]      -- the first component, when it has a "." or a ":"
                                            or is "localhost"; else Docker Hub
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" 64 lowercase hex digits

Docker Hub's shorthand is expanded as Docker does: ``redis`` is ``docker.io/library/redis:latest``,
``user/app`` is ``docker.io/user/app:latest``. A reference with both a tag and a digest keeps both
(the digest decides what is pulled; the tag is kept for the reader).

Files use the transports of ``skopeo``/``podman`` (``containers-transports(5)``): ``oci:DIR[:TAG]``
(an OCI image layout), ``oci-archive:FILE[:TAG]`` (the same, as a tar), ``docker-archive:FILE``
(what ``docker save`` writes). As in containers/image, the first ``:`` after the path separates
the tag, so such a path cannot contain ``:``. ``docker://`` may prefix a registry reference.

Parsing is pure (no files are read and no host is contacted): a bad reference is a ValueError
whose message says what is wrong and shows an accepted example; the caller wraps it in a
ConfigError naming the service and the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["DOCKER_HUB", "FILE_TRANSPORTS", "ImageRef", "parse_reference"]

#: Docker Hub's canonical registry name (its API answers at registry-1.docker.io).
DOCKER_HUB = "docker.io"
FILE_TRANSPORTS = ("oci", "oci-archive", "docker-archive")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_NAME_MAX = 255
_EXAMPLES = (
    "e.g. 'redis:7', 'ghcr.io/org/app@sha256:<64 hex>', 'localhost:5000/app:1.0' or 'oci:./layout:tag'"
)


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference; ``str()`` gives its canonical form, which parses to an equal ref.

    ``transport`` is ``"docker"`` (a registry) or one of :data:`FILE_TRANSPORTS`. Registry refs
    have ``registry`` and ``repository`` (``"docker.io"``, ``"library/redis"``) and ``tag`` (
    ``"latest"`` when neither tag nor digest was written) and/or ``digest``; file refs have an
    absolute ``path`` and, for ``oci``/``oci-archive``, an optional ``tag`` (the layout's
    ``org.opencontainers.image.ref.name``).
    """

    transport: str
    registry: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    path: str = ""

    def __str__(self) -> str:
        if self.transport != "docker":
            return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str, *, base: str | None = None) -> ImageRef:
    """Parse ``text`` into an :class:`ImageRef`; relative file paths resolve against ``base``.

    ``base`` is the project's rootdir (the current directory when None). Raises ValueError, whose
    message says what is wrong and what is accepted.

    >>> str(parse_reference("redis"))
    'docker.io/library/redis:latest'
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"an image reference must be a non-empty string ({_EXAMPLES}), not {text!r}")
    if text != text.strip() or any(c.isspace() for c in text):
        raise ValueError(f"image reference {text!r} contains whitespace ({_EXAMPLES})")
    transport, sep, rest = text.partition(":")
    if sep and transport in FILE_TRANSPORTS:
        return _parse_file(text, transport, rest, base)
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    return _parse_registry(text)


def _parse_file(text: str, transport: str, rest: str, base: str | None) -> ImageRef:
    path, sep, tag = rest.partition(":")
    example = f"'{transport}:./image.tar'" if transport != "oci" else "'oci:./layout:1.0'"
    if not path:
        raise ValueError(f"image reference {text!r} names no file after '{transport}:' (e.g. {example})")
    if sep and transport == "docker-archive":
        raise ValueError(
            f"image reference {text!r}: a name or index after a docker-archive file is not supported; "
            f"write the file alone (e.g. 'docker-archive:./redis.tar'; a path cannot contain ':')"
        )
    if sep and not tag:
        raise ValueError(f"image reference {text!r} has an empty tag after the path (e.g. {example})")
    path = os.path.expanduser(path)
    path = os.path.normpath(os.path.join(base if base is not None else os.getcwd(), path))
    return ImageRef(transport=transport, path=path, tag=tag or None)


def _parse_registry(text: str) -> ImageRef:
    name, at, digest = text.partition("@")
    if at:
        _check_digest(text, digest)
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise ValueError(
                f"image reference {text!r}: invalid tag {tag!r} (a tag is letters, digits, '_', '.' "
                f"and '-', not starting with '.' or '-', at most 128 characters; e.g. 'redis:7.2-alpine')"
            )
    if not name:
        raise ValueError(f"image reference {text!r} has no repository name ({_EXAMPLES})")
    first, slash_sep, remainder = name.partition("/")
    if slash_sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not _DOMAIN.fullmatch(registry):
            raise ValueError(
                f"image reference {text!r}: invalid registry {registry!r} "
                f"(a host name or address with an optional port, e.g. 'registry.example.com:5000/app')"
            )
    else:
        registry, path = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            hint = (
                "repository names must be lowercase"
                if component.lower() != component and _PATH_COMPONENT.fullmatch(component.lower())
                else "each part of a repository is lowercase letters and digits, separated by "
                "'.', '_', '__' or '-', parts joined by '/'"
            )
            raise ValueError(
                f"image reference {text!r}: invalid repository part {component!r} ({hint}; "
                f"e.g. 'myorg/my-app:1.0')"
            )
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > _NAME_MAX:
        raise ValueError(
            f"image reference {text!r}: the name is longer than {_NAME_MAX} characters ({_EXAMPLES})"
        )
    if tag is None and not at:
        tag = "latest"
    return ImageRef(transport="docker", registry=registry, repository=path, tag=tag, digest=digest or None)


def _check_digest(text: str, digest: str) -> None:
    if _DIGEST.fullmatch(digest):
        return
    algorithm = digest.partition(":")[0]
    if _ANY_DIGEST.fullmatch(digest) and algorithm != "sha256":
        raise ValueError(
            f"image reference {text!r}: digest algorithm {algorithm!r} is not supported; only sha256 "
            f"(e.g. 'redis@sha256:{'0' * 64}')"
        )
    raise ValueError(
        f"image reference {text!r}: invalid digest {digest!r} (expected 'sha256:' and 64 lowercase hex "
        f"digits, e.g. 'redis@sha256:{'0' * 64}')"
    )
