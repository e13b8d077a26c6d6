"""S3 storage under throttling: every request goes through a proxy that answers 503 SlowDown the way S3
does when a prefix is hot, in front of the moto server. boto3 (objects, multipart checkpoints) and
pyarrow (what Ray Data and Ray Train read through) must retry and lose nothing; the region is never
guessed."""

from __future__ import annotations

import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest

from spasem.storage import S3Store, StorageError, arrow_location, retry_settings, s3_region

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class ThrottlingProxy:
    """Forwards to the moto server; answers 503 SlowDown to every ``every``-th request (the 1st included),
    so the retries of a throttled request reach S3 and a request is never refused twice in a row."""

    def __init__(self, upstream: str, every: int = 3):
        self.upstream = urlsplit(upstream)
        self.every = every
        self.seen: list[str] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest's output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                what = f"{self.command} {self.path}"
                with proxy.lock:
                    proxy.seen.append(what)
                    refuse = len(proxy.seen) % proxy.every == 1
                    if refuse:
                        proxy.refused.append(what)
                if refuse:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(b"" if self.command == "HEAD" else SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    # a HEAD reply has no body: its Content-Length is the object's size, passed on as is
                    if key.lower() not in HOP_BY_HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ThrottlingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def throttled(s3_server):
    with ThrottlingProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        yield proxy


def test_multipart_checkpoint_and_small_objects_survive_throttling(bucket, throttled):
    """A checkpoint-sized object in several parts, and a folder of small files, all through 503s."""
    # 5 MiB is S3's smallest part: two full parts and a short last one
    store = S3Store(f"s3://{bucket}/run/checkpoints", endpoint_url=throttled.url,
                    multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    blob = np.random.default_rng(0).integers(0, 256, 12 * 1024 * 1024 + 1000, dtype=np.uint8).tobytes()
    store.write("step-000500/model.safetensors", blob)
    small = {f"step-000500/meta-{i}.json": f'{{"i": {i}}}'.encode() for i in range(8)}
    for rel, data in small.items():
        store.child("").write(rel, data)  # children keep the endpoint and the multipart settings

    parts = [r for r in throttled.seen if "partNumber=" in r and r.startswith("PUT")]
    assert len({r.split("partNumber=")[1].split("&")[0] for r in parts}) == 3, "12 MiB in 5 MiB parts"
    assert any("partNumber=" in r for r in throttled.refused), "a part upload was throttled and retried"
    assert len(throttled.refused) >= 4

    assert store.read("step-000500/model.safetensors") == blob
    assert store.size("step-000500/model.safetensors") == len(blob)
    assert store.list((".json",)) == sorted(small)
    assert all(store.read(rel) == data for rel, data in small.items())
    # nothing left behind: no unfinished multipart upload holds storage (and cost) in the bucket
    plain = S3Store(f"s3://{bucket}")
    assert not plain.client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_without_retries_the_proxy_does_throttle(bucket, throttled, monkeypatch):
    """The injection is real: with one attempt per request the first call fails with SlowDown."""
    from botocore.exceptions import ClientError

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    assert retry_settings() == {"mode": "standard", "total_max_attempts": 1}
    store = S3Store(f"s3://{bucket}/x", endpoint_url=throttled.url)
    with pytest.raises(ClientError, match="SlowDown"):
        store.write("a.json", b"{}")


def test_pyarrow_reads_through_throttling(bucket, throttled, s3_server):
    import pyarrow.fs as pafs

    """Ray Data and Ray Train read shards through pyarrow's filesystem: its retries hold as boto3's do."""
    data = os.urandom(3 * 1024 * 1024)
    s3_server.put_object(Bucket=bucket, Key="shards/shard-000000.tar", Body=data)
    fs, path = arrow_location(f"s3://{bucket}/shards", endpoint_url=throttled.url)
    assert path == f"{bucket}/shards"
    infos = fs.get_file_info(pafs.FileSelector(path))
    assert [i.base_name for i in infos] == ["shard-000000.tar"]
    with fs.open_input_file(f"{path}/shard-000000.tar") as fh:
        assert fh.read() == data
    with fs.open_output_stream(f"{path}/copy.tar") as fh:
        fh.write(data)
    assert s3_server.get_object(Bucket=bucket, Key="shards/copy.tar")["Body"].read() == data
    assert throttled.refused, "pyarrow's requests went through the throttling proxy"


def test_region_comes_from_config_then_environment_then_the_bucket(monkeypatch):
    import pyarrow.fs as pafs

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    asked = []

    def bucket_region(bucket):
        asked.append(bucket)
        return "us-west-2"

    monkeypatch.setattr(pafs, "resolve_s3_region", bucket_region)
    assert s3_region("b", region="eu-central-1") == "eu-central-1" and not asked
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert s3_region("b") == "ap-south-1" and not asked
    monkeypatch.delenv("AWS_REGION")
    assert s3_region("my-bucket") == "us-west-2" and asked == ["my-bucket"]  # S3 itself says, never a default
    fs, _ = arrow_location("s3://my-bucket/shards")
    assert fs.region == "us-west-2"

    def unreachable(bucket):
        raise OSError("no route to host")

    monkeypatch.setattr(pafs, "resolve_s3_region", unreachable)
    with pytest.raises(StorageError, match="storage.region or AWS_REGION"):
        s3_region("my-bucket")
