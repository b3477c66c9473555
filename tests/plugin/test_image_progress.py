"""A slow pull shows its progress in pytest's terminal, and the run's output stays whole."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PLUGIN_ARGS
from tests.imagekit.build import busybox_image  # noqa: F401  (a fixture)
from tests.imagekit.registry import Proxy, RegistryServer, open_registry, push_layout  # noqa: F401

pytest_plugins = ["pytester"]


@pytest.fixture
def slow_registry(open_registry: RegistryServer, busybox_image: Path) -> Iterator[str]:  # noqa: F811
    """The busybox image behind a proxy that takes 2 s for each blob."""
    push_layout(busybox_image, "latest", open_registry, "progress/busybox:1")
    proxy = Proxy(open_registry.url, mode="slow", pace=2.0)
    try:
        yield f"{proxy.host}/progress/busybox:1"
    finally:
        proxy.close()


def test_a_slow_pull_shows_each_layers_bytes_without_breaking_pytests_output(
        pytester: pytest.Pytester, slow_registry: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    pytester.makefile(".toml", pyproject=f"""
[tool.envbox.services.web]
image = "{slow_registry}"
ready = {{ tcp = 8080 }}
""")
    pytester.makepyfile(test_web="""
import pytest, urllib.request

@pytest.mark.envbox("web")
def test_web(envbox):
    url = f"http://127.0.0.1:{envbox['web'].port(8080)}/"
    assert urllib.request.urlopen(url, timeout=5).status == 200

def test_after():
    pass
""")
    monkeypatch.setenv("ENVBOX_STORE", str(tmp_path / "store"))  # empty: the pull is real
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[2]))  # a checkout, or installed
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    # What is awaited (the reference), each layer's bytes (12 hex digits of its digest), elapsed
    assert re.search(rf"envbox: downloading {re.escape(slow_registry)} .* in 1 layer, \d+\.\ds "
                     r"\[[0-9a-f]{12} ", out), out  # fmt: skip
    assert re.search(rf"envbox: pulled {re.escape(slow_registry)} \(\d+\.\ds\)", out), out
    # pytest's own lines are whole: the progress never shares a line with a result
    lines = out.splitlines()
    assert any(re.fullmatch(r"test_web\.py \.\.\s+\[100%\]", ln) for ln in lines), out
    assert all(ln.startswith("envbox: ") or "envbox:" not in ln for ln in lines), out
