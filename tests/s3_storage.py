"""SAGE_STORAGE on a local S3 server for the tests (the server is the integration tests'
`s3_server` fixture: moto's, real HTTP)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def use_s3_storage(env: pytest.MonkeyPatch, endpoint: str, folder: Path):
    """Point SAGE_STORAGE at a fresh bucket on `endpoint`, with credentials in a file (as on a
    cluster: sage-ray forwards the file's path to jobs and replicas, never keys); returns a
    boto3 client to look inside, its bucket name as `.bucket`."""
    import boto3

    credentials = folder / "aws_credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "SAGE_CACHE_MAX_BYTES"):
        env.delenv(name, raising=False)
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    env.setenv("AWS_REGION", "us-east-1")
    env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env.setenv("SAGE_S3_ENDPOINT", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.bucket = f"sage-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=client.bucket)
    env.setenv("SAGE_STORAGE", f"s3://{client.bucket}/sage")
    return client
