"""An image service's reference, checked when the environment is made (before anything starts)."""

from __future__ import annotations

from pathlib import Path

from pytest_envbox.errors import ConfigError
from pytest_envbox.images.reference import ImageRef, parse_reference
from pytest_envbox.spec import Service

__all__ = ["check_reference"]


def check_reference(spec: Service, rootdir: Path) -> ImageRef:
    """``spec.image`` parsed (relative file paths from ``rootdir``), or a :class:`ConfigError`
    naming the service and the key ``image``."""
    assert spec.image is not None
    try:
        return parse_reference(spec.image, base=str(rootdir))
    except ValueError as e:
        raise ConfigError(str(e), service=spec.name, key="image") from None
