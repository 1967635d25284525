"""Where artifacts live: a local directory or an S3-compatible bucket. Every write returns the
SHA-256 and size of what was stored, and a write is all-or-nothing (temp file + rename locally,
a single PUT or a completed multipart upload on S3)."""

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

CHUNK = 1 << 20


class ArtifactStore(Protocol):
    """The operations the API and workers need."""

    def put(self, key: str, src: Path) -> tuple[str, int]: ...

    def fetch(self, key: str, dst: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def stream(self, key: str) -> Iterator[bytes]: ...

    def delete_prefix(self, prefix: str) -> None: ...


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class LocalStore:
    """Artifacts as files under a root directory."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"artifact key {key!r} leaves the store")
        return path

    def put(self, key: str, src: Path) -> tuple[str, int]:
        """Copy `src` into the store under `key` atomically; (sha256, size)."""
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
        h, size = hashlib.sha256(), 0
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    fout.write(chunk)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return h.hexdigest(), size

    def fetch(self, key: str, dst: Path) -> None:
        """Copy the artifact to `dst`."""
        shutil.copyfile(self._path(key), dst)

    def exists(self, key: str) -> bool:
        """Whether the artifact is stored."""
        return self._path(key).is_file()

    def stream(self, key: str) -> Iterator[bytes]:
        """The artifact's bytes in chunks."""
        with open(self._path(key), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete_prefix(self, prefix: str) -> None:
        """Delete every artifact under `prefix` (a folder)."""
        shutil.rmtree(self._path(prefix), ignore_errors=True)


class _Hashing:
    """A read-only file wrapper that hashes what boto3 reads from it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.sha.update(chunk)
        self.size += len(chunk)
        return chunk


class S3Store:
    """Artifacts as objects under `s3://bucket/prefix/` (AWS or any S3-compatible server)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, region: str = "us-east-1",
                 access_key_id: str | None = None, secret_access_key: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        # no keys given: boto3 looks them up itself (AWS_* variables, ~/.aws, an instance role)
        self.s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                               aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key)
        # one part in flight at a time: boto3 then reads the file sequentially, so the hash is right
        self.transfer = TransferConfig(multipart_chunksize=64 * CHUNK, max_concurrency=1, use_threads=False)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, src: Path) -> tuple[str, int]:
        """Upload `src`; (sha256, size), also kept as the object's metadata."""
        sha, size = file_digest(src)
        with open(src, "rb") as f:
            reader = _Hashing(f)
            self.s3.upload_fileobj(reader, self.bucket, self._key(key), Config=self.transfer,
                                   ExtraArgs={"Metadata": {"sha256": sha}})
        if reader.sha.hexdigest() != sha:
            self.s3.delete_object(Bucket=self.bucket, Key=self._key(key))
            raise OSError(f"{src} changed while it was uploaded")
        return sha, size

    def fetch(self, key: str, dst: Path) -> None:
        """Download the artifact to `dst`."""
        self.s3.download_file(self.bucket, self._key(key), str(dst))

    def exists(self, key: str) -> bool:
        """Whether the artifact is stored."""
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def stream(self, key: str) -> Iterator[bytes]:
        """The artifact's bytes in chunks."""
        body = self.s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        yield from body.iter_chunks(CHUNK)

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix`."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix).rstrip("/") + "/")
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


def open_store(url: str, endpoint_url: str | None = None, region: str = "us-east-1",
               access_key_id: str | None = None, secret_access_key: str | None = None) -> ArtifactStore:
    """The store for `file:///dir` or `s3://bucket/prefix` (S3 keys: given, else boto3's own lookup)."""
    u = urlparse(url)
    if u.scheme == "file":
        return LocalStore(Path(u.path))
    if u.scheme == "s3":
        return S3Store(u.netloc, u.path, endpoint_url, region, access_key_id, secret_access_key)
    raise ValueError(f"artifact store {url!r}: use file:///path or s3://bucket/prefix")
