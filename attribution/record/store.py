"""Where a trajectory's files live: a directory on disk, or memory. Both hold bytes.

Tensors are always serialised with safetensors, in memory too, so a stored checkpoint can never
alias a live tensor and both stores behave identically. Disk writes are atomic: a file is written
under a temporary name, flushed, and renamed into place, so a crash leaves either the old file or
the new one, never half of one.
"""

from __future__ import annotations

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
        data = save_tensors(plain, metadata=metadata)
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
