"""Commands run inside the services of compose.yaml (their images), for the tests to check what
the servers hold."""

from __future__ import annotations

from pytest_envbox import ServiceHandle


def run(service: ServiceHandle, *argv: str) -> str:
    """``argv`` run inside ``service`` (its image's files, its user, its environment): stdout."""
    result = service.exec(list(argv))
    assert result.returncode == 0, f"{argv} in {service.name}: {result.returncode}\n{result.stderr}"
    return result.stdout.rstrip("\n")


def psql(db: ServiceHandle, sql: str) -> str:
    """SQL run by the image's psql, over its socket, in the notes database; unaligned output."""
    return run(db, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "notes", "-d", "notes", "-c", sql)
