"""``$(VAR)`` expansion in command, args and env values, as Kubernetes' expansion package does it
(its test table, pkg/kubelet/... third_party/forked/golang/expansion, for the cases that matter)."""

from __future__ import annotations

import pytest

from pytest_envbox.kubernetes.expand import expand

ENV = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": "", "": "x"}


@pytest.mark.parametrize(("text", "want"), [
    ("$(VAR_A)", "A"),
    ("___$(VAR_B)___", "___B___"),
    ("$(VAR_A)-$(VAR_A)", "A-A"),
    ("$(VAR_A)$(VAR_B)$(VAR_C)", "ABC"),
    ("$(VAR_REF)", "$(VAR_A)"),           # one pass: a value is not expanded again
    ("$(VAR_EMPTY)", ""),
    ("$(UNKNOWN)", "$(UNKNOWN)"),         # unknown stays literal
    ("$$(VAR_A)", "$(VAR_A)"),            # $$ escapes
    ("$$$(VAR_A)", "$A"),
    ("$$$$(VAR_A)", "$$(VAR_A)"),
    ("$$", "$"),
    ("$", "$"),
    ("foo$", "foo$"),
    ("$VAR_A", "$VAR_A"),                 # shell forms are the program's
    ("${VAR_A}", "${VAR_A}"),
    ("$(VAR_A", "$(VAR_A"),               # never closed
    ("$(VAR_A)$(", "A$("),
    ("$()", "x"),                         # an empty name is a name like any other
    ("$(seq 1 $MAX)", "$(seq 1 $MAX)"),   # shell command substitution survives
    ("(($(VAR_A)))", "((A))"),
])  # fmt: skip
def test_expand(text: str, want: str) -> None:
    assert expand(text, ENV) == want


def test_nothing_to_expand_is_returned_unchanged() -> None:
    assert expand("plain text, no dollars", {}) == "plain text, no dollars"
