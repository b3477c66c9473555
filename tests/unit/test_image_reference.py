"""Image references: Docker's grammar and shorthand, file transports, messages that show the fix."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_envbox.images.reference import ImageRef, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("redis", "docker.io", "library/redis", "latest", None),
        ("redis:7.2", "docker.io", "library/redis", "7.2", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/redis", "docker.io", "library/redis", "latest", None),
        ("index.docker.io/library/redis:7", "docker.io", "library/redis", "7", None),
        ("docker://redis:7", "docker.io", "library/redis", "7", None),
        ("ghcr.io/org/team/app:v1.0_rc-2", "ghcr.io", "org/team/app", "v1.0_rc-2", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app", "localhost:5000", "app", "latest", None),
        ("127.0.0.1:5000/a/b:x", "127.0.0.1:5000", "a/b", "x", None),
        ("[::1]:5000/app:1", "[::1]:5000", "app", "1", None),
        ("Registry.Example.com/app", "Registry.Example.com", "app", "latest", None),
        (f"redis@{D}", "docker.io", "library/redis", None, D),
        (f"redis:7@{D}", "docker.io", "library/redis", "7", D),
        ("my-org/my__app.x--y", "docker.io", "my-org/my__app.x--y", "latest", None),
        ("localhost", "docker.io", "library/localhost", "latest", None),
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
    ],
)
def test_registry_references_follow_dockers_grammar_and_shorthand(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref == ImageRef("docker", registry, repository, tag, digest)
    assert parse_reference(str(ref)) == ref


def test_canonical_forms() -> None:
    assert str(parse_reference("redis")) == "docker.io/library/redis:latest"
    assert str(parse_reference(f"localhost:5000/x@{D}")) == f"localhost:5000/x@{D}"
    assert str(parse_reference(f"x:1@{D}")) == f"docker.io/library/x:1@{D}"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "non-empty"),
        ("Redis", "must be lowercase"),
        ("user/My-App", "must be lowercase"),
        ("redis:", "invalid tag"),
        ("redis:-x", "invalid tag"),
        ("redis:" + "a" * 129, "invalid tag"),
        ("redis@sha256:abc", "invalid digest"),
        ("redis@sha256:" + "AB" * 32, "invalid digest"),
        ("redis@sha512:" + "ab" * 64, "'sha512' is not supported"),
        ("redis@", "invalid digest"),
        ("a//b", "invalid repository part ''"),
        ("a_/b", "invalid repository part"),
        ("-bad.example.com/x", "invalid registry"),
        ("bad_host.example.com/x", "invalid registry"),
        (":7", "no repository"),
        ("redis 7", "whitespace"),
        ("example.com/" + "a" * 250, "longer than 255"),
        ("oci:", "names no file"),
        ("oci:dir:", "empty tag"),
        ("docker-archive:x.tar:redis:7", "not supported"),
    ],
)
def test_bad_references_say_what_is_wrong_and_show_an_example(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="e\\.g\\.") as info:
        parse_reference(text)
    assert words in str(info.value)


def test_file_transports_resolve_relative_paths_against_base(tmp_path: object) -> None:
    base = str(tmp_path)
    assert parse_reference("oci:layout:7", base=base) == ImageRef("oci", path=f"{base}/layout", tag="7")
    assert parse_reference("oci:/abs/layout") == ImageRef("oci", path="/abs/layout")
    assert parse_reference("oci-archive:../x.tar:a.b", base=base) == ImageRef(
        "oci-archive", path=os.path.normpath(f"{base}/../x.tar"), tag="a.b"
    )
    assert parse_reference("docker-archive:x.tar", base=base) == ImageRef(
        "docker-archive", path=f"{base}/x.tar"
    )
    ref = parse_reference("oci:sub/./dir:latest", base=base)
    assert str(ref) == f"oci:{base}/sub/dir:latest"
    assert parse_reference(str(ref)) == ref


def test_relative_file_path_without_base_is_from_the_current_directory() -> None:
    assert parse_reference("oci:x").path == os.path.join(os.getcwd(), "x")


_alnum = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_sep = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(lambda a, s, b: a + s + b, _alnum, _sep, _alnum) | _alnum
_path = st.lists(_component, min_size=1, max_size=3).map("/".join)
_domain = st.sampled_from(["", "localhost/", "localhost:5000/", "ghcr.io/", "a-b.c:1/", "docker.io/"])
_tag = st.builds(lambda a, b: a + b, st.sampled_from("aZ_9"), st.text("aZ09_.-", max_size=12)) | st.none()
_digest = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()) | st.none()


@settings(max_examples=300, deadline=None, database=None)
@given(_domain, _path, _tag, _digest)
def test_any_valid_reference_round_trips_through_its_canonical_form(
    domain: str, path: str, tag: str | None, digest: str | None
) -> None:
    text = domain + path + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = parse_reference(text)
    assert ref.digest == digest
    assert ref.tag == (tag or (None if digest else "latest"))
    assert f"{ref.registry}/{ref.repository}".endswith(path)
    again = parse_reference(str(ref))
    assert again == ref
    assert str(again) == str(ref)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_value_error(text: str) -> None:
    try:
        ref = parse_reference(text, base="/b")
    except ValueError:
        return
    assert parse_reference(str(ref), base="/b") == ref
