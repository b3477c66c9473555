"""Files of an image, read through its stack of unpacked layers as overlayfs would show them.

Before anything starts, the engine needs a few answers from inside the image: where its program
is on ``PATH``, who its ``User`` is (``/etc/passwd``, ``/etc/group``). Mounting the overlay for
that would cost a mount namespace per question; reading the layer directories directly costs a
few ``lstat`` calls. The rules are overlayfs' own, as the store writes the layers: a character
device 0:0 named NAME hides NAME in the layers below; a directory marked opaque
(``trusted.overlay.opaque`` or ``user.overlay.opaque`` = ``y``) hides everything below it; an
entry that is not a directory hides lower directories of the same name. Symbolic links are
resolved inside the image (an absolute target starts at the image's root), never on the host.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path

from pytest_envbox.errors import ConfigError

__all__ = ["find_executable", "read_file", "resolve", "resolve_user"]

_MAX_HOPS = 40  # as the kernel's MAXSYMLINKS
_OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")

Layers = Sequence[Path | str]


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    for name in _OPAQUE:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:  # no such attribute, or trusted.* unreadable to a non-root caller
            continue
    return False


def _entries(dirs: list[str], name: str) -> tuple[str | None, list[str]]:
    """In the merged directory ``dirs`` (host dirs, top layer first): the host path of the entry
    ``name`` that shows (None if none does), and, when it is a directory, the host directories
    that merge into it (top first)."""
    top: str | None = None
    merged: list[str] = []
    for d in dirs:
        p = f"{d}/{name}"
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if _is_whiteout(st):
            break
        if top is None:
            top = p
            if not stat.S_ISDIR(st.st_mode):
                break
        elif not stat.S_ISDIR(st.st_mode):
            break  # a lower non-directory is hidden by the directory above
        merged.append(p)
        if _opaque(p):
            break
    return top, merged


def _host(layers: Layers, comps: list[str]) -> str | None:
    """The host path showing at ``comps`` (no link followed on the way: each but the last is a
    directory, as :func:`resolve` leaves them)."""
    dirs = [str(layer) for layer in reversed(layers)]
    if not comps:
        return dirs[0] if dirs else None
    for name in comps[:-1]:
        _, dirs = _entries(dirs, name)
        if not dirs:
            return None
    return _entries(dirs, comps[-1])[0]


def resolve(layers: Layers, path: str, *, follow: bool = True) -> tuple[str, str] | None:
    """``path`` inside the image, links resolved inside it: (the path inside, the host path of
    what shows there), or None when nothing does (or the links loop)."""
    parts = [p for p in path.split("/") if p]
    out: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        host = _host(layers, [*out, part])
        if host is None:
            return None
        if os.path.islink(host) and (parts or follow):
            hops += 1
            if hops > _MAX_HOPS:
                return None
            link = os.readlink(host)
            if link.startswith("/"):
                out = []
            parts = [p for p in link.split("/") if p] + parts
            continue
        out.append(part)
    host = _host(layers, out)
    return ("/" + "/".join(out), host) if host is not None else None


def read_file(layers: Layers, path: str) -> bytes | None:
    """The content of the image's regular file ``path``; None when it has none there."""
    found = resolve(layers, path)
    if found is None or not os.path.isfile(found[1]) or os.path.islink(found[1]):
        return None
    with open(found[1], "rb") as f:
        return f.read()


def _executable(layers: Layers, path: str) -> bool:
    found = resolve(layers, path)
    if found is None:
        return False
    st = os.lstat(found[1])
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def find_executable(layers: Layers, argv0: str, path: str, *, cwd: str = "/") -> str | None:
    """Where the image has ``argv0`` (looked up on ``path`` unless it holds a ``/``): the path
    inside, as the service will exec it; None when the image has no such executable file."""
    if "/" in argv0:
        inside = posixpath.normpath(posixpath.join(cwd, argv0))
        return inside if _executable(layers, inside) else None
    for d in path.split(":"):
        if not d.startswith("/"):
            continue  # a relative PATH entry means the cwd of whoever looks: not ours to guess
        inside = d.rstrip("/") + "/" + argv0
        if _executable(layers, inside):
            return inside
    return None


def _table(layers: Layers, path: str) -> list[list[str]]:
    data = read_file(layers, path)
    if data is None:
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def resolve_user(layers: Layers, user: str, *, service: str | None = None
                 ) -> tuple[int, int, list[int], str]:  # fmt: skip
    """(uid, gid, supplementary groups, home) for an image's user, as runc reads it.

    ``user`` is ``""`` (root), ``name``, ``uid``, or either followed by ``:group`` or ``:gid``.
    A name is looked up in the image's ``/etc/passwd`` (a group name in its ``/etc/group``); a
    number need not be there. Without an explicit group the user gets its passwd group and the
    groups of ``/etc/group`` that list it; with one, that group alone. Home: the passwd entry's,
    else ``/``.
    """
    name, _, group = user.partition(":")
    passwd = [r for r in _table(layers, "/etc/passwd") if len(r) >= 7 and r[2].isdigit() and r[3].isdigit()]
    groups_tab = [r for r in _table(layers, "/etc/group") if len(r) >= 3 and r[2].isdigit()]
    entry = None
    if name == "" or name.isdigit():
        uid = int(name or 0)
        entry = next((r for r in passwd if int(r[2]) == uid), None)
    else:
        entry = next((r for r in passwd if r[0] == name), None)
        if entry is None:
            raise ConfigError(f"there is no user {name!r} in the image's /etc/passwd; use a user "
                              "the image defines, a numeric uid, or 'uid:gid'",
                              service=service, key="user")  # fmt: skip
        uid = int(entry[2])
    gid = int(entry[3]) if entry is not None else 0
    home = entry[5] if entry is not None and entry[5] else "/"
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            row = next((r for r in groups_tab if r[0] == group), None)
            if row is None:
                raise ConfigError(f"there is no group {group!r} in the image's /etc/group; use a "
                                  "group the image defines or a numeric gid",
                                  service=service, key="user")  # fmt: skip
            gid = int(row[2])
        return uid, gid, [gid], home
    member = entry[0] if entry is not None else None
    extra = {int(r[2]) for r in groups_tab
             if member is not None and len(r) > 3 and member in r[3].split(",")}  # fmt: skip
    return uid, gid, sorted(extra | {gid}), home
