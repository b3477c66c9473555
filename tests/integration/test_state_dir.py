"""The state directory (run records, the janitor's lock) cannot be taken over by another user.

Rootless, it is ``/tmp/envbox-<uid>`` (or ``$XDG_RUNTIME_DIR/envbox``): a name anyone can
predict, in a directory anyone can write. The attacker is another uid that makes it first (mode
0777) and plants a link and records in it; the victim is a fresh uid that runs envbox there.
Those tests need root (to be both) and run the real engine as the victim: its supervisor, its
path rules, its ``envbox ps`` and ``envbox clean``. The janitor's tests run as whoever runs the
suite (root, and ``envbox-ci`` in the rootless lane).
"""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_envbox.supervisor import records
from pytest_envbox.supervisor.records import janitor, state_dir

REPO = Path(__file__).parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # this test run's own may live under /root (mode 0700)

# As the victim: the lean import the supervisor itself uses (standard library only), then the
# engine's first step (a supervisor: the janitor, its lock, hello), `envbox ps` and `envbox clean`.
VICTIM = """
import contextlib, io, json, sys, types
p = types.ModuleType("pytest_envbox"); p.__path__ = [sys.argv[1]]; sys.modules["pytest_envbox"] = p
from pytest_envbox.cli import main
from pytest_envbox.engine.client import SupervisorClient
from pytest_envbox.errors import HostUnsupported
out = {}
try:
    SupervisorClient().close()
    out["supervisor"] = "started"
except HostUnsupported as e:
    out["supervisor"] = str(e)
for cmd in ("ps", "clean"):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        out[cmd] = [main([cmd]), err.getvalue()]
print(json.dumps(out))
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plays two users: needs root")


@pytest.fixture(scope="module")
def package() -> Iterator[str]:
    """A copy of the package any user can read (the checkout may be under /root)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} to run as another user")
    d = tempfile.mkdtemp(prefix="state-pkg-")
    try:
        shutil.copytree(REPO / "pytest_envbox", f"{d}/pytest_envbox",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for root, dirs, files in os.walk(d):
            for n in [*dirs, *files]:
                os.chmod(os.path.join(root, n), 0o755 if n in dirs else 0o644)
        os.chmod(d, 0o755)
        yield f"{d}/pytest_envbox"
    finally:
        shutil.rmtree(d)


def free_uid() -> int:
    """A uid no account has, whose state directory does not exist: a fresh victim or attacker."""
    while True:
        uid = random.randrange(1_700_000, 1_900_000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if not os.path.lexists(f"/tmp/envbox-{uid}"):
                return uid


@pytest.fixture
def victim() -> Iterator[int]:
    uid = free_uid()
    yield uid
    shutil.rmtree(f"/tmp/envbox-{uid}", ignore_errors=True)


def private_dir(uid: int) -> str:
    """A temporary directory of ``uid``'s own, mode 0700 (where an attacker's link points)."""
    d = tempfile.mkdtemp(prefix="victim-")
    os.chown(d, uid, uid)
    return d


def run_as(uid: int, package: str, **env: str) -> dict[str, object]:
    r = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         "env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", *(f"{k}={v}" for k, v in env.items()),
         SYSTEM_PYTHON, "-S", "-c", textwrap.dedent(VICTIM), package],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout.splitlines()[-1])
    return out


def tree(d: str) -> dict[str, tuple[int, int, str]]:
    """What is in ``d``: name -> (owner, mode, link target or "")."""
    out = {}
    for n in os.listdir(d):
        st = os.lstat(os.path.join(d, n))
        link = os.readlink(os.path.join(d, n)) if stat.S_ISLNK(st.st_mode) else ""
        out[n] = (st.st_uid, stat.S_IMODE(st.st_mode), link)
    return out


@needs_root
def test_a_state_directory_made_first_by_another_user_is_refused_and_nothing_in_it_is_used(
        package: str, victim: int) -> None:  # fmt: skip
    attacker = free_uid()
    state = f"/tmp/envbox-{victim}"
    mine = private_dir(victim)  # the victim's files: a link target, and a live run's directory
    live = tempfile.mkdtemp(prefix="envbox-")
    try:
        Path(live, "data").write_text("precious")
        os.chown(live, victim, victim)
        os.mkdir(state)
        os.chown(state, attacker, attacker)
        os.chmod(state, 0o777)
        # The attacker's plants: a link where the janitor makes its lock, and a dead run's
        # record listing the victim's live directory (the janitor deletes what records list).
        os.symlink(f"{mine}/planted", f"{state}/janitor.lock")
        Path(state, "envbox-999999999-1.json").write_text(json.dumps({"dirs": [live]}))
        before = tree(state)

        out = run_as(victim, package)

        why = str(out["supervisor"])
        assert f"state directory {state} cannot be used" in why
        assert f"owned by uid {attacker} with mode 0777" in why
        assert f"rm -rf {state}" in why and "XDG_RUNTIME_DIR" in why
        for cmd in ("ps", "clean"):  # the command line refuses it too, with the same words
            code, err = out[cmd]  # type: ignore[misc]
            assert code == 1 and f"state directory {state} cannot be used" in err
        assert tree(state) == before, "something was written in the attacker's directory"
        assert os.listdir(mine) == [], "the planted link was followed"
        assert Path(live, "data").read_text() == "precious", "a planted record was obeyed"
    finally:
        shutil.rmtree(mine)
        shutil.rmtree(live)


