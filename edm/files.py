"""What the project writes to disk and how it compares records: atomic writes, JSON records, folder locks.

- atomic_write / write_json: a file appears whole or not at all; a failed write is an
  OutputWriteError that names the folder and its free space.
- FolderLock: one process at a time owns a folder (a training run, a sampler's output, a study).
- to_container / flatten / differences: nested configs and records as plain containers, and the
  dotted keys where two of them differ (provenance records, resume checks).
- file_sha256: a file's identity, whatever its path; zip_crc_failure: an archive's damaged member; package_version:
  the code's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

__all__ = [
    "OutputWriteError", "atomic_write", "write_error", "write_json", "FolderInUseError", "FolderLock", "folder_holder", "folder_turn",
    "to_container", "flatten", "differences", "read_record", "zip_crc_failure", "png_is_whole", "png_cut_short", "file_sha256", "package_version",
]


logger = logging.getLogger(__name__)


class OutputWriteError(OSError):
    """A file could not be written (disk full, read-only or missing permission); names the folder."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], durable: bool = True) -> Path:
    """Write `path` through `write(f)` on a temp file in the same folder, then os.replace.

    A crash never leaves half a `path`: a killed writer leaves only `.NAME.XXXX.tmp`, which no
    glob for the real files (checkpoint-*.pt, *.npz, *.png) matches. `durable` also fsyncs the
    file and the folder (survives a machine crash; skipped for many small files). A failed
    write (disk full, read-only folder; torch.save reports these as RuntimeError) removes the
    temp file and raises OutputWriteError naming the folder and the free space.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed however the write ends
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; these are ordinary files
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and isinstance(err.__context__, OSError):  # torch.save on a full disk:
            err = err.__context__  # "unexpected pos ..." raised while handling the file's ENOSPC
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and "write" in str(err)):
            raise write_error(path, err) from None
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def write_error(path: Path, err: BaseException) -> OutputWriteError:
    """One line: what could not be written, where, why, and how much room the folder has."""
    try:
        stat = os.statvfs(path.parent)
        free = stat.f_bavail * stat.f_frsize
        room = f"; {free / 2**30:.2f} GiB free there" if free >= 2**30 else f"; {free / 2**20:.1f} MiB free there"
    except OSError:
        room = ""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    error = OutputWriteError(f"cannot write {path.name} in {path.parent}: {reason}{room}")
    error.errno = getattr(err, "errno", None)
    return error


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


class FolderInUseError(FileExistsError):
    """Another process (a training, a sampler, a study) owns the folder; `holder` says which ('a training (pid ...)')."""

    def __init__(self, message: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.holder = holder


class FolderLock:
    """An exclusive OS lock (flock) on FOLDER/.lock while one process owns the folder.

    The kernel releases it when the process ends, however it ends, so a killed run never
    blocks the next one (a lock whose recorded owner has ended, held on by the processes it forked, is waited for
    up to ENDED_OWNER_GRACE_S). The file records what owns the folder (`owner`: training, sampler, ...),
    its pid, host and start time, for the message a second process gets: "out DIR is in use by a
    training (pid ...)", whatever the second process is; `key` is the option that names the folder.
    `wait` makes the second process wait for the first to finish instead (a shared cache entry). `created` says
    whether acquire made the folder itself (the operating system's mkdir of it, not of its parents, succeeded).
    """

    def __init__(self, folder: str | Path, key: str = "run_dir", owner: str = "training", wait: bool = False) -> None:
        self.path = Path(folder) / ".lock"
        self.key, self.owner, self.wait = key, owner, wait
        self._fd: int | None = None
        self.created = False

    def acquire(self) -> "FolderLock":
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise OutputWriteError(f"{self.key}={folder} is a file, not a folder: pass {self.key}=DIR, a folder's path")
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(folder)
                self.created = True
            except FileExistsError:
                self.created = False
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a read-only or foreign folder
            raise write_error(self.path, err) from None
        try:
            self._lock(fd)
            os.ftruncate(fd, 0)
            record = {"owner": self.owner, "pid": os.getpid(), "host": os.uname().nodename, "started": time.ctime()}
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException as err:
            os.close(fd)  # drops the lock if it was taken
            if isinstance(err, OSError) and not isinstance(err, FolderInUseError):  # no locks on this file system
                raise write_error(self.path, err) from None
            raise
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        """flock fd exclusively: at once, or after the holder ends (wait), else FolderInUseError naming the holder."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = os.pread(fd, 4096, 0)
            ended = _owner_ended(record)
            if ended:
                if _lock_within(fd, ENDED_OWNER_GRACE_S):  # its forked children let go
                    return
                record = os.pread(fd, 4096, 0)  # a new owner may have taken it and written its own record since
                ended = _owner_ended(record)
            holder = _lock_holder(record) + (", which has ended while processes it started still hold the folder "
                                              "(its data loader workers, say: end them)" if ended else "")
            if not self.wait:
                raise FolderInUseError(
                    f"{self.key} {self.path.parent} is in use by {holder}; wait for it to finish, or choose another {self.key}",
                    holder) from None
            logger.info("%s %s is in use by %s; waiting for it to finish", self.key, self.path.parent, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


ENDED_OWNER_GRACE_S = 15.0  # how long a folder whose owner has ended is waited for: a killed training's DataLoader
# workers (forked, so holding its lock) notice within 5 s that their parent is gone and end


def _owner_ended(record: bytes) -> bool:
    """Whether a lock file's record names a process of this host that no longer runs (killed: what still holds the
    lock are processes it forked)."""
    try:
        info = json.loads(record.decode(errors="replace"))
        if info.get("host") != os.uname().nodename:
            return False
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, TypeError, KeyError, AttributeError, OSError):  # no record, or a process we may not signal
        return False
    return False


def _lock_within(fd: int, seconds: float) -> bool:
    """flock fd exclusively within `seconds` (polled); whether it was taken."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
    return False


@contextlib.contextmanager
def folder_turn(folder: str | Path) -> Iterator[None]:
    """Hold an OS lock (flock) on the folder itself while inside, so that processes that read, change and write one
    file of it (a report two edm-eval runs merge into) take turns; no file is made. A folder not there yet is made
    first (the write would make it: without it, two first writes would not take turns). A folder that cannot be
    made or opened, or a file system without locks on folders, gives no turn; a turn that must wait says so."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a file in its place, no permission: the writer's own error names it
        yield
        return
    try:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a wait that could be long (a process stopped inside) says what it waits for
                logger.warning("waiting for another process that is writing in %s (it holds the folder's turn; a "
                               "stopped process, e.g. one suspended with Ctrl-Z, must go on or end)", folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # NFS and some cluster file systems lock no folders
            logger.warning("%s cannot be locked (%s): a process writing the same file there at this moment could "
                           "overwrite what this one writes", folder, err)
        yield
    finally:
        os.close(fd)


def folder_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s FolderLock now ('a sampler (pid ...)'), None when no process does; the lock and its
    record are left as they are."""
    try:
        fd = os.open(Path(folder) / ".lock", os.O_RDONLY)
    except OSError:  # no lock file: no FolderLock was ever taken there
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _lock_holder(os.pread(fd, 4096, 0))
    except OSError:  # a file system without locks: nothing can hold it
        return None
    finally:
        os.close(fd)


def _lock_holder(record: bytes) -> str:
    """'a training (pid 12, host h, started ...)' from a lock file's record; 'another process (...)' when it
    names no owner."""
    try:
        info = json.loads(record.decode(errors="replace"))
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return f"another process ({record.decode(errors='replace').strip() or 'unknown'})"
    owner = str(info.get("owner") or "process")
    details = ", ".join(f"{key} {info[key]}" for key in ("pid", "host", "started") if key in info)
    article = "an" if owner[:1].lower() in "aeio" or owner.startswith("NFE") else "a"
    return f"{article} {owner} ({details})"


def to_container(cfg: Any) -> Any:
    """Dataclasses -> plain dicts/lists/str/float/int/bool/None (for checkpoints, logs and records)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_container(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {str(k): to_container(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_container(v) for v in cfg]
    return cfg


def flatten(container: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of nested dicts (dataclasses first become dicts)."""
    container = to_container(container)
    if not isinstance(container, dict):
        return {prefix[:-1]: container}
    return {k: v for key, value in container.items() for k, v in flatten(value, f"{prefix}{key}.").items()}


def differences(old: Any, new: Any, shared_only: bool = False) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for each leaf where two nested containers differ (a missing leaf is None); shared_only:
    only the leaves that both hold (records of two versions, where a key of one version only says nothing)."""
    a, b = flatten(old), flatten(new)
    keys = a.keys() & b.keys() if shared_only else a.keys() | b.keys()
    return [(k, a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)]


def read_record(path: str | Path) -> dict:
    """The JSON object {...} in the file `path`: OSError where it cannot be read, ValueError where it holds no JSON or
    JSON that is no object ("it holds a JSON list, not a record {...}")."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict):
        raise ValueError(f"it holds a JSON {type(record).__name__}, not a record {{...}}")
    return record


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the 8 bytes every PNG begins with


def png_is_whole(path: str | Path) -> bool:
    """Whether `path` is a file that ends as a complete PNG does (its last 12 bytes, one small read), or, where
    another tool wrote bytes after the IEND chunk (decoders ignore them), whose chunks reach IEND (each chunk's
    8-byte header read): an empty file or one cut short is none of the images an atomic write made."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size >= len(PNG_END):
                f.seek(-len(PNG_END), os.SEEK_END)
                if f.read() == PNG_END:
                    return True
            f.seek(0)
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return False
            at = len(PNG_SIGNATURE)
            while at + 12 <= size:  # a chunk: length (4 bytes), type (4), data (length), CRC (4)
                f.seek(at)
                head = f.read(8)
                if head[4:] == b"IEND":
                    return True
                at += 12 + int.from_bytes(head[:4], "big")
            return False
    except (FileNotFoundError, IsADirectoryError):
        return False


def png_cut_short(path: str | Path) -> bool:
    """Whether `path` begins as a PNG does (or holds fewer bytes than its signature, e.g. none) but is not whole
    (png_is_whole): a file of another format under a .png name (a JPEG, which image readers take by its contents)
    is no PNG cut short."""
    if png_is_whole(path):
        return False
    try:
        with open(path, "rb") as f:
            return PNG_SIGNATURE.startswith(f.read(len(PNG_SIGNATURE)))
    except (FileNotFoundError, IsADirectoryError):
        return False


def zip_crc_failure(path: str | Path) -> str | None:
    """What of the zip archive `path` (a torch.save file, an .npz) fails the check its writer wrote ("MEMBER fails its
    CRC-32 check", or a member's name that is no longer UTF-8): torch.load does not check, so damaged bytes would
    load as other values; None when every member passes, or the archive is too broken to list (its reader's error
    names that)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except UnicodeDecodeError as err:  # a member name's bytes changed in the archive's index
        return f"a file name in its zip index is not UTF-8 ({err})"
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    return None if bad is None else f"{bad} fails its CRC-32 check"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex): a model file's identity, whatever its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_version() -> str:
    """The installed edm-diffusion's version (pyproject.toml's), or "unknown" in a checkout that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edm-diffusion")
    except PackageNotFoundError:
        return "unknown"
