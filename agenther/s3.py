"""S3 storage for the pipeline's data: settings from the environment, a boto3 client, uploading
a folder, listing and streaming log objects (ingest and the watcher read s3:// inputs through
`S3Object`). Any S3 works by configuration alone (AWS: set AGENTHER_S3_ENDPOINT to ""); the local
SeaweedFS the demo and tests use is dev tooling (agenther/devtools/seaweedfs.py).

Secrets are only ever read from the environment or passed in; they are never logged and
never part of a repr.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

ENDPOINT_ENV = "AGENTHER_S3_ENDPOINT"
DEFAULT_ENDPOINT = "http://127.0.0.1:8333"
LOOPBACK = "127.0.0.1"


@dataclass(repr=False)
class S3Settings:
    endpoint: str | None  # None: AWS S3 itself (boto3 picks the regional endpoint)
    access_key: str | None  # None (both): boto3's own credential chain (env, profile, SSO, role)
    secret_key: str | None
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never the keys: settings end up in logs and tracebacks
        def shown(value: str | None) -> str:
            return "None" if value is None else "'***'"

        return (f"S3Settings(endpoint={self.endpoint!r}, access_key={shown(self.access_key)}, "
                f"secret_key={shown(self.secret_key)}, region={self.region!r})")

    __str__ = __repr__


def s3_settings(env: Mapping[str, str] | None = None) -> S3Settings:
    """From the environment (or `env`, e.g. a credentials.env file read as a dict):
    AGENTHER_S3_ENDPOINT (default the local SeaweedFS on :8333; set it to "" for AWS S3),
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION."""
    env = os.environ if env is None else env
    endpoint = env.get(ENDPOINT_ENV, DEFAULT_ENDPOINT).strip() or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Settings(endpoint=endpoint, access_key=env.get("AWS_ACCESS_KEY_ID") or None,
                      secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None, region=region)


def s3_client(settings: S3Settings | None = None, *, max_attempts: int = 5, max_pool_connections: int = 10):
    """A boto3 S3 client. Path-style addressing for custom endpoints (SeaweedFS, MinIO:
    no wildcard DNS for bucket subdomains); AWS keeps its default (virtual-hosted)."""
    import boto3
    from botocore.config import Config

    s = settings or s3_settings()
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if s.endpoint else "auto"},
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max_pool_connections,
    )
    # Temporary AWS credentials from the environment come with a session token.
    token = os.environ.get("AWS_SESSION_TOKEN") if s.access_key and s.access_key == os.environ.get(
        "AWS_ACCESS_KEY_ID") else None
    return boto3.session.Session().client(
        "s3", endpoint_url=s.endpoint, region_name=s.region, aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key, aws_session_token=token, config=config)


_SHARED: dict[tuple, Any] = {}  # (pid, settings) -> client
_SHARED_LOCK = threading.Lock()


def shared_client() -> Any:
    """The process's boto3 client for the settings in the environment, created at first use.
    A client costs tens of ms to create and is thread-safe, so the LLM cache and the log
    readers share one per process; keyed by pid (a forked child makes its own: a client is
    not fork-safe) and by the settings (a test may point the environment at another store)."""
    s = s3_settings()
    slot = (os.getpid(), s.endpoint, s.access_key, s.secret_key, s.region)
    client = _SHARED.get(slot)
    if client is None:
        with _SHARED_LOCK:
            client = _SHARED.get(slot)
            if client is None:
                # The LLM layer's threads (llm.concurrency) share it: a pool to match.
                client = _SHARED[slot] = s3_client(s, max_pool_connections=64)
    return client


def is_s3_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix/" -> ("bucket", "some/prefix")."""
    parsed = urlparse(url)
    if parsed.scheme == "s3" and "@" in parsed.netloc:  # never echo it: the part before @ is a secret
        raise ValueError("an s3:// URL must not carry credentials (user:secret@); set AWS_* in the environment")
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "404", "AccessDenied", ...), else ""."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


NOT_FOUND = ("404", "NoSuchKey", "NotFound")


def store_errors() -> tuple[type[Exception], ...]:
    """What a call to the store raises when it fails: an S3 error answer (ClientError) or no
    answer at all (connection, timeout: BotoCoreError). botocore is imported on first need."""
    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError


