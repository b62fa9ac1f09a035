"""Storage folders through fsspec: a local folder and fsspec's in-memory filesystem; URIs
refused in one line; a reader never sees part of a file."""

from __future__ import annotations

import os
import threading
import uuid

import fsspec
import pytest

from apex_dqn.common import storage
from apex_dqn.common.storage import Storage, StorageError


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path) -> Storage:
    """An empty storage folder: a local one, and one of fsspec's memory filesystem."""
    if request.param == "file":
        yield storage.open_storage(str(tmp_path / "store" / "run"))
        return
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    root = f"/bucket-{uuid.uuid4().hex[:8]}/prefix/run"
    yield Storage(fs, root, "memory")
    fs.rm(root.split("/prefix")[0], recursive=True)


def test_uris_are_split_and_their_form_checked(tmp_path):
    assert storage.split("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert storage.split("gs://bucket") == ("gs", "bucket")
    assert storage.split("file:///x/y") == ("file", "/x/y")
    assert storage.split("rel/dir") == ("file", os.path.abspath("rel/dir"))
    assert storage.is_uri("s3://b") and not storage.is_uri("/a/b")
    for good in ("s3://bucket/prefix", "gs://my.bucket", str(tmp_path), "file:///tmp/x"):
        storage.check_uri(good)
    with pytest.raises(StorageError) as info:
        storage.check_uri("ftp://host/x")
    assert str(info.value) == (
        "--storage='ftp://host/x' has an unknown scheme ftp://: use a local path, "
        "s3://bucket/prefix or gs://bucket/prefix"
    )
    with pytest.raises(StorageError, match=r"--resume='s3://' is invalid: '' is not a bucket"):
        storage.check_uri("s3://", "--resume")
    with pytest.raises(StorageError, match="'Bad_Bucket' is not a bucket name"):
        storage.check_uri("gs://Bad_Bucket/x")


def test_a_missing_filesystem_package_is_one_line(monkeypatch):
    real_import = __import__

    def no_s3fs(name, *args, **kwargs):
        if name == "s3fs":
            raise ImportError("No module named 's3fs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_s3fs)
    with pytest.raises(StorageError) as info:
        storage.open_storage("s3://bucket/prefix")
    assert str(info.value) == (
        "--storage s3://bucket/prefix needs the s3fs package: pip install -c "
        "deploy/constraints.txt 'apex-dqn' (or s3fs)"
    )


def test_a_local_folder_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"{blocker} is not a writable directory"):
        storage.open_storage(str(blocker / "runs"))
    storage.open_storage(str(tmp_path / "new" / "runs"))  # created at the first copy
    assert not (tmp_path / "new").exists()  # checking wrote nothing


def test_files_are_put_listed_read_and_removed(store, tmp_path):
    assert store.files() == {}
    assert store.read_text("run-id") is None
    local = tmp_path / "a.bin"
    local.write_bytes(b"x" * 1000)
    store.put(local, "a.bin")
    (tmp_path / "run-id").write_text("abc\n")
    store.put(tmp_path / "run-id", "run-id")
    assert store.files() == {"a.bin": 1000, "run-id": 4}
    assert store.read_text("run-id") == "abc\n"
    assert store.modified("a.bin") is not None
    store.get("a.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"x" * 1000
    local.write_bytes(b"y" * 10)  # a file put again is replaced whole
    store.put(local, "a.bin")
    assert store.files()["a.bin"] == 10
    store.remove("a.bin")
    store.remove("a.bin")  # gone already: nothing
    assert store.files() == {"run-id": 4}
    assert store.name == "run" and store.parent().child("run").uri() == store.uri()


def test_a_reader_never_sees_part_of_a_local_file(tmp_path):
    """Files are put while a reader lists and reads the folder without pause: every file
    it sees under a final name is whole (a temporary name starts with a dot)."""
    store = storage.open_storage(str(tmp_path / "store"))
    sizes = [(k + 1) << 20 for k in range(6)]
    for k, size in enumerate(sizes):
        (tmp_path / f"src-{k}").write_bytes(bytes([k + 1]) * size)
    seen: list[tuple[str, int, bool]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            for name in store.files():
                if name.startswith("."):
                    continue
                try:
                    data = (tmp_path / "store" / name).read_bytes()
                except FileNotFoundError:
                    continue
                k = int(name.split("-")[1])
                seen.append((name, len(data), data == bytes([k + 1]) * sizes[k]))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(3):
            for k in range(len(sizes)):
                store.put(tmp_path / f"src-{k}", f"ckpt-{k}")
    finally:
        done.set()
        reader.join()
    assert seen, "the reader saw no file"
    assert all(whole for _, _, whole in seen), [s for s in seen if not s[2]][:3]
    assert sorted(store.files()) == [f"ckpt-{k}" for k in range(len(sizes))]