@needs_root
def test_a_state_directory_of_ours_but_open_to_others_is_tightened_and_a_link_in_it_replaced(
        package: str, victim: int) -> None:  # fmt: skip
    """Ours with mode 0755 (as envbox made it before): tightened to 0700, and used. A link where
    a file is made is replaced by the file, never followed."""
    state = f"/tmp/envbox-{victim}"
    mine = private_dir(victim)
    try:
        os.mkdir(state)
        os.chmod(state, 0o755)
        os.symlink(f"{mine}/planted", f"{state}/janitor.lock")
        os.chown(f"{state}/janitor.lock", victim, victim, follow_symlinks=False)
        os.chown(state, victim, victim)

        out = run_as(victim, package)

        assert out["supervisor"] == "started"
        assert out["ps"] == [0, ""] and out["clean"] == [0, ""]
        assert stat.S_IMODE(os.lstat(state).st_mode) == 0o700
        lock = os.lstat(f"{state}/janitor.lock")
        assert stat.S_ISREG(lock.st_mode) and lock.st_uid == victim
        assert os.listdir(mine) == [], "the link was followed"
    finally:
        shutil.rmtree(mine)


@needs_root
def test_xdg_runtime_dir_holds_the_state_only_when_it_is_private(package: str, victim: int) -> None:
    runtime = private_dir(victim)  # as systemd's /run/user/<uid>: the user's, mode 0700
    try:
        assert run_as(victim, package, XDG_RUNTIME_DIR=runtime)["supervisor"] == "started"
        assert stat.S_IMODE(os.lstat(f"{runtime}/envbox").st_mode) == 0o700
        assert "janitor.lock" in os.listdir(f"{runtime}/envbox")
        assert not os.path.lexists(f"/tmp/envbox-{victim}")

        shutil.rmtree(f"{runtime}/envbox")
        os.chmod(runtime, 0o777)  # open to others: not used; the /tmp rules apply
        assert run_as(victim, package, XDG_RUNTIME_DIR=runtime)["supervisor"] == "started"
        assert not os.path.lexists(f"{runtime}/envbox")
        assert stat.S_IMODE(os.lstat(f"/tmp/envbox-{victim}").st_mode) == 0o700
    finally:
        shutil.rmtree(runtime)


def test_the_janitor_deletes_only_envbox_temporary_directories_of_ours(tmp_path: Path) -> None:
    """A dead run's record lists directories to delete. A record is data: whatever it lists,
    only a directory ``Environment`` made (``mkdtemp(prefix="envbox-")``, ours, in the temporary
    directory) goes; never one outside, behind a link or ``..``, another user's, or the state
    directory itself."""
    tmp = tempfile.gettempdir()
    victim = tempfile.mkdtemp(prefix="victim-")
    Path(victim, "marker").write_text("precious")
    link = tempfile.mktemp(prefix="envbox-")  # a name of the form the janitor removes
    os.symlink(victim, link)
    ours = tempfile.mkdtemp(prefix="envbox-")  # what the janitor is for
    Path(ours, "log").write_text("x")
    listed = [victim, link, f"{tmp}/envbox-abcdefgh/../{os.path.basename(victim)}",
              state_dir(), ours]  # fmt: skip
    theirs = None
    if os.geteuid() == 0:  # another user's directory of that form (root could delete it)
        theirs = tempfile.mkdtemp(prefix="envbox-")
        Path(theirs, "marker").write_text("theirs")
        os.chown(theirs, 65534, 65534)
        listed.append(theirs)
    record = os.path.join(state_dir(), "envbox-999999998-1.json")  # no such process: a dead run
    try:
        with janitor() as mine:  # no supervisor starting meanwhile cleans it first
            assert mine
            Path(record).write_text(json.dumps({"dirs": listed}))
            r = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "clean"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"removed {record}" in r.stdout and not os.path.exists(record)
        assert not os.path.exists(ours), r.stdout
        assert Path(victim, "marker").read_text() == "precious", r.stdout
        assert os.path.islink(link) and os.path.isdir(state_dir())
        assert theirs is None or Path(theirs, "marker").read_text() == "theirs"
    finally:
        shutil.rmtree(victim)
        os.unlink(link)
        shutil.rmtree(ours, ignore_errors=True)
        if theirs:
            shutil.rmtree(theirs)
        if os.path.lexists(record):
            os.unlink(record)


def test_a_record_is_written_as_a_new_file_never_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.symlink(victim, state / "envbox-1-1.json.tmp")  # where the record is written first
    os.symlink(victim, state / "envbox-1-1.json")  # and the name it then takes
    records.write("envbox-1-1", {"supervisor": 1}, str(state))
    assert victim.read_text() == "precious"
    assert not os.path.islink(state / "envbox-1-1.json")
    assert json.loads((state / "envbox-1-1.json").read_text()) == {"supervisor": 1}
    assert stat.S_IMODE(os.lstat(state).st_mode) == 0o700  # (ours: tightened)
