"""Durable storage: a folder on a local disk, in S3 (``s3://bucket/prefix``) or in Google
Cloud Storage (``gs://bucket/prefix``), reached through fsspec (with s3fs and gcsfs).

A :class:`Storage` is one folder there. Its files are written so that a reader never
sees half of one: an object store makes an object visible only once its upload is
complete (a single PUT, or the completion of a multipart or resumable upload), so a file
is uploaded under its final key; a local folder gets a temporary name in the same
directory, flushed to disk and renamed (:func:`~apex_dqn.common.files.write_atomically`).
Downloads are written locally the same way.

Every error that reaching storage can raise (a missing package, no credentials, a missing
bucket, a refused request) becomes a :class:`StorageError` whose message is one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from apex_dqn.common.config import ConfigError
from apex_dqn.common.files import write_atomically

# Object-store schemes: scheme -> the package that gives fsspec its filesystem, and the
# pip extra of this project that installs it.
REMOTE = {"s3": ("s3fs", "apex-dqn"), "gs": ("gcsfs", "apex-dqn[gcs]")}
# Filesystems on which an upload under the final name is atomic for a reader.
ATOMIC_PUT = ("s3", "gs", "memory")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,254}$")
COPY_BUFFER = 8 << 20  # bytes per read when copying a file


class StorageError(ConfigError):
    """Storage cannot be reached or used; the message is one line."""


def is_uri(text: str) -> bool:
    """Whether ``text`` names storage by URI (``s3://...``, ``gs://...``, ``file://...``)
    rather than by a local path."""
    return bool(_SCHEME.match(text))


def split(uri: str) -> tuple[str, str]:
    """(scheme, path): ``s3://b/p/`` -> ``("s3", "b/p")``; a local path or ``file://``
    URI -> ``("file", absolute path)``."""
    m = _SCHEME.match(uri)
    if m is None:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme, path = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return "file", os.path.abspath(os.path.expanduser(path))
    return scheme, path.strip("/")


def check_uri(uri: str, flag: str = "--storage") -> None:
    """Refuse, in one line, a storage location this program cannot use: an unknown
    scheme, or an object-store URI without a valid bucket name. Reads nothing."""
    scheme, path = split(uri)
    if scheme == "file":
        if not uri.strip():
            raise StorageError(f"{flag}={uri!r} is invalid: give a local path or a URI")
        return
    if scheme not in REMOTE:
        raise StorageError(
            f"{flag}={uri!r} has an unknown scheme {scheme}://: use a local path, "
            "s3://bucket/prefix or gs://bucket/prefix"
        )
    bucket = path.split("/", 1)[0]
    if not _BUCKET.match(bucket):
        raise StorageError(
            f"{flag}={uri!r} is invalid: {bucket!r} is not a bucket name (use "
            f"{scheme}://bucket/prefix)"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Storage:
    """One folder of a filesystem: files are named by their name in it, ``a/b`` for one
    in a subfolder.

    ``fs`` is an fsspec filesystem, ``root`` the folder's path on it (no scheme), and
    ``scheme`` says how to write atomically (:data:`ATOMIC_PUT`, else by renaming).
    """

    def __init__(self, fs: Any, root: str, scheme: str):
        self.fs, self.root, self.scheme = fs, root.rstrip("/"), scheme

    def __repr__(self) -> str:
        return f"Storage({self.uri()!r})"

    def uri(self, name: str = "") -> str:
        """The URI of file ``name`` (or of the folder): ``s3://b/p/name``, or a path."""
        path = f"{self.root}/{name}" if name else self.root
        return path if self.scheme == "file" else f"{self.scheme}://{path}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def child(self, name: str) -> Storage:
        """The subfolder ``name``."""
        return Storage(self.fs, self._path(name), self.scheme)

    @property
    def name(self) -> str:
        """The folder's own name, the last part of its path."""
        return self.root.rsplit("/", 1)[-1]

    def parent(self) -> Storage:
        """The folder this one is in."""
        return Storage(self.fs, self.root.rsplit("/", 1)[0], self.scheme)

    def files(self) -> dict[str, int]:
        """The files directly in the folder and their sizes; {} if it does not exist."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        found = {}
        for e in entries:
            if e.get("type") == "file":
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                found[name] = int(e.get("size") or 0)
        return found

    def put(self, local: str | os.PathLike, name: str) -> None:
        """Copy the local file ``local`` to ``name``; a reader sees the old file or the
        whole new one, never a part."""
        target = self._path(name)
        if self.scheme == "file":  # a temporary name beside it, flushed, then renamed
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            with open(local, "rb") as src:
                write_atomically(Path(target), lambda f: shutil.copyfileobj(src, f, COPY_BUFFER))
            return
        if self.scheme in ATOMIC_PUT:
            self.fs.put_file(os.fspath(local), target)
            return
        tmp = self._path(f".{name}.tmp")  # other filesystems: upload, then rename
        try:
            self.fs.put_file(os.fspath(local), tmp)
            self.fs.mv(tmp, target)
        except BaseException:
            self.remove(f".{name}.tmp")
            raise

    def get(self, name: str, local: str | os.PathLike) -> None:
        """Download ``name`` to the local file ``local``, written atomically."""
        with self.fs.open(self._path(name), "rb") as src:
            write_atomically(Path(local), lambda f: shutil.copyfileobj(src, f, COPY_BUFFER))

    def modified(self, name: str) -> float | None:
        """When ``name`` was stored (seconds since the epoch); None where unknown."""
        try:
            return self.fs.modified(self._path(name)).timestamp()
        except (NotImplementedError, FileNotFoundError, AttributeError, KeyError):
            return None

    def read_text(self, name: str) -> str | None:
        """The text of a small file ``name``; None if it does not exist."""
        try:
            with self.fs.open(self._path(name), "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        """Delete file ``name``; nothing if it does not exist."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))


def _filesystem(scheme: str, flag: str, uri: str) -> Any:
    """The fsspec filesystem of ``scheme``; one line when its package is missing."""
    try:
        import fsspec
    except ImportError as exc:
        raise StorageError(
            f"{flag} {uri} needs the fsspec package: pip install -c deploy/constraints.txt fsspec"
        ) from exc
    if scheme in REMOTE:
        package, extra = REMOTE[scheme]
        try:
            __import__(package)
        except ImportError as exc:
            raise StorageError(
                f"{flag} {uri} needs the {package} package: pip install -c "
                f"deploy/constraints.txt '{extra}' (or {package})"
            ) from exc
    if scheme == "gs":  # gcsfs logs each retry with its traceback: errors are said once, here
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    options: dict[str, Any] = {"skip_instance_cache": True}
    if scheme == "s3":  # fail in seconds, not minutes, when the endpoint is unreachable
        options["config_kwargs"] = {"connect_timeout": 10, "retries": {"max_attempts": 3}}
    try:
        return fsspec.filesystem(scheme, **options)
    except Exception as exc:  # e.g. credentials that cannot be read
        raise StorageError(f"{flag} {uri}: {_one_line(exc)}") from exc


def connect(uri: str, flag: str = "--storage") -> Storage:
    """The storage folder ``uri``, unchecked (:func:`open_storage` checks it)."""
    check_uri(uri, flag)
    scheme, path = split(uri)
    return Storage(_filesystem(scheme, flag, uri), path, scheme)


def open_storage(uri: str, flag: str = "--storage") -> Storage:
    """The storage folder ``uri``, checked for use: its package installed, its bucket
    there and readable with the credentials at hand (a local folder: it or its nearest
    existing parent is a writable directory). Nothing is written. One line
    (:class:`StorageError`) for anything that is wrong."""
    storage = connect(uri, flag)
    fs, scheme, path = storage.fs, storage.scheme, storage.root
    if scheme == "file":
        existing = Path(path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{flag} {uri}: {existing} is not a writable directory")
        return storage
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)
        storage.files()
    except FileNotFoundError as exc:
        raise StorageError(f"{flag} {uri}: bucket {bucket} does not exist") from exc
    except Exception as exc:  # credentials, permissions, network: whatever the SDK raises
        raise StorageError(f"{flag} {uri}: cannot read bucket {bucket}: {_one_line(exc)}") from exc
    return storage


def describe(exc: BaseException) -> str:
    """An exception raised while reaching storage, in one line."""
    return _one_line(exc)
