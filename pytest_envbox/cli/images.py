"""``envbox pull``, ``envbox images`` and ``envbox prune``: the image store from the command line."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pytest_envbox.config import load_project_config
from pytest_envbox.engine.images import open_store
from pytest_envbox.errors import ConfigError, EnvboxError
from pytest_envbox.images.progress import Show, human_bytes, set_default_show
from pytest_envbox.images.pull import Puller, reference_of
from pytest_envbox.validate import parse_duration

__all__ = ["images", "line_printer", "prune", "pull"]


def line_printer(stream: TextIO) -> Show:
    """Progress for a terminal: one line rewritten in place; elsewhere (a CI log) a line every
    few seconds, so the log shows the pull moving without thousands of lines."""
    tty = stream.isatty()
    last = [0.0]

    def show(text: str, final: bool) -> None:
        if tty:
            stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            now = time.monotonic()
            if not final and now - last[0] < 3.0:
                return
            last[0] = now
            stream.write(text + "\n")
        stream.flush()

    return show


def pull(refs: Sequence[str], rootdir: Path) -> int:
    """Pull each reference (always asking the registry, as ``docker pull`` does) and unpack it."""
    try:
        insecure = load_project_config(rootdir).insecure_registries
    except ConfigError:
        insecure = ()  # a broken pyproject elsewhere must not stop a pull named on the command line
    set_default_show(line_printer(sys.stderr))
    puller = Puller(open_store(), insecure=insecure)
    failed = 0
    try:
        for text in refs:
            try:
                ref = reference_of(text, base=str(rootdir))
                image = puller.get(ref, "always")
            except EnvboxError as e:
                print(f"envbox: {e}", file=sys.stderr)
                failed += 1
                continue
            rec = image.record
            print(f"{rec.name} {rec.digest} {human_bytes(rec.size)} in {len(rec.layers)} "
                  f"layer{'s' if len(rec.layers) != 1 else ''}")  # fmt: skip
    finally:
        puller.close()
    return 1 if failed else 0


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size:
            n = int(s // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


def images() -> int:
    """The images in the store: reference, digest, size, last used."""
    store = open_store()
    found = sorted(store.images(), key=lambda r: r.name)
    if not found:
        print(f"envbox: no image in the store ({store.root})")
        return 0
    rows = [("REFERENCE", "DIGEST", "SIZE", "LAST USED")]
    rows += [(r.name, r.digest.split(":")[-1][:12], human_bytes(r.size), _ago(r.last_used))
             for r in found]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def prune(older_than: str | None) -> int:
    """Remove images unused for ``older_than`` (all images when given ``0``), then everything no
    remaining image needs."""
    seconds = None
    if older_than is not None:
        try:  # days too, as a store is pruned by the week ("7d"); spec durations stop at hours
            days = re.fullmatch(r"(\d+)d", older_than.strip())
            seconds = int(days[1]) * 86400.0 if days else parse_duration(older_than, key="--older-than")
        except ConfigError as e:
            print(f"envbox: {e}", file=sys.stderr)
            return 2
    store = open_store()
    items, freed = store.prune(seconds)
    print(f"envbox: removed {items} item{'s' if items != 1 else ''} from {store.root}, "
          f"{human_bytes(freed)} freed")  # fmt: skip
    return 0

