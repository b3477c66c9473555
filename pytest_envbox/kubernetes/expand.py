"""``$(VAR)`` in ``command``, ``args`` and env values, exactly as Kubernetes expands them.

A port of Kubernetes' ``third_party/forked/golang/expansion``: ``$(NAME)`` becomes the value of
``NAME`` when it is defined, else stays as written (``$(NAME)``); ``$$`` is one ``$`` (so
``$$(NAME)`` is the literal text ``$(NAME)``); a ``$`` before anything else, or a ``$(`` that is
never closed, is kept as it is. Shell forms (``$NAME``, ``${NAME}``) are not Kubernetes' and are
left alone for the program (or its shell) to read.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["expand"]


def expand(text: str, env: Mapping[str, str]) -> str:
    """``text`` with each ``$(NAME)`` of ``env`` substituted (see the module docstring)."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    n = len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            if nxt == "$":
                out.append("$")
                advance = 1
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = text[cursor + 2 : close]
                    out.append(env.get(name, f"$({name})"))
                    advance = close - cursor
            else:
                out.append("$" + nxt)
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)