# -- log objects: what ingest and the watcher read from a bucket -------------------------------------
@dataclass(frozen=True)
class S3Object:
    """One object as listed: enough to name it, tell whether it changed (ETag + size: S3 gives no
    content digest for free, and a new upload gets a new ETag) and read it. It quacks like the
    pathlib.Path the log adapters take (name, stem, suffix, parent, open("rb"), read_bytes), and
    str() is its s3:// URL, so records and errors name the object."""
    bucket: str
    key: str
    etag: str
    size: int
    last_modified: float  # seconds since the epoch, the store's clock

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> PurePosixPath:
        return PurePosixPath(self.bucket, self.key).parent

    @property
    def signature(self) -> str:
        """What identifies this version of the object (stamps and cache keys of ingest)."""
        return f"etag {self.etag} size {self.size}"

    def open(self, mode: str = "rb") -> io.BufferedReader:
        """The object's bytes as a buffered binary stream (read line by line: memory stays flat).
        The GET asks for the listed version (If-Match its ETag): an object replaced since it was
        listed is an error, not a silent mix of two versions."""
        if mode != "rb":
            raise ValueError(f"{self.url}: S3 objects are read-only here (mode 'rb'), not {mode!r}")
        try:
            body = shared_client().get_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)["Body"]
        except store_errors() as exc:
            code = error_code(exc)
            if code in NOT_FOUND:
                raise FileNotFoundError(f"{self.url}: gone since it was listed") from None
            if code in ("412", "PreconditionFailed"):
                raise OSError(f"{self.url}: replaced since it was listed (ETag {self.etag}); run again") from None
            raise OSError(f"{self.url}: cannot read ({code or type(exc).__name__})") from exc
        return io.BufferedReader(_BodyStream(body), buffer_size=1 << 20)

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            return fh.read()


class _BodyStream(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so io.BufferedReader gives the exact line
    splitting (on b"\n" only) and read(n) of a local file opened "rb"."""

    def __init__(self, body: Any):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def list_objects(bucket: str, prefix: str, client: Any = None) -> Iterator[S3Object]:
    """Every object whose key starts with `prefix`, in key order, one page (1,000) at a time."""
    pages = (client or shared_client()).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for item in page.get("Contents", []):
            yield S3Object(bucket, item["Key"], item["ETag"], item["Size"], item["LastModified"].timestamp())


def folder_prefix(key: str) -> str:
    """The listing prefix of a "folder" key: "logs" -> "logs/" (not "logs2/..."); "" is the whole bucket."""
    return f"{key.rstrip('/')}/" if key.strip("/") else ""


def find_logs(url: str) -> tuple[list[S3Object], bool]:
    """What an s3:// input names, as a local path would: (the object, True) when the URL is an
    object's key (and does not end in "/"), else (every object under it as a folder, False).
    OSError naming the URL when the store cannot be reached or will not list."""
    bucket, key = parse_s3_url(url)
    try:
        if key and not url.endswith("/"):
            try:
                head = shared_client().head_object(Bucket=bucket, Key=key)
            except store_errors() as exc:
                if error_code(exc) not in NOT_FOUND:
                    raise
            else:
                return [S3Object(bucket, key, head["ETag"], head["ContentLength"],
                                 head["LastModified"].timestamp())], True
        return list(list_objects(bucket, folder_prefix(key))), False
    except store_errors() as exc:
        raise OSError(f"{url}: cannot list ({error_code(exc) or exc})") from exc


def ensure_bucket(client, bucket: str, region: str = "us-east-1") -> bool:
    """Create `bucket` if it does not exist. Returns True if it was created."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise  # 403 and friends: wrong credentials or someone else's bucket
    kwargs: dict = {"Bucket": bucket}
    if region != "us-east-1":  # AWS rejects an explicit us-east-1 constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise
        return False
    return True


def push_dir(local: Path, url: str, settings: S3Settings | None = None) -> list[str]:
    """Upload every file under `local` to s3://bucket/prefix/<path relative to local>,
    creating the bucket if it is missing. Returns the keys written, sorted."""
    local = Path(local)
    if not local.is_dir():
        raise NotADirectoryError(f"{local} is not a folder")
    settings = settings or s3_settings()
    bucket, prefix = parse_s3_url(url)
    client = s3_client(settings)
    ensure_bucket(client, bucket, settings.region)
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = "/".join(part for part in (prefix, path.relative_to(local).as_posix()) if part)
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return sorted(keys)
