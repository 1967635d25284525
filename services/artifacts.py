"""Where artifacts live: a local directory or an S3-compatible bucket. Every write returns the
SHA-256 and size of what was stored, and a write is all-or-nothing (temp file + rename locally,
a single PUT or a completed multipart upload on S3). A local store keeps a free-space reserve; both
answer a health check and list what the sweeper (services/sweeper.py) needs."""

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from services.faults import describe

CHUNK = 1 << 20
JOBS = "jobs"  # every job's files live under jobs/<job id>/
_PARTIAL = re.compile(r".+\.\d+\.tmp")  # LocalStore.put's temporary file: <name>.<pid>.tmp


class ArtifactStore(Protocol):
    """The operations the API and workers need."""

    def put(self, key: str, src: Path) -> tuple[str, int]: ...

    def fetch(self, key: str, dst: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def stream(self, key: str) -> Iterator[bytes]: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def health(self) -> str | None:
        """None when the store can take writes now, else a short reason (for /readyz)."""
        ...

    def job_prefixes(self) -> Iterator[tuple[str, float]]:
        """Each folder under jobs/ (its name, the job's id) with the newest modification time (epoch seconds)
        of anything under it."""
        ...

    def remove_partials(self, before: float) -> list[tuple[str, float]]:
        """Remove what writes interrupted before `before` (epoch seconds) left behind; (what, its time) of each."""
        ...


def size_text(n: float) -> str:
    """A byte count for people: 1.5 GiB, 812 MiB, 40 KiB, 12 B."""
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} {units[i]}" if i == 0 or abs(n) >= 100 else f"{n:.1f} {units[i]}"


def copy_hashed(src: BinaryIO, dst: BinaryIO | None = None) -> tuple[str, int]:
    """Read `src` to its end in chunks, writing them to `dst` if given; the SHA-256 and size of what was read."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest(), size


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file, read in chunks."""
    with open(path, "rb") as f:
        return copy_hashed(f)


