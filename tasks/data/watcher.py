"""A watcher of a dataset folder, so that a re-scan learns what changed without listing every file.

Why: a re-scan of a dataset that barely changed should cost what changed. The stat cache
(:mod:`tasks.data.statcache`) already spares reading unchanged files, but a scan still lists every folder
and stats every file: at 200,000 images, or a million, that alone takes seconds to minutes (more on a cold
cache or a slow disk). git solves the same problem for ``git status`` with its fsmonitor daemon: a process
that watches the working tree and answers "what changed since token T?". This is that daemon for a dataset.

How: ``python -m tasks.data.watcher ROOT`` (started in the background by :func:`start`) adds a Linux
inotify watch on every non-hidden folder under ROOT and appends each path the kernel reports as created,
written, having its attributes changed, deleted or moved in or out to an append-only **journal**
(``$CNNCODES_HOME/run/watch/<hash of ROOT>/journal``). A scan keeps, with its result, a token ``(journal
id, byte offset)``; the next scan asks the watcher to :meth:`Journal.sync` and reads the paths recorded
between its token and the new offset (:meth:`Journal.changes`): only those are stat'ed and read again.
A scan that has no token (the first, or after "cannot tell") takes one with ``sync()`` *before* it lists
everything, so that what changes while it lists falls in the next range.

Why sync is enough: inotify queues an event synchronously with the filesystem operation, inside the system
call (create, write, rename, unlink, chmod, utime), before that call returns. So when a scan calls
``sync()``, the event of every operation completed before that call is already in the watcher's queue; the
watcher reads its queue until it is empty, journals the events, and only then answers with the journal's
size. A folder created or moved into the tree is watched the moment its event is read, and everything
already inside it is journaled too (files may be created in it before the watch exists).

When the journal cannot tell, :meth:`Journal.changes` returns None and the scan lists everything, as it
does without a watcher: another journal (the watcher restarted, the kernel's queue overflowed, the journal
was rotated at 64 MiB), a ``lost`` record in the range, or a range that does not read back whole. The
watcher also ends itself (and :meth:`Journal.find` then returns None) when the watched folder is deleted or
moved, or a symbolic link appears under it.

Limits: Linux only (inotify); local filesystems only (NFS, SMB, CephFS, FUSE and the like are refused:
inotify does not see changes made by other machines, or by a FUSE daemon behind the kernel's back); no
symbolic links under the root (changes behind a link are not seen: refused); writes through a shared
``mmap`` are not reported by inotify (a file's close after writing is), nor are writes to a file through
a hard link of it outside the root; hidden files and folders (names starting with ``.`` or ``__``) are
neither watched nor journaled, as scans never read them. Each folder costs one inotify watch
(``fs.inotify.max_user_watches``, often 8192 to 1048576).

Standard library only, and nothing of the project is imported: the watcher process stays small.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# inotify(7)
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
MASK = (IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")  # struct inotify_event without its name: wd, mask, cookie, len

FORMAT = "cnncodes-watch"
VERSION = 1
ROTATE_BYTES = 64 << 20  # a journal past this size is replaced by a new one (new id: scans list everything once)
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "afs",
                        "fuse"})
_BATCH_RECORDS = 20000  # a drain writes to the journal at least this often
_LOCK_WAIT = 1.0  # seconds a starting watcher retries the lock (a client may hold it for a moment to test it)


class WatchUnsupported(Exception):
    """Why a folder cannot be watched (the message says what to do)."""


class WatchLost(Exception):
    """The watcher did not answer or died."""


class _Refuse(Exception):
    """Inside the watcher: stop, and tell start() why (written to ``refused``)."""


class _Gone(Exception):
    """Inside the watcher: the watched folder went away."""


class _Stop(Exception):
    """Inside the watcher: SIGTERM or SIGINT."""


# --- where things live -----------------------------------------------------------------------------------


def _home(home: Any = None) -> Path:
    return Path(home or os.environ.get("CNNCODES_HOME") or Path.home() / ".cnncodes")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


def watch_home(home: Any = None) -> Path:
    """``<home>/run/watch`` (home: ``home``, else ``$CNNCODES_HOME``, else ``~/.cnncodes``), created with mode
    0700 when needed: one folder per watched root below it."""
    path = _home(home) / "run" / "watch"
    if not path.is_dir():
        _home(home).mkdir(parents=True, exist_ok=True)
        _private_dir(path.parent)
    _private_dir(path)
    return path


def watch_dir(root: Any, home: Any = None, create: bool = True) -> Path:
    """The folder of the watcher of ``root``: lock, state.json, sock, journal, log. ``create``: make the
    folders above it where they are missing (a scan that only looks for a watcher creates nothing)."""
    base = watch_home(home) if create else _home(home) / "run" / "watch"
    return base / hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:16]


def _connect_path(path: Path) -> tuple[str, int | None]:
    """An address for a Unix socket at ``path``: the path itself, or ``/proc/self/fd/N/name`` through an open
    descriptor of its folder where the path is too long for ``sun_path`` (108 bytes). Returns the
    address and the descriptor to close afterwards (None when none was opened)."""
    if len(os.fsencode(path)) <= 100:
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


# --- what can be watched -----------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


def _platform_refusal() -> str | None:
    """Why this machine cannot watch anything (None: it can)."""
    if not sys.platform.startswith("linux"):
        return (f"watching a dataset needs Linux's inotify, and this is {sys.platform}: scans list the folder "
                "instead, which needs no watcher")
    try:
        _libc()
    except (OSError, AttributeError) as exc:
        return f"this C library has no inotify ({exc}): scans list the folder instead, which needs no watcher"
    return None


def _unescape(field: bytes) -> str:
    """A path of /proc/self/mountinfo: space, tab, newline and backslash are written as octal escapes."""
    out, i = bytearray(), 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def _mounts(mountinfo: bytes) -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` of each line of /proc/self/mountinfo, in its order."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split(b" ")
        if b"-" not in fields[6:] or len(fields) < 5:
            continue
        sep = fields.index(b"-", 6)
        if sep + 1 < len(fields):
            out.append((_unescape(fields[4]), os.fsdecode(fields[sep + 1])))
    return out


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


def _network(fstype: str) -> bool:
    return fstype in NETWORK_FS or fstype.startswith("fuse.")


def _filesystem_refusal(real: str, mountinfo: bytes | None = None) -> str | None:
    """Why ``real`` (a real path) is on, or holds, a filesystem whose changes inotify may not see."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                mountinfo = f.read()
        except OSError:
            return None  # no /proc: nothing known against it
    mounts = _mounts(mountinfo)
    best = None
    for point, fstype in mounts:  # the longest mount point above the root; of equal ones, the last mounted
        if _under(real, point) and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    below = [(p, t) for p, t in mounts if p != real and _under(p, real) and _network(t)]
    if best is not None and _network(best[1]):
        where = f"{real} is on a {best[1]} filesystem (mounted at {best[0]})"
    elif below:
        where = f"{below[0][0]}, under {real}, is a {below[0][1]} filesystem"
    else:
        return None
    return (f"{where}: inotify does not see changes made by other machines (or behind a FUSE daemon), so a "
            "watcher could miss them. Scans of it list the folder instead; to watch it, run the watcher on "
            "the machine whose disk holds it, or copy the dataset to a local disk.")


