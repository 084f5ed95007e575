"""One writer per run folder: RunLock, an exclusive fcntl.flock on <run>/run.lock held for the life of the run."""
from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from ..errors import RunFolderBusyError, UserError, excerpt


class RunLock:
    """One writer per run folder: an exclusive fcntl.flock on <run>/run.lock, held for the life of the run.

    The OS drops the lock when its holder dies, however it dies, so a lock left by a killed run is taken over
    (with a warning naming it); a live holder makes a second writer fail at once with RunFolderBusyError naming
    its pid, host and start time (written inside the file). The file is emptied, not deleted, on release:
    deleting it would let two processes lock two different files of the same name. run.lock is opened with
    O_NOFOLLOW and must be a regular file with one link, so the lock never truncates any other file.
    """

    NAME = "run.lock"

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self.fd = None

    def _holder(self, fd) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            h = json.loads(raw) if raw.strip() else {}
            return h if isinstance(h, dict) else {"unreadable": True}
        except (OSError, ValueError):
            return {"unreadable": True}

    @staticmethod
    def _describe(h: dict) -> str:
        def field(k, limit=40):
            v = h.get(k, "?")
            return v[:limit] if isinstance(v, str) else excerpt(v, limit)

        return (f"pid {field('pid')} on host {field('host')} (started {field('started')}, command "
                f"{field('command', 120)!r})")

    def _open(self) -> int:
        """The lock file's descriptor; a link or anything but a plain one-link file is refused, never followed."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o666)
        except OSError as e:
            if self.path.is_symlink():
                raise UserError(f"{str(self.path)!r} is a symbolic link: the run lock is never opened through a link "
                                "(it would empty the file it points to). Delete the link and run again") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
            raise UserError(f"{str(self.path)!r} is {what}: the run lock must be a file of its own (taking the lock "
                            "empties it). Delete it and run again")
        return fd

    def _busy(self, fd) -> RunFolderBusyError:
        return RunFolderBusyError(
            f"run folder {str(self.run_dir)!r} is in use by {self._describe(self._holder(fd))}: one run folder takes "
            "one writer (two would interleave checkpoints and metrics). Wait for it to finish or stop it, or choose "
            "another run_name")

    def check_free(self):
        """Raise RunFolderBusyError at once when a live process holds the lock (without taking it)."""
        import fcntl

        if not self.path.exists() and not self.path.is_symlink():
            return
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise self._busy(fd) from None
        except OSError:
            pass  # no locks on this filesystem: acquire() warns
        finally:
            os.close(fd)

    def acquire(self):
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = self._open()
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err = self._busy(fd)
            os.close(fd)
            raise err from None
        except OSError as e:  # a filesystem without locks (some network mounts): say so, do not pretend
            print(f"imm_fast: warning: cannot lock {str(self.path)!r} ({e}); this filesystem does not support file "
                  "locks, so nothing stops a second run from writing the same folder", file=sys.stderr, flush=True)
            locked = False
        prev = self._holder(fd)
        if prev and locked:
            print(f"imm_fast: taking over the lock of {str(self.run_dir)!r} left by {self._describe(prev)}, which no "
                  "longer holds it (it was killed)", file=sys.stderr, flush=True)
        elif prev:
            print(f"imm_fast: warning: {str(self.path)!r} names {self._describe(prev)}, which may still be running",
                  file=sys.stderr, flush=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "command": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing the file releases the lock anyway
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