class LocalStore:
    """Artifacts as files under a root directory, which keeps `min_free_bytes` free: a write that would leave less
    is refused with ENOSPC (faults.classify: storage_full) before a byte is written, so a full disk stops new
    work with a clear error while the jobs' finished files stay readable."""

    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root, self.min_free_bytes = root, min_free_bytes

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"artifact key {key!r} leaves the store")
        return path

    def _free(self, path: Path) -> int:
        """Bytes an unprivileged process may still write on the file system of `path`."""
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def put(self, key: str, src: Path) -> tuple[str, int]:
        """Copy `src` into the store under `key` atomically; (sha256, size). OSError ENOSPC when the write would
        break into the reserve or the disk fills during it (then nothing of it stays behind)."""
        dst = self._path(key)
        if self.min_free_bytes:  # before any folder is made: a refused write leaves nothing
            self.root.mkdir(parents=True, exist_ok=True)
            need, free = src.stat().st_size, self._free(self.root)
            if free - need < self.min_free_bytes:
                raise OSError(errno.ENOSPC, f"the artifact store {self.root} keeps {size_text(self.min_free_bytes)} free "
                              f"(LADDER_STORE_MIN_FREE_BYTES) and has {size_text(free)}: storing {key} "
                              f"({size_text(need)}) is refused; free space there or lower the reserve")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                sha, size = copy_hashed(fin, fout)
            os.replace(tmp, dst)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                written = tmp.stat().st_size if tmp.exists() else 0
                raise OSError(e.errno, f"the artifact store {self.root} is full: storing {key} failed after "
                              f"{size_text(written)} ({e.strerror}); free space there") from e
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return sha, size

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

    def health(self) -> str | None:
        """None when the root is a writable directory with at least the reserve free, else why not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # as the first put would: a fresh install is ready
            if not os.access(self.root, os.W_OK | os.X_OK):
                return f"{self.root} is not writable by this process"
            free = self._free(self.root)
        except OSError as e:
            return f"{self.root}: {e.strerror or e}"
        if free < self.min_free_bytes:
            return (f"{size_text(free)} free on {self.root}, under the {size_text(self.min_free_bytes)} reserve "
                    "(LADDER_STORE_MIN_FREE_BYTES)")
        return None

    def job_prefixes(self) -> Iterator[tuple[str, float]]:
        """Each folder under jobs/ with the newest mtime of the folder and anything under it (a folder's own
        mtime counts: one just made, still empty, is young)."""
        try:
            folders = [e for e in os.scandir(self.root / JOBS) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return
        for folder in folders:
            newest = newest_mtime(Path(folder.path))
            if newest is not None:  # None: removed meanwhile
                yield folder.name, newest

    def remove_partials(self, before: float) -> list[tuple[str, float]]:
        """Remove put's temporary files (<name>.<pid>.tmp) last written before `before`: a process killed while it
        copied left them. A copy in progress writes all the time, so its file is never that old."""
        removed = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if not _PARTIAL.fullmatch(name):
                    continue
                path = Path(dirpath, name)
                try:
                    mtime = path.lstat().st_mtime
                    if mtime < before:
                        path.unlink()
                        removed.append((path.relative_to(self.root).as_posix(), mtime))
                except FileNotFoundError:  # renamed into place or removed meanwhile
                    pass
        return removed


def newest_mtime(path: Path) -> float | None:
    """The newest mtime of `path` and everything under it (symbolic links not followed); None if it is gone."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return None
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


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
    """Artifacts as objects under `s3://bucket/prefix/` (AWS or any S3-compatible server). The prefix belongs to
    one deployment (one database): the sweeper removes job folders that database does not know."""

    # botocore's defaults (60 s to connect, 60 s per read, 5 attempts) make an outage take minutes to show;
    # these make a call fail in seconds, and faults.retry decides how long to keep trying
    TIMEOUTS = {"connect_timeout": 5, "read_timeout": 30, "retries": {"total_max_attempts": 3, "mode": "standard"}}
    HEALTH_TIMEOUTS = {"connect_timeout": 2, "read_timeout": 2, "retries": {"total_max_attempts": 1, "mode": "standard"}}

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, region: str = "us-east-1",
                 access_key_id: str | None = None, secret_access_key: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint_url or f"S3 ({region})"
        # no keys given: boto3 looks them up itself (AWS_* variables, ~/.aws, an instance role)
        session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                        region_name=region)
        self.s3 = session.client("s3", endpoint_url=endpoint_url, config=Config(**self.TIMEOUTS))
        # /readyz must answer within its probe's timeout: one try, short waits
        self._probe = session.client("s3", endpoint_url=endpoint_url, config=Config(**self.HEALTH_TIMEOUTS))
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

    def health(self) -> str | None:
        """None when the bucket answers HEAD within a few seconds, else why not."""
        from botocore import exceptions as bc

        try:
            self._probe.head_bucket(Bucket=self.bucket)
            return None
        except bc.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                return f"bucket {self.bucket!r} does not exist at {self.endpoint} (create it, or fix LADDER_ARTIFACTS_URL)"
            if code in ("403", "AccessDenied", "Forbidden"):
                return f"bucket {self.bucket!r}: access denied (check the S3 credentials and the bucket's policy)"
            return f"bucket {self.bucket!r}: {self.endpoint} answered {code or 'an error'}"
        except bc.NoCredentialsError:
            return "no S3 credentials (set LADDER_S3_ACCESS_KEY_ID and LADDER_S3_SECRET_ACCESS_KEY)"
        except (bc.ConnectTimeoutError, bc.EndpointConnectionError) as e:
            return f"cannot connect to {self.endpoint} ({type(e).__name__})"
        except bc.ReadTimeoutError:
            return f"{self.endpoint} did not answer within {self.HEALTH_TIMEOUTS['read_timeout']} s"
        except Exception as e:  # a health check answers, it does not raise
            return f"{self.endpoint}: {describe(e)}"

    def job_prefixes(self) -> Iterator[tuple[str, float]]:
        """Each folder under jobs/ with the newest LastModified of its objects: one paginated listing of
        every object under jobs/ (S3 has no folder times)."""
        base = self._key(JOBS) + "/"
        newest: dict[str, float] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for o in page.get("Contents", []):
                name, sep, _ = o["Key"][len(base):].partition("/")
                if sep and name:  # an object right under jobs/ is no job's folder
                    newest[name] = max(newest.get(name, 0.0), o["LastModified"].timestamp())
        yield from newest.items()

    def remove_partials(self, before: float) -> list[tuple[str, float]]:
        """Abort the multipart uploads under this prefix begun before `before`: a process killed in the middle
        of a large upload leaves its parts stored (and billed) but invisible. A bucket lifecycle rule
        (AbortIncompleteMultipartUpload) does the same for a whole bucket; this covers buckets without one."""
        removed = []
        prefix = self.prefix + "/" if self.prefix else ""
        for page in self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for u in page.get("Uploads", []):
                started = u["Initiated"].timestamp()
                if started < before:
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                    key = u["Key"][len(prefix):]
                    removed.append((f"{key} (multipart upload {u['UploadId'][:12]})", started))
        return removed


def open_store(url: str, endpoint_url: str | None = None, region: str = "us-east-1",
               access_key_id: str | None = None, secret_access_key: str | None = None, *,
               min_free_bytes: int = 0) -> ArtifactStore:
    """The store for `file:///dir` or `s3://bucket/prefix` (S3 keys: given, else boto3's own lookup).
    `min_free_bytes`: the free space a local store keeps (S3 servers manage their own)."""
    u = urlparse(url)
    if u.scheme == "file":
        return LocalStore(Path(u.path), min_free_bytes)
    if u.scheme == "s3":
        return S3Store(u.netloc, u.path, endpoint_url, region, access_key_id, secret_access_key)
    raise ValueError(f"artifact store {url!r}: use file:///path or s3://bucket/prefix")