def _refusal(real: str) -> str | None:
    """The checks that need no walk of the tree: the platform, a folder, a local filesystem."""
    why = _platform_refusal()
    if why:
        return why
    if not os.path.isdir(real):
        return f"{real} is not a folder: give the dataset's folder"
    return _filesystem_refusal(real)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _link_refusal(path: str, root: str) -> str:
    return (f"{path} is a symbolic link: changes behind a link are not seen by inotify, so the watcher cannot "
            f"vouch for them. Replace the links under {root} by the files or folders themselves, or do without "
            "the watcher (scans then list the folder).")


# --- the watcher process --------------------------------------------------------------------------------


class _Watcher:
    """The watcher of one root: its inotify descriptor, the folder of each watch, the journal."""

    def __init__(self, root: str, wdir: Path) -> None:
        self.root = root
        self.wdir = wdir
        self.libc = _libc()
        self.ifd = -1
        self.paths: dict[int, str] = {}       # watch descriptor -> folder
        self.wds: dict[str, int] = {}         # folder -> watch descriptor
        self.kids: dict[str, set[str]] = {}   # folder -> its watched sub-folders
        self.root_wd = -1
        self.jfd = -1
        self.jsize = 0
        self.id = ""
        self.state_folders = -1  # the number of folders state.json says
        self.batch: dict[bytes, None] = {}    # records not yet written (ordered, each once)
        self.poller = select.poll()
        self.client: socket.socket | None = None  # the client being answered
        self.listener: socket.socket | None = None
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        st = os.stat(root)
        self.root_key = (st.st_dev, st.st_ino)

    # inotify
    def _open_inotify(self) -> None:
        if self.ifd >= 0:
            self.poller.unregister(self.ifd)
            os.close(self.ifd)
        fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            hint = (": raise fs.inotify.max_user_instances (sudo sysctl fs.inotify.max_user_instances=1024), "
                    "or stop other watchers" if err in (errno.EMFILE, errno.ENFILE) else "")
            raise _Refuse(f"inotify_init1 failed: {os.strerror(err)}{hint}")
        self.ifd = fd
        self.paths.clear()
        self.wds.clear()
        self.kids.clear()
        self.poller.register(fd, select.POLLIN)

    def _add_watch(self, folder: str) -> bool:
        """Watch ``folder``; False when it is gone already (its deletion's event follows)."""
        wd = self.libc.inotify_add_watch(self.ifd, os.fsencode(folder), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return False
            if err == errno.ENOSPC:
                raise _Refuse(f"the kernel's limit of inotify watches was reached after {len(self.paths)} folders "
                              f"of {self.root}: raise fs.inotify.max_user_watches (for example `sudo sysctl "
                              "fs.inotify.max_user_watches=1048576`), or stop other watchers")
            raise _Refuse(f"cannot watch {folder}: {os.strerror(err)}")
        self.paths[wd] = folder
        self.wds[folder] = wd
        if folder == self.root:
            self.root_wd = wd
        else:
            self.kids.setdefault(os.path.dirname(folder), set()).add(folder)
        return True

    def _add_tree(self, top: str, record: bool) -> None:
        """Watch ``top`` and every non-hidden folder below it, each before it is listed (what is created
        after the watch has its event; what was there before is listed); ``record``: journal every file
        and folder found (they may have been created before their folder was watched)."""
        stack = [top]
        while stack:
            folder = stack.pop()
            if not self._add_watch(folder):
                continue
            try:
                with os.scandir(folder) as it:
                    entries = [e for e in it if not _hidden(e.name)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise _Refuse(f"cannot list {folder}: {exc.strerror}") from exc
            for e in entries:
                if e.is_symlink():
                    raise _Refuse(_link_refusal(e.path, self.root))
                if record:
                    self._note(b"C", e.path)
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                except OSError:
                    pass

    def _forget_tree(self, top: str, remove: bool) -> None:
        """Drop the watches of ``top`` and the folders below it (``remove``: tell the kernel too: a folder
        moved out of the tree would go on reporting, under its old path)."""
        parent = self.kids.get(os.path.dirname(top))
        if parent is not None:
            parent.discard(top)
        stack = [top]
        while stack:
            folder = stack.pop()
            stack.extend(self.kids.pop(folder, ()))
            wd = self.wds.pop(folder, None)
            if wd is None:
                continue
            if self.paths.get(wd) == folder:
                del self.paths[wd]
            if remove:
                self.libc.inotify_rm_watch(self.ifd, wd)

    # the journal
    def _note(self, kind: bytes, text: str) -> None:
        self.batch[kind + os.fsencode(text)] = None
        if len(self.batch) >= _BATCH_RECORDS:
            self._flush()

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.jfd, view)
            view = view[n:]
        self.jsize += len(data)

    def _flush(self) -> None:
        if self.batch and self.jfd >= 0:
            data = b"".join(r + b"\0" for r in self.batch)
            self.batch.clear()
            self._append(data)
            if self.jsize > ROTATE_BYTES:
                self._lost("journal rotated")
                self._new_journal()
                self._write_state()
        self.batch.clear()

    def _lost(self, reason: str) -> None:
        """Journal what is pending, then a ``lost`` record: no range across it can be trusted."""
        self._flush()
        if self.jfd >= 0:
            self._append(b"L" + reason.encode("utf-8", "replace") + b"\0")

    def _new_journal(self) -> None:
        """A new journal with a new id (written aside, then moved over the old one), ending in ``ready``."""
        self.id = f"{os.getpid()}-{time.time_ns()}"
        header = json.dumps({"format": FORMAT, "version": VERSION, "root": self.root, "id": self.id}).encode() + b"\n"
        tmp = self.wdir / "journal.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        old, self.jfd, self.jsize = self.jfd, fd, 0
        self._append(header + b"R\0")
        os.replace(tmp, self.wdir / "journal")
        if old >= 0:
            os.close(old)

    def _write_state(self) -> None:
        self.state_folders = len(self.paths)
        data = {"root": self.root, "pid": os.getpid(), "id": self.id, "folders": self.state_folders,
                "started_at": self.started_at}
        tmp = self.wdir / "state.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.wdir / "state.json")

    def _reinit(self, reason: str) -> None:
        """Events were lost: say so in the journal, watch everything again and start a new journal."""
        self._lost(reason)
        self._open_inotify()
        self._add_tree(self.root, record=False)
        self._new_journal()
        self._write_state()

    # events
    def _event(self, wd: int, mask: int, name: bytes) -> bool:
        """Handle one event; True when the inotify descriptor was replaced (the rest of the read is stale)."""
        if mask & IN_Q_OVERFLOW:
            self._reinit("the kernel's inotify queue overflowed (fs.inotify.max_queued_events): changes were lost")
            return True
        path = self.paths.get(wd)
        if mask & IN_IGNORED:
            if path is not None:
                del self.paths[wd]
                if self.wds.get(path) == wd:
                    del self.wds[path]
            return False
        if path is None:
            return False
        if wd == self.root_wd and mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            raise _Gone(f"{self.root} was {'moved' if mask & IN_MOVE_SELF else 'deleted or unmounted'}")
        if mask & IN_UNMOUNT:
            self._reinit(f"a filesystem under {self.root} was unmounted ({path})")
            return True
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            return False  # the folder's parent reports it
        if not name:  # the folder's own attributes: its parent reports them too; the root's touch no file
            return False
        text = os.fsdecode(name.split(b"\0", 1)[0])
        if _hidden(text):
            return False
        full = path + text if path.endswith("/") else path + "/" + text
        self._note(b"C", full)
        if mask & IN_ISDIR:
            if mask & (IN_CREATE | IN_MOVED_TO):
                self._add_tree(full, record=True)
            elif mask & (IN_MOVED_FROM | IN_DELETE):
                self._forget_tree(full, remove=bool(mask & IN_MOVED_FROM))
        elif mask & (IN_CREATE | IN_MOVED_TO):
            try:
                link = stat.S_ISLNK(os.lstat(full).st_mode)
            except OSError:
                link = False
            if link:
                raise _Refuse("a symbolic link appeared: " + _link_refusal(full, self.root))
        return False

    def drain(self) -> None:
        """Read the inotify descriptor until it is empty, journaling every event."""
        while True:
            try:
                data = os.read(self.ifd, 1 << 18)
            except BlockingIOError:
                break
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _cookie, n = _EVENT.unpack_from(data, off)
                name = data[off + _EVENT.size: off + _EVENT.size + n]
                off += _EVENT.size + n
                if self._event(wd, mask, name):
                    break
        self._flush()
        if len(self.paths) != self.state_folders:
            self._write_state()

    def check_root(self) -> None:
        try:
            st = os.stat(self.root)
        except OSError:
            raise _Gone(f"{self.root} is gone") from None
        if (st.st_dev, st.st_ino) != self.root_key:
            raise _Gone(f"{self.root} is another folder now (moved or replaced)")

    # the process
    def setup(self) -> None:
        self._open_inotify()
        self._add_tree(self.root, record=False)
        self._new_journal()

    def serve(self, sock_path: Path) -> None:
        address, dfd = _connect_path(sock_path)
        # Kept on the watcher, not in a local: closed by run() only after the lock is released, so that a
        # client whose connection ends finds no watcher.
        self.listener = listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address)
        finally:
            if dfd is not None:
                os.close(dfd)
        listener.listen(16)
        listener.setblocking(False)
        self.poller.register(listener.fileno(), select.POLLIN)
        self._write_state()  # ready: start() waits for this
        sys.stderr.write(f"watching {self.root}: {len(self.paths)} folders, journal {self.id}\n")
        sys.stderr.flush()
        while True:
            for fd, _ev in self.poller.poll():
                if fd == self.ifd:
                    self.drain()
                elif fd == listener.fileno():
                    self._client(listener)

    def _client(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        # Left open when the watcher ends while answering (the root went away, a link appeared): run()
        # closes it after the lock is released, so that a client told "no answer" finds no watcher.
        self.client = conn
        try:
            conn.settimeout(2.0)
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = conn.recv(64)
                if not chunk:
                    break
                line += chunk
            request = line.strip()
            if request == b"sync":
                self.check_root()
                self.drain()
                reply = f"{self.jsize}\n".encode()
            elif request == b"lose":  # for tests: what a queue overflow does
                self.drain()
                self._reinit("lost on request")
                reply = b"ok\n"
            else:
                reply = b"error: unknown request\n"
            conn.sendall(reply)
        except OSError:
            pass  # that client went away; the next one is served
        self.client = None
        conn.close()


def _take_lock(wdir: Path) -> int | None:
    fd = os.open(wdir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.02)


def _write_refused(wdir: Path, reason: str) -> None:
    tmp = wdir / "refused.tmp"
    tmp.write_text(reason)
    os.replace(tmp, wdir / "refused")
    sys.stderr.write(f"refused: {reason}\n")


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def run(root: str, home: Any = None) -> int:
    """The watcher process: 0 when stopped by a signal, 1 when the root went away, 2 when it refuses (the
    reason in ``refused``), 3 when another watcher holds the root already."""
    real = os.path.realpath(root)
    wdir = watch_dir(real, home)
    why = _refusal(real)
    if why:
        _write_refused(wdir, why)
        return 2
    lock = _take_lock(wdir)
    if lock is None:
        sys.stderr.write(f"another watcher watches {real} already\n")
        return 3
    sock, state = wdir / "sock", wdir / "state.json"
    _remove(sock, state, wdir / "refused", wdir / "journal.tmp", wdir / "state.json.tmp")

    def stop(_signum, _frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    w = None
    try:
        w = _Watcher(real, wdir)
        w.setup()
        w.serve(sock)
    except _Stop:
        return 0
    except _Refuse as exc:
        if w is not None:
            w._lost(str(exc))
        _write_refused(wdir, str(exc))
        return 2
    except _Gone as exc:
        if w is not None:
            w._lost(str(exc))
        sys.stderr.write(f"stopped: {exc}\n")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _remove(state, sock)
        os.close(lock)
        for conn in (w.client, w.listener) if w is not None else ():
            if conn is not None:
                conn.close()
    return 0


# --- the clients' side ---------------------------------------------------------------------------------


def _lock_held(wdir: Path) -> bool:
    """Whether a watcher holds ``wdir``'s lock (a live one: the kernel drops the lock with the process)."""
    try:
        fd = os.open(wdir / "lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _state(wdir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((wdir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one that exited and was not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


_children: list[subprocess.Popen] = []  # watchers this process started: kept to be reaped once they exit


def _reap() -> None:
    _children[:] = [p for p in _children if p.poll() is None]


def _is_watcher(pid: int) -> bool:
    """Whether ``pid`` runs this module (a recorded pid may have been reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        return b"tasks.data.watcher" in cmdline or b"watcher.py" in cmdline
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc to tell: trust the record


def _header(path: Path) -> tuple[dict[str, Any], int] | None:
    """The journal's header and its length in bytes, or None."""
    try:
        with open(path, "rb") as f:
            line = f.readline(4096)
    except OSError:
        return None
    if not line.endswith(b"\n"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        return None
    return data, len(line)


def _live_state(wdir: Path, wait: float = 0.0) -> dict[str, Any] | None:
    """The state of the live, ready watcher of ``wdir`` (waiting up to ``wait`` s for one that is starting)."""
    deadline = time.monotonic() + wait
    while True:
        if not _lock_held(wdir):
            return None
        st = _state(wdir)
        if st is not None and _alive(st["pid"]):
            return st
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _result(st: dict[str, Any], started: bool) -> dict[str, Any]:
    return {"root": st["root"], "pid": st["pid"], "id": st["id"], "folders": st["folders"], "started": started}


def start(root: Any, home: Any = None, timeout: float = 60.0) -> dict[str, Any]:
    """Start a detached watcher of ``root`` unless one is alive already, and wait until it watches every
    folder. Returns ``{"root", "pid", "id", "folders", "started"}``; WatchUnsupported (what to do) when the
    folder cannot be watched, WatchLost when the watcher died or was not ready within ``timeout`` s."""
    real = os.path.realpath(root)
    why = _refusal(real)
    if why:
        raise WatchUnsupported(why)
    wdir = watch_dir(real, home)
    _private_dir(wdir)
    deadline = time.monotonic() + timeout
    if _lock_held(wdir):
        st = _live_state(wdir, wait=timeout)
        if st is not None:
            return _result(st, started=False)
    _remove(wdir / "refused")
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")])))
    _reap()
    with open(wdir / "log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.data.watcher", real, "--home", str(_home(home))],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd="/", env=env,
                                start_new_session=True)
    _children.append(proc)
    while True:
        st = _state(wdir)
        if st is not None and st["pid"] == proc.pid:
            return _result(st, started=True)
        code = proc.poll()
        if code is not None:
            if code == 3:  # another start() won the race: its watcher is the one
                st = _live_state(wdir, wait=max(0.0, deadline - time.monotonic()))
                if st is not None:
                    return _result(st, started=False)
            try:
                reason = (wdir / "refused").read_text().strip()
            except OSError:
                reason = ""
            if code == 2 and reason:
                raise WatchUnsupported(reason)
            raise WatchLost(f"the watcher of {real} exited with status {code}: {_log_tail(wdir)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise WatchLost(f"the watcher of {real} was not ready after {timeout:g} s: {_log_tail(wdir)}")
        time.sleep(0.01)


def _log_tail(wdir: Path) -> str:
    try:
        said = (wdir / "log").read_text(errors="replace").strip()[-600:]
    except OSError:
        said = ""
    return (said or "its log is empty") + f" (log: {wdir / 'log'})"


def _stop_dir(wdir: Path) -> bool:
    if not _lock_held(wdir):
        _remove(wdir / "sock", wdir / "state.json")  # left by a killed watcher
        return False
    st = _live_state(wdir, wait=5.0)
    if st is None or not _is_watcher(st["pid"]):
        return False
    pid = st["pid"]
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _lock_held(wdir):
                _reap()
                _remove(wdir / "sock", wdir / "state.json")
                return True
            time.sleep(0.02)
    return True


def stop(root: Any, home: Any = None) -> bool:
    """Stop the watcher of ``root``; True when a live one was stopped."""
    return _stop_dir(watch_dir(root, home))


def _watch_dirs(home: Any) -> list[Path]:
    base = _home(home) / "run" / "watch"
    try:
        return sorted(p for p in base.iterdir() if p.is_dir())
    except OSError:
        return []


def stop_all(home: Any = None) -> int:
    """Stop every watcher under :func:`watch_home`; returns how many were stopped."""
    return sum(_stop_dir(d) for d in _watch_dirs(home))


def running(home: Any = None) -> list[dict[str, Any]]:
    """The live watchers: root, pid, id, folders, journal_bytes, started_at."""
    out = []
    for d in _watch_dirs(home):
        st = _live_state(d)
        if st is None:
            continue
        head = _header(d / "journal")
        try:
            size = os.stat(d / "journal").st_size
        except OSError:
            size = 0
        out.append({"root": st["root"], "pid": st["pid"], "id": head[0]["id"] if head else st["id"],
                    "folders": st["folders"], "journal_bytes": size, "started_at": st["started_at"]})
    return out


class Journal:
    """The journal of a live watcher: :meth:`sync` then :meth:`changes` since a scan's token."""

    def __init__(self, wdir: Path, id: str, root: str) -> None:
        self.wdir = wdir
        self.path = wdir / "journal"
        self.id = id
        self.root = root

    @classmethod
    def find(cls, root: Any, home: Any = None) -> Journal | None:
        """The journal of the live watcher of ``root``; None when no watcher watches it."""
        real = os.path.realpath(root)
        wdir = watch_dir(real, home, create=False)
        if _live_state(wdir) is None:
            return None
        head = _header(wdir / "journal")
        if head is None or head[0].get("root") != real:
            return None
        return cls(wdir, str(head[0]["id"]), real)

    def _ask(self, request: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        try:
            address, dfd = _connect_path(self.wdir / "sock")
        except OSError as exc:
            raise WatchLost(f"the watcher of {self.root} is gone ({exc})") from exc
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout)
            conn.connect(address)
            conn.sendall(request)
            reply = b""
            while not reply.endswith(b"\n"):
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = conn.recv(256)
                if not chunk:
                    raise WatchLost(f"the watcher of {self.root} closed the connection without answering "
                                    f"(it stopped: {_log_tail(self.wdir)})")
                reply += chunk
            return reply
        except socket.timeout as exc:
            raise WatchLost(f"the watcher of {self.root} did not answer within {timeout:g} s") from exc
        except OSError as exc:
            raise WatchLost(f"the watcher of {self.root} did not answer ({exc})") from exc
        finally:
            conn.close()
            if dfd is not None:
                os.close(dfd)

    def _current_id(self) -> str:
        head = _header(self.path)
        if head is None:
            raise WatchLost(f"the journal of {self.root} is gone or damaged ({self.path})")
        return str(head[0]["id"])

    def sync(self, timeout: float = 5.0) -> int:
        """Have the watcher journal every pending event; returns the journal offset that covers every change
        completed before this call. Where the watcher started a new journal meanwhile (lost events),
        :attr:`id` becomes the new journal's: a token of the old one then gives None from :meth:`changes`."""
        for _ in range(5):
            before = self._current_id()
            reply = self._ask(b"sync\n", timeout)
            after = self._current_id()
            try:
                offset = int(reply.split()[0])
            except (ValueError, IndexError):
                raise WatchLost(f"the watcher of {self.root} answered {reply[:80]!r}") from None
            if before == after:  # the offset is of this journal
                self.id = after
                return offset
        raise WatchLost(f"the watcher of {self.root} keeps replacing its journal (events are being lost)")

    def changes(self, since: tuple[str, int], upto: int) -> set[str] | None:
        """Absolute paths (files and folders) created, written, changed in attributes, deleted or moved in or
        out between the token ``since`` (journal id, offset) and offset ``upto`` (from :meth:`sync`). A folder
        among them is to be looked at again, with what was known under it: one created or moved in comes
        with everything found inside it, but one moved out (or away within the tree) comes alone. None when
        the journal cannot tell (another journal, events lost in between, a range that does not read back
        whole): the scan then lists everything."""
        sid, start = since
        if sid != self.id or not isinstance(start, int) or start > upto:
            return None
        try:
            f = open(self.path, "rb")
        except OSError:
            return None
        with f:
            line = f.readline(4096)
            try:
                head = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                head = None
            if not isinstance(head, dict) or head.get("id") != sid or start < len(line):
                return None
            if os.fstat(f.fileno()).st_size < upto:
                return None
            f.seek(start - 1)
            data = f.read(upto - start + 1)
        if len(data) != upto - start + 1 or data[:1] not in (b"\0", b"\n"):
            return None  # short, or not at a record's start
        data = data[1:]
        if data and not data.endswith(b"\0"):
            return None
        out: set[str] = set()
        for record in set(data.split(b"\0")[:-1]):  # a path changed many times is decoded once
            kind = record[:1]
            if kind == b"C" and len(record) > 1:
                out.add(os.fsdecode(record[1:]))
            elif kind != b"R":  # lost, or damaged
                return None
        return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.data.watcher",
                                     description="Watch a dataset folder and journal what changes in it (Linux).")
    parser.add_argument("root", help="the dataset folder")
    parser.add_argument("--home", help="cnncodes home (default: $CNNCODES_HOME, else ~/.cnncodes)")
    args = parser.parse_args(argv)
    return run(args.root, args.home)


if __name__ == "__main__":
    sys.exit(main())
