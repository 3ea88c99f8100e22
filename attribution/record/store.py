"""Where a trajectory's files live: a directory on disk, or memory. Both hold bytes.

Tensors are always serialised with safetensors, in memory too, so a stored checkpoint can never
alias a live tensor and both stores behave identically. Disk writes are atomic: a file is written
under a temporary name, flushed, and renamed into place, so a crash leaves either the old file or
the new one, never half of one. ``FileLock`` is the one lock of the project: an exclusive
``flock`` on a file, which the kernel drops when its holder dies, so no lock outlives its process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from attribution.record.errors import TrajectoryError

REWRITE = "re-record the run, or restore the file from a backup"
FILE_MODE = 0o644


def canonical(data: bytes) -> bytes:
    """safetensors bytes with the metadata in sorted key order. safetensors writes its metadata
    map in an order that changes from process to process, so identical content would get
    different bytes and checksums; sorting makes the same content the same bytes."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


class Store:
    """A flat namespace of named byte blobs (names use ``/`` as separator)."""

    def put(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def where(self, name: str) -> str:
        """A human-readable location of ``name``, for error messages."""
        raise NotImplementedError

    def put_tensors(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> str:
        """Store detached contiguous CPU copies of ``tensors``; return the file's sha256."""
        plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        data = canonical(save_tensors(plain, metadata=metadata))
        self.put(name, data)
        return hashlib.sha256(data).hexdigest()

    def get_tensors(self, name: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
        """Load tensors, checking the recorded checksum and that every float is finite."""
        data = self.get(name)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise TrajectoryError(
                self.where(name),
                "contents do not match the checksum recorded "
                "in the manifest (the file is damaged or was replaced)",
                REWRITE,
            )
        try:
            tensors = load_tensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise TrajectoryError(
                self.where(name), f"not a readable safetensors file ({exc})", REWRITE
            ) from exc
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise TrajectoryError(
                    self.where(name),
                    f"tensor {key!r} holds NaN or infinity",
                    "the run diverged before this checkpoint; re-record it "
                    "with a lower learning rate",
                    field=key,
                )
        return tensors

    def put_json(self, name: str, obj: Any) -> None:
        self.put(name, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def get_json(self, name: str) -> Any:
        try:
            return json.loads(self.get(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrajectoryError(self.where(name), f"not valid JSON ({exc})", REWRITE) from exc


class DiskStore(Store):
    """Files under ``root``; every write is atomic."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def put(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
            _fsync_directory(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError as exc:
            raise TrajectoryError(self.where(name), "file is missing", REWRITE) from exc

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def where(self, name: str) -> str:
        return str(self.root / name)


class FileLock:
    """An exclusive ``flock`` on the file ``path``, held until ``release()`` or until the process
    ends: the kernel releases it when its holder exits or is killed, so a lock left by a dead
    process blocks no one. The holder deletes the file when it releases the lock; a taker that
    locked a file deleted meanwhile notices (another inode is, or none is, at ``path``) and
    tries again, so a lock is never held twice. Take with ``take``."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, path: Path, wait: bool) -> FileLock | None:
        """Lock ``path`` (created empty if absent, with its folder), waiting for its holder if
        ``wait``; without ``wait``, None when another holds it (another process, or another
        ``FileLock`` of this one). Raises OSError when the file cannot be created or opened
        (e.g. in a read-only directory)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                if _same_file(fd, path):
                    return cls(path, fd)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder deleted it while this process waited: lock the new one

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the file and drop the lock; later calls do nothing."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # a file left behind is harmless: the next taker locks it
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file now at ``path``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MemoryStore(Store):
    """Blobs in a dict: for tests and for runs that need no files."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, name: str, data: bytes) -> None:
        self.blobs[name] = bytes(data)

    def get(self, name: str) -> bytes:
        if name not in self.blobs:
            raise TrajectoryError(self.where(name), "not in this in-memory trajectory", REWRITE)
        return self.blobs[name]

    def exists(self, name: str) -> bool:
        return name in self.blobs

    def where(self, name: str) -> str:
        return f"<memory>/{name}"
