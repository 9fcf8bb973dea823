"""S3 storage for the pipeline's data: settings from the environment, a boto3 client, uploading
a folder. Any S3 works by configuration alone (AWS: set AGENTHER_S3_ENDPOINT to ""); the local
SeaweedFS the demo and tests use is dev tooling (agenther/devtools/seaweedfs.py).

Secrets are only ever read from the environment or passed in; they are never logged and
never part of a repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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


def s3_client(settings: S3Settings | None = None, *, max_attempts: int = 5):
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
    )
    # Temporary AWS credentials from the environment come with a session token.
    token = os.environ.get("AWS_SESSION_TOKEN") if s.access_key and s.access_key == os.environ.get(
        "AWS_ACCESS_KEY_ID") else None
    return boto3.session.Session().client(
        "s3", endpoint_url=s.endpoint, region_name=s.region, aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key, aws_session_token=token, config=config)


def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix/" -> ("bucket", "some/prefix")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


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
