"""Local and S3 storage behind one small interface, with atomic writes.

URIs are local paths or ``s3://bucket/prefix``. One S3 stack: boto3 for the objects this code reads and
writes, pyarrow's S3FileSystem (``arrow_location``) where Ray Data and Ray Train need a filesystem. Both
take the same endpoint (config or ``AWS_ENDPOINT_URL``) and region (config, ``AWS_REGION``, else the
bucket's own), and both retry throttling (503 SlowDown) and 5xx errors with exponential backoff. Large
objects (checkpoints, tars) go up as multipart uploads, which S3 makes visible only once complete, so a
write stays atomic. Credentials are never read, stored or logged here: boto3 resolves them itself, and
stores pickle without a client (Ray ships them to workers).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

# S3 caps an upload at 10,000 parts: 16 MiB parts reach 156 GiB, past any checkpoint shard we write.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
# attempts per request, the first included; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override both
RETRY_ATTEMPTS = 10
RETRY_MODE = "standard"  # exponential backoff with jitter: the policy pyarrow's AwsStandardS3RetryStrategy applies too


class StorageError(OSError):
    """A storage operation that failed for a reason the user can act on."""


class Store(Protocol):
    uri: str

    def list(self, suffixes: tuple[str, ...] | None = None) -> list[str]: ...
    def read(self, rel: str) -> bytes: ...
    def write(self, rel: str, data: bytes) -> None: ...
    def exists(self, rel: str) -> bool: ...
    def size(self, rel: str) -> int: ...
    def child(self, rel: str) -> Store: ...
    def url(self, rel: str) -> str: ...


def _clean_rel(rel: str) -> str:
    """Reject relative paths that could escape the store root."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", "") for p in parts):
        raise StorageError(f"refusing path {rel!r}: it must be relative and stay inside the store")
    return "/".join(parts)


def _matches(name: str, suffixes: tuple[str, ...] | None) -> bool:
    return suffixes is None or name.lower().endswith(suffixes)


class LocalStore:
    """A folder on local (or shared network) disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def list(self, suffixes: tuple[str, ...] | None = None) -> list[str]:
        if not self.root.exists():
            return []
        if self.root.is_file():
            return [""] if _matches(self.root.name, suffixes) else []
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in filenames:
                if _matches(name, suffixes):
                    out.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(out)

    def _path(self, rel: str) -> Path:
        return self.root if rel == "" else self.root / _clean_rel(rel)

    def read(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def size(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def child(self, rel: str) -> LocalStore:
        return LocalStore(self._path(rel))

    def url(self, rel: str) -> str:
        return str(self._path(rel))


def retry_settings() -> dict[str, Any]:
    """botocore's ``retries`` setting: standard mode, 10 attempts, unless the AWS environment says otherwise."""
    return {"mode": os.environ.get("AWS_RETRY_MODE") or RETRY_MODE,
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or RETRY_ATTEMPTS)}


class S3Store:
    """A prefix in an S3 (or S3-compatible) bucket. Each write is one PUT, or one multipart upload from
    ``multipart_threshold`` bytes on; either becomes visible whole or not at all."""

    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, multipart_chunksize: int = MULTIPART_CHUNKSIZE):
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket or "@" in bucket:
            raise StorageError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix (credentials never go in URIs)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = region
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self._client: Any = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # no region: boto3 takes AWS_REGION / the profile's, and follows S3's redirect to the bucket's own
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                config=Config(retries=retry_settings(), max_pool_connections=32),
            )
        return self._client

    def transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        # the classic transfer client: the CRT one ignores this client's endpoint and retry settings
        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize, max_concurrency=8,
                              preferred_transfer_client="classic")

    def _key(self, rel: str) -> str:
        if rel == "":
            return self.prefix
        rel = _clean_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def list(self, suffixes: tuple[str, ...] | None = None) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        base = f"{self.prefix}/" if self.prefix else ""
        out = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(base):]
                if rel and not rel.endswith("/") and _matches(rel, suffixes):
                    out.append(rel)
        return sorted(out)

    def read(self, rel: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{self.url(rel)} does not exist") from None

    def write(self, rel: str, data: bytes) -> None:
        if len(data) < self.multipart_threshold:
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
            return
        # each part is retried on its own; a failed upload is aborted by s3transfer, so nothing half-written shows
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(rel), Config=self.transfer_config())

    def _head(self, rel: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, rel: str) -> bool:
        return self._head(rel) is not None

    def size(self, rel: str) -> int:
        head = self._head(rel)
        if head is None:
            raise FileNotFoundError(f"{self.url(rel)} does not exist")
        return int(head["ContentLength"])

    def child(self, rel: str) -> S3Store:
        return S3Store(f"s3://{self.bucket}/{self._key(rel)}", self.endpoint_url, self.region,
                       self.multipart_threshold, self.multipart_chunksize)

    def url(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"


def open_store(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Store:
    """Open a local path or ``s3://`` URI as a Store."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url, region)
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return LocalStore(uri)


def s3_region(bucket: str, region: str | None = None, endpoint_url: str | None = None) -> str | None:
    """The bucket's region: the configured one, else the environment's, else asked of AWS (never guessed)."""
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint_url or os.environ.get("AWS_ENDPOINT_URL"):
        return region  # an S3-compatible endpoint (MinIO, moto) has no AWS region to look up
    import pyarrow.fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except OSError as exc:
        raise StorageError(f"cannot find the region of bucket {bucket!r} ({exc}); set storage.region or AWS_REGION") from None


def arrow_location(uri: str, endpoint_url: str | None = None, region: str | None = None) -> tuple[Any, str]:
    """``(pyarrow filesystem or None, path)`` for Ray Data and Ray Train: S3 paths lose the scheme and get
    an explicit endpoint and region; local paths pass through."""
    if not uri.startswith("s3://"):
        return None, uri
    import pyarrow.fs as pafs

    path = uri[len("s3://"):].rstrip("/")
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    attempts = retry_settings()["total_max_attempts"]
    kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    found = s3_region(path.split("/", 1)[0], region, endpoint)
    if found:
        kwargs["region"] = found
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs), path


def download_tree(store: Store, local: str | os.PathLike, keep: Any = None) -> list[str]:
    """Copy every file under ``store`` (for which ``keep(rel)`` is true) into folder ``local``."""
    written = []
    for rel in store.list():
        if keep is not None and not keep(rel):
            continue
        target = Path(local, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read(rel))
        written.append(rel)
    return written


def upload_tree(local: str | os.PathLike, store: Store, last: str | None = None) -> list[str]:
    """Copy every file under folder ``local`` into ``store`` (each write atomic); ``last`` (a relative
    path, e.g. a completion marker) is written after all the others. Returns the relative paths."""
    root = Path(local)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    ordered = [f for f in files if f != last] + ([last] if last in files else [])
    for rel in ordered:
        store.write(rel, (root / rel).read_bytes())
    return ordered
