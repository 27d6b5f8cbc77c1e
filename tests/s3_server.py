"""A real S3-compatible server on loopback (moto's standalone server) with one bucket, for remote-storage tests."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.fs as pafs


class LoopbackS3:
    def __init__(self, bucket: str | None = None):
        import uuid

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        # moto keeps its buckets in process-wide state shared by every server in this process: a fresh
        # bucket per server keeps one test module's objects out of another's listings.
        self.bucket = bucket or f"cf-ray-test-{uuid.uuid4().hex[:12]}"
        # What a node would get from its instance profile / environment; passed to every process that reads or writes.
        self.env = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "cf-ray-test",
            "AWS_SECRET_ACCESS_KEY": "cf-ray-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="cf-ray-test",
            aws_secret_access_key="cf-ray-test",
        ).create_bucket(Bucket=self.bucket)
        self.fs = pafs.S3FileSystem(
            endpoint_override=self.env["AWS_ENDPOINT_URL"],
            access_key="cf-ray-test",
            secret_key="cf-ray-test",
            region="us-east-1",
        )

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def key(self, *parts: str) -> str:
        return "/".join([self.bucket, *parts])

    def upload(self, local: Path, *parts: str) -> str:
        """Copy a local folder into the bucket; returns its s3:// URI."""
        pafs.copy_files(
            str(local), self.key(*parts), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
        )
        return self.uri(*parts)

    def read(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.key(*parts)) as f:
            return f.read()

    def listing(self, *parts: str) -> list[str]:
        base = self.key(*parts)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        self.server.stop()
