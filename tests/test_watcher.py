"""The dataset watcher (tasks/data/watcher.py): a re-scan learns what changed from its journal.

Each test starts a real watcher process on a folder under tmp_path (its home there too) and changes files
the ways a dataset changes; a change completed before ``sync()`` must be in ``changes()``."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.data import watcher

pytestmark = pytest.mark.skipif(watcher._platform_refusal() is not None,
                                reason=str(watcher._platform_refusal()))


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for folder in ("cats", "dogs/puppies", ".git/objects", "__pycache__"):
        (root / folder).mkdir(parents=True)
    for name in ("cats/1.jpg", "cats/2.jpg", "dogs/1.jpg", "dogs/puppies/1.jpg"):
        (root / name).write_bytes(b"jpeg")
    return root


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    yield h
    watcher.stop_all(h)


@pytest.fixture
def journal(data, home):
    watcher.start(data, home)
    j = watcher.Journal.find(data, home)
    assert j is not None
    return j


def _changes(j, action):
    """The changes journaled while ``action`` ran (a token taken just before it)."""
    before = (j.id, j.sync())
    action()
    return j.changes(before, j.sync())


def test_start_watches_every_visible_folder(data, home):
    r = watcher.start(data, home)
    assert r["started"] is True and r["root"] == os.path.realpath(data)
    assert r["folders"] == 4  # data, cats, dogs, dogs/puppies; not .git/objects nor __pycache__
    j = watcher.Journal.find(data, home)
    assert j.id == r["id"] and j.root == os.path.realpath(data)
    wdir = watcher.watch_dir(data, home)
    assert oct(wdir.stat().st_mode & 0o777) == "0o700" and oct(wdir.parent.stat().st_mode & 0o777) == "0o700"
    assert (wdir / "journal").read_bytes().split(b"\n", 1)[1] == b"R\0"  # ready, nothing changed yet
    assert [w["pid"] for w in watcher.running(home)] == [r["pid"]]
    assert j.changes((j.id, j.sync()), j.sync()) == set()


def test_every_kind_of_change_is_journaled(data, journal):
    f = data / "cats" / "1.jpg"
    assert _changes(journal, lambda: (data / "cats" / "3.jpg").write_bytes(b"new")) == {str(data / "cats" / "3.jpg")}

    def append():
        with open(f, "ab") as out:
            out.write(b"more")

    assert _changes(journal, append) == {str(f)}
    assert _changes(journal, lambda: os.utime(f, ns=(10**18, 10**18))) == {str(f)}
    assert _changes(journal, lambda: os.chmod(f, 0o600)) == {str(f)}
    assert _changes(journal, lambda: os.rename(f, data / "dogs" / "moved.jpg")) == {
        str(f), str(data / "dogs" / "moved.jpg")}
    assert _changes(journal, lambda: os.unlink(data / "cats" / "2.jpg")) == {str(data / "cats" / "2.jpg")}


def test_a_folder_created_with_files_already_inside_reports_them_all(data, home, journal):
    made = []

    def burst():
        for depth in ("new", "new/a", "new/a/b"):
            os.makedirs(data / depth, exist_ok=True)
            for i in range(5):
                p = data / depth / f"{i}.jpg"
                p.write_bytes(b"x")
                made.append(str(p))

    got = _changes(journal, burst)
    assert set(made) <= got and {str(data / "new"), str(data / "new/a"), str(data / "new/a/b")} <= got
    assert _changes(journal, lambda: (data / "new/a/b/late.jpg").write_bytes(b"y")) == {
        str(data / "new/a/b/late.jpg")}  # the new folders are watched
    assert watcher.running(home)[0]["folders"] == 4 + 3


def test_a_folder_moved_out_and_back_in(data, journal, tmp_path):
    outside = tmp_path / "elsewhere"
    assert _changes(journal, lambda: shutil.move(str(data / "dogs"), str(outside))) == {str(data / "dogs")}
    # changed while outside: not under the root, so not journaled (and no stale path under data/dogs)
    assert _changes(journal, lambda: (outside / "puppies" / "2.jpg").write_bytes(b"x")) == set()
    got = _changes(journal, lambda: shutil.move(str(outside), str(data / "dogs2")))
    assert got == {str(data / "dogs2"), str(data / "dogs2/1.jpg"), str(data / "dogs2/puppies"),
                   str(data / "dogs2/puppies/1.jpg"), str(data / "dogs2/puppies/2.jpg")}
    assert _changes(journal, lambda: (data / "dogs2/puppies/3.jpg").write_bytes(b"x")) == {
        str(data / "dogs2/puppies/3.jpg")}
    # moved inside the tree: the old and new paths; later events carry the new path only
    got = _changes(journal, lambda: os.rename(data / "dogs2", data / "cats" / "dogs"))
    assert {str(data / "dogs2"), str(data / "cats/dogs"), str(data / "cats/dogs/puppies/3.jpg")} <= got
    assert not any(p.startswith(str(data / "dogs2") + "/") for p in got)
    assert _changes(journal, lambda: os.unlink(data / "cats/dogs/puppies/1.jpg")) == {
        str(data / "cats/dogs/puppies/1.jpg")}


def test_hidden_files_and_folders_are_not_journaled(data, journal):
    def hidden():
        (data / ".DS_Store").write_bytes(b"x")
        (data / "cats" / "__init__.py").write_bytes(b"x")
        (data / ".git" / "objects" / "ab").write_bytes(b"x")
        (data / ".cache").mkdir()
        (data / ".cache" / "f").write_bytes(b"x")
        (data / "cats" / "4.jpg").write_bytes(b"x")  # the one visible change

    assert _changes(journal, hidden) == {str(data / "cats" / "4.jpg")}
    # a folder renamed from hidden to visible is scanned whole; the other way only its old path is journaled
    assert _changes(journal, lambda: os.rename(data / ".cache", data / "cache")) == {
        str(data / "cache"), str(data / "cache" / "f")}
    assert _changes(journal, lambda: os.rename(data / "cache", data / ".cache")) == {str(data / "cache")}


def test_changes_since_a_token_leave_out_what_came_before(data, journal):
    (data / "cats" / "early.jpg").write_bytes(b"x")
    start = journal.sync()
    token = (journal.id, start)
    (data / "cats" / "late.jpg").write_bytes(b"x")
    upto = journal.sync()
    assert journal.changes(token, upto) == {str(data / "cats" / "late.jpg")}
    assert str(data / "cats" / "early.jpg") in journal.changes((journal.id, len(_head(data, journal))), upto)
    assert journal.changes(("another-id", start), upto) is None
    assert journal.changes(token, upto + 1) is None          # beyond the journal
    assert journal.changes((journal.id, start + 1), upto) is None  # not at a record's start
    assert journal.changes((journal.id, upto), start) is None       # backwards


def _head(data, journal):
    return journal.path.read_bytes().split(b"\n", 1)[0] + b"\n"


def _send(data, home, request: bytes) -> bytes:
    sock = watcher.watch_dir(data, home) / "sock"
    address, dfd = watcher._connect_path(sock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(address)
            s.sendall(request)
            return s.recv(64)
    finally:
        if dfd is not None:
            os.close(dfd)


def test_lost_events_start_a_new_journal_and_the_watcher_goes_on(data, home, journal):
    old = journal.id
    token = (old, journal.sync())
    (data / "cats" / "before.jpg").write_bytes(b"x")
    assert _send(data, home, b"lose\n") == b"ok\n"
    fresh = watcher.Journal.find(data, home)
    assert fresh.id != old
    assert journal.changes(token, journal.sync()) is None  # the old token cannot be answered
    assert journal.id == fresh.id                         # sync() moved the object on to the new journal
    assert watcher.running(home)[0]["id"] == fresh.id
    token = (fresh.id, fresh.sync())
    (data / "cats" / "after.jpg").write_bytes(b"x")
    assert fresh.changes(token, fresh.sync()) == {str(data / "cats" / "after.jpg")}


def test_a_real_queue_overflow_is_lost_events(data, home, journal):
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow quickly")
    token = (journal.id, journal.sync())
    pid = watcher.running(home)[0]["pid"]
    a, b = data / "cats" / "1.jpg", data / "cats" / "2.jpg"
    os.kill(pid, signal.SIGSTOP)  # the watcher reads nothing while the queue fills up
    try:
        for _ in range(limit // 2 + 100):  # alternate files: the kernel merges only identical consecutive events
            os.utime(a)
            os.utime(b)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert journal.changes(token, journal.sync()) is None and journal.id != token[0]
    token = (journal.id, journal.sync())
    (data / "dogs" / "2.jpg").write_bytes(b"x")
    assert journal.changes(token, journal.sync()) == {str(data / "dogs" / "2.jpg")}


def test_a_lost_record_in_the_range_means_cannot_tell(data, journal):
    token = (journal.id, journal.sync())
    (data / "cats" / "x.jpg").write_bytes(b"x")
    upto = journal.sync()
    assert journal.changes(token, upto) == {str(data / "cats" / "x.jpg")}
    with open(journal.path, "ab") as f:  # what the watcher writes before it replaces the journal
        f.write(b"Lthe kernel's inotify queue overflowed\0")
    assert journal.changes(token, upto + len(b"Lthe kernel's inotify queue overflowed\0")) is None
    with open(journal.path, "ab") as f:
        f.write(b"C/unterminated")
    assert journal.changes((journal.id, os.path.getsize(journal.path) - 14), os.path.getsize(journal.path)) is None


def test_a_symbolic_link_is_refused(data, home, tmp_path):
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", data / "cats" / "more")
    with pytest.raises(watcher.WatchUnsupported, match="more is a symbolic link"):
        watcher.start(data, home)
    assert watcher.Journal.find(data, home) is None and watcher.running(home) == []
    os.unlink(data / "cats" / "more")
    watcher.start(data, home)
    j = watcher.Journal.find(data, home)
    os.symlink(tmp_path / "target", data / "dogs" / "link.jpg")  # one appearing later ends the watcher
    with pytest.raises(watcher.WatchLost):
        j.sync()
    assert watcher.Journal.find(data, home) is None
    assert "symbolic link appeared" in (watcher.watch_dir(data, home) / "refused").read_text()


def test_what_cannot_be_watched_is_refused_with_what_to_do(tmp_path, home):
    with pytest.raises(watcher.WatchUnsupported, match="not a folder"):
        watcher.start(tmp_path / "missing", home)
    info = (b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            b"40 22 0:50 / /mnt/my\\040data rw,relatime shared:30 - nfs4 server:/export rw,vers=4.2\n"
            b"41 22 0:51 / /mnt/fuse rw - fuse.sshfs host:/ rw\n")
    why = watcher._filesystem_refusal("/mnt/my data/images", info)
    assert "nfs4" in why and "/mnt/my data" in why and "other machines" in why
    assert "fuse.sshfs" in watcher._filesystem_refusal("/mnt/fuse/x", info)
    assert "nfs4" in watcher._filesystem_refusal("/mnt", info)  # a network mount below the root
    assert watcher._filesystem_refusal("/home/me/data", info) is None
    assert watcher._filesystem_refusal("/mnt/my", info) is None  # a prefix of a mount point is not under it


def test_stop_and_a_second_start(data, home, journal):
    first = watcher.start(data, home)
    again = watcher.start(data, home)
    assert first["started"] is False and again["started"] is False and again["pid"] == first["pid"]
    assert watcher.stop(data, home) is True
    assert watcher.Journal.find(data, home) is None
    wdir = watcher.watch_dir(data, home)
    assert not (wdir / "sock").exists() and not (wdir / "state.json").exists()
    assert watcher.stop(data, home) is False and watcher.running(home) == []
    with pytest.raises(watcher.WatchLost):
        journal.sync()


def test_a_killed_watcher_is_not_trusted_and_can_be_started_again(data, home, journal):
    pid = watcher.start(data, home)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while watcher.Journal.find(data, home) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watcher.Journal.find(data, home) is None and watcher.running(home) == []
    wdir = watcher.watch_dir(data, home)
    assert (wdir / "sock").exists()  # left behind by the killed one
    r = watcher.start(data, home)
    assert r["started"] is True and r["pid"] != pid
    j = watcher.Journal.find(data, home)
    assert j.id != journal.id
    assert _changes(j, lambda: (data / "cats" / "new.jpg").write_bytes(b"x")) == {str(data / "cats" / "new.jpg")}
    assert watcher.stop_all(home) == 1


def test_the_watched_folder_going_away_ends_the_watcher(data, home, journal, tmp_path):
    os.rename(data, tmp_path / "renamed")
    with pytest.raises(watcher.WatchLost):
        journal.sync()
    deadline = time.monotonic() + 5
    while watcher.running(home) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watcher.running(home) == []


def test_the_watcher_module_imports_nothing_heavy():
    code = ("import sys, tasks.data.watcher; "
            "bad = [m for m in ('tensorflow', 'prefect', 'numpy', 'h5py', 'cnncodes', 'storage', 'flows') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(Path(watcher.__file__).resolve().parents[2]))
    assert out.stdout.strip() == "[]", out.stderr


def test_the_watch_command(data, home, tmp_path, monkeypatch, capsys):
    import json

    from cnncodes.cli import main

    monkeypatch.setenv("CNNCODES_HOME", str(home))
    assert main(["watch", "start", str(data)]) == 0
    out = capsys.readouterr().out
    assert "watching" in out and "4 folders" in out and "instead of listing" in out
    assert main(["watch", "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["watchers"]
    assert [r["root"] for r in rows] == [os.path.realpath(data)] and rows[0]["folders"] == 4
    assert main(["watch", "stop", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stopped"] is True and watcher.running(home) == []
    assert main(["watch", "status"]) == 0 and "no watcher is running" in capsys.readouterr().out
    os.symlink(data / "cats", data / "link")
    assert main(["watch", "start", str(data), "--json"]) != 0
    said = capsys.readouterr()
    assert "symbolic link" in said.err and json.loads(said.out)["type"] == "CnncodesError"
    assert main(["watch", "stop"]) != 0 and "needs the dataset folder" in capsys.readouterr().err


def test_server_stop_stops_the_watchers(data, home, monkeypatch):
    from cnncodes import server

    monkeypatch.setenv("CNNCODES_HOME", str(home))
    monkeypatch.setattr(server, "_prefect", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", ""))
    watcher.start(data, home)
    r = server.stop()
    assert r["watchers_stopped"] == 1 and watcher.running(home) == []


def test_looking_for_a_watcher_creates_nothing(tmp_path):
    home = tmp_path / "home"
    data = tmp_path / "data"
    data.mkdir()
    assert watcher.Journal.find(data, home=home) is None
    assert not home.exists()
