"""Compose interpolation and ``.env`` files (pytest_envbox.compose.interpolate), rule by rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_envbox.compose.interpolate import Place, interpolate, lookup_in, parse_env_file
from pytest_envbox.errors import ConfigError

ENV = {"SET": "value", "EMPTY": "", "PORT": "8080"}


def sub(text: str, env: dict[str, str] | None = None, place: Place | None = None) -> str:
    return interpolate(text, lookup_in(ENV if env is None else env),
                       place or Place(Path("compose.yaml"), "web", "image"))  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [
    ("$SET", "value"),
    ("${SET}", "value"),
    ("a${SET}b", "avalueb"),
    ("$SET-x", "value-x"),
    ("${UNSET:-dflt}", "dflt"),
    ("${EMPTY:-dflt}", "dflt"),
    ("${SET:-dflt}", "value"),
    ("${UNSET-dflt}", "dflt"),
    ("${EMPTY-dflt}", ""),
    ("${UNSET:+alt}", ""),
    ("${EMPTY:+alt}", ""),
    ("${SET:+alt}", "alt"),
    ("${EMPTY+alt}", "alt"),
    ("${UNSET+alt}", ""),
    ("${EMPTY?boom}", ""),
    ("${SET:?boom}", "value"),
    ("$$SET", "$SET"),
    ("$${SET}", "${SET}"),
    ("cost: $$5", "cost: $5"),
    ("${UNSET:-${PORT}}", "8080"),
    ("${UNSET:-${ALSO_UNSET:-x}}", "x"),
    ("${UNSET:-a b}", "a b"),
    ("http://h:${PORT:-80}/p", "http://h:8080/p"),
    ("no variables", "no variables"),
])  # fmt: skip
def test_interpolation_forms(text: str, expected: str) -> None:
    assert sub(text) == expected


def test_an_unset_variable_is_empty_and_warned() -> None:
    place = Place(Path("compose.yaml"), "web", "environment.A")
    assert sub("x${NOPE}y", place=place) == "xy"
    assert len(place.warnings) == 1
    assert "NOPE" in place.warnings[0] and "web" in place.warnings[0]


@pytest.mark.parametrize("text", ["${UNSET:?the db password}", "${EMPTY:?the db password}",
                                  "${UNSET?the db password}"])  # fmt: skip
def test_required_variable_error_names_file_service_key_and_message(text: str) -> None:
    place = Place(Path("/p/compose.yaml"), "db", "environment.POSTGRES_PASSWORD")
    with pytest.raises(ConfigError) as info:
        sub(text, place=place)
    message = str(info.value)
    assert "the db password" in message
    assert "/p/compose.yaml" in message
    assert info.value.service == "db"
    assert info.value.key == "environment.POSTGRES_PASSWORD"


@pytest.mark.parametrize("text", ["$1", "price $", "${}", "${A/b/c}", "${A", "${A:-x", "${-x}"])
def test_malformed_interpolation_is_an_error(text: str) -> None:
    with pytest.raises(ConfigError, match="interpolation"):
        sub(text)


def test_a_malformed_default_is_an_error_even_when_unused() -> None:
    with pytest.raises(ConfigError):
        sub("${SET:-$1}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_env_file_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join([
        "# a comment",
        "",
        "PLAIN=value",
        "export EXPORTED=yes",
        "SPACED = around ",
        "COMMENTED=value # a comment",
        "HASH=value#not-a-comment",
        "SINGLE='$PLAIN ${PLAIN} \\t'",
        "ESCAPED_SINGLE='Let\\'s go!'",
        'DOUBLE="a\\tb\\nc \\"q\\" $PLAIN"',
        'DOUBLE_COMMENT="x # not a comment" # a comment',
        "REF=${PLAIN}-${FROM_ENV}",
        "EMPTY=",
        "UNSET_ONLY",
        'MULTI="line1',
        'line2"',
        "DOLLAR=\"\\$PLAIN\"",
    ]))  # fmt: skip
    env = parse_env_file(path, lookup_in({"FROM_ENV": "env"}))
    assert env == {
        "PLAIN": "value",
        "EXPORTED": "yes",
        "SPACED": "around",
        "COMMENTED": "value",
        "HASH": "value#not-a-comment",
        "SINGLE": "$PLAIN ${PLAIN} \\t",
        "ESCAPED_SINGLE": "Let's go!",
        "DOUBLE": 'a\tb\nc "q" value',
        "DOUBLE_COMMENT": "x # not a comment",
        "REF": "value-env",
        "EMPTY": "",
        "MULTI": "line1\nline2",
        "DOLLAR": "$PLAIN",
    }


def test_env_file_raw_format_keeps_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, "A='quoted' $X\n")
    assert parse_env_file(path, lookup_in({}), raw=True) == {"A": "'quoted' $X"}


@pytest.mark.parametrize(("text", "words"), [("1BAD=x\n", "line 1"), ('A="open\n', "never closed"),
                                             ("A=${B:?needed}\n", "needed")])  # fmt: skip
def test_env_file_errors_name_the_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=words) as info:
        parse_env_file(path, lookup_in({}))
    assert str(path) in str(info.value)
