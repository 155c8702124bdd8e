"""fetch: download (http, file URL, local path), md5 check, no partial file, no needless re-download."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time

import pytest
from helpers import write_params

from alexnet8.__main__ import run_stage
from alexnet8.errors import DataError
from alexnet8.fetch import download
from alexnet8.files import file_md5

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: several chunks
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Server:
    """A local HTTP server on 127.0.0.1 that serves PAYLOAD, or cuts it short when told to."""

    def __init__(self):
        self.requests = 0
        self.cut_after: int | None = None
        self.trickle_seconds: float | None = None  # send a byte every so many seconds
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if self.path != "/cifar.tar.gz":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                body = PAYLOAD if server.cut_after is None else PAYLOAD[: server.cut_after]
                if server.trickle_seconds:
                    for byte in body[:40]:  # bounded: the client gives up long before
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(server.trickle_seconds)
                    return
                self.wfile.write(body)
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/cifar.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = _Server()
    yield running
    running.close()


def test_http_download_is_verified_and_complete(server, tmp_path):
    target = tmp_path / "raw" / "cifar.tar.gz"
    download(server.url, PAYLOAD_MD5, target)
    assert target.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["cifar.tar.gz"]  # no temporary left behind


def test_an_archive_already_there_is_not_downloaded_again(server, tmp_path):
    target = tmp_path / "cifar.tar.gz"
    download(server.url, PAYLOAD_MD5, target)
    download(server.url, PAYLOAD_MD5.upper(), target)
    assert server.requests == 1


def test_md5_mismatch_names_both_checksums_and_writes_nothing(server, tmp_path):
    target = tmp_path / "cifar.tar.gz"
    wrong = "0" * 32
    with pytest.raises(DataError) as error:
        download(server.url, wrong, target)
    assert f"expected {wrong}" in str(error.value) and f"got {PAYLOAD_MD5}" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_download_cut_short_leaves_nothing_and_a_retry_works(server, tmp_path):
    target = tmp_path / "cifar.tar.gz"
    server.cut_after = len(PAYLOAD) // 3
    with pytest.raises(DataError, match="cut short|failed after"):
        download(server.url, PAYLOAD_MD5, target)
    assert list(tmp_path.iterdir()) == []
    server.cut_after = None
    download(server.url, PAYLOAD_MD5, target)
    assert file_md5(target) == PAYLOAD_MD5


def test_a_missing_file_on_the_server_names_the_status_and_the_param(server, tmp_path):
    missing = server.url.replace("cifar.tar.gz", "missing.tar.gz")
    message = f"download of {missing} failed: the server answered HTTP 404 (Not Found); check fetch.url in params.yaml"
    with pytest.raises(DataError, match=re.escape(message)):
        download(missing, PAYLOAD_MD5, tmp_path / "cifar.tar.gz")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_server_is_named_and_a_retry_suggested(server, tmp_path):
    url = server.url
    server.close()
    with pytest.raises(DataError, match=rf"download of {re.escape(url)} failed after 0 bytes: .*rerun `dvc repro`"):
        download(url, PAYLOAD_MD5, tmp_path / "cifar.tar.gz")
    assert list(tmp_path.iterdir()) == []


def test_a_trickling_server_is_given_up_on_and_nothing_is_written(server, tmp_path, monkeypatch):
    from alexnet8 import fetch

    monkeypatch.setattr(fetch, "STALL_WINDOW_SECONDS", 0.5)
    server.trickle_seconds = 0.1  # each read well within the timeout, the whole far below the minimum rate
    started = time.monotonic()
    with pytest.raises(DataError, match=rf"download of {re.escape(server.url)} stalled: \d+ bytes in the last 0.5 s"):
        download(server.url, PAYLOAD_MD5, tmp_path / "cifar.tar.gz")
    assert time.monotonic() - started < 30  # given up on, not read to its end (a bound, not a speed test)
    assert list(tmp_path.iterdir()) == []


def test_progress_is_logged_without_a_terminal(server, tmp_path, caplog):
    with caplog.at_level("INFO", logger="alexnet8.progress"):
        download(server.url, PAYLOAD_MD5, tmp_path / "cifar.tar.gz")
    lines = [record.getMessage() for record in caplog.records if record.name == "alexnet8.progress"]
    # A line at each tenth passed (reads may pass several at once), the last at 100%, with the rate in MB/s.
    assert 1 <= len(lines) <= 10 and all(line.startswith("cifar.tar.gz: ") for line in lines)
    assert "1048576/1048576 bytes (100%)" in lines[-1] and " MB/s, " in lines[-1]


@pytest.mark.parametrize("as_url", [False, True], ids=["local path", "file URL"])
def test_local_archives_are_copied_and_verified(tmp_path, tiny_archive, as_url):
    source, md5 = tiny_archive
    target = tmp_path / "out" / "cifar.tar.gz"
    download(source.as_uri() if as_url else str(source), md5, target)
    assert file_md5(target) == md5


def test_main_reads_url_and_md5_from_params(tmp_path, tiny_archive):
    source, md5 = tiny_archive
    params = write_params(tmp_path / "params.yaml", **{"fetch.url": str(source), "fetch.md5": md5})
    target = tmp_path / "data" / "raw.tar.gz"
    run_stage(["fetch", "--params", str(params), "--out", str(target)])
    assert file_md5(target) == md5


def test_a_full_disk_names_the_folder_and_the_space_needed_not_a_retry(server, small_disk):
    disk = small_disk("512k")  # PAYLOAD is 1 MiB
    with pytest.raises(DataError) as error:
        download(server.url, PAYLOAD_MD5, disk / "cifar.tar.gz")
    message = str(error.value)
    assert re.fullmatch(
        rf"no space left on the device of {disk}: the archive needs 1.0 MB \(0.5 MB free now\); nothing was written\. "
        r"Free some space and rerun `dvc repro`",
        message,
    ), message
    assert list(disk.iterdir()) == []  # the partial download is gone


@pytest.mark.parametrize("as_url", [False, True], ids=["local path", "file URL"])
def test_a_local_file_that_does_not_exist_says_so_and_to_check_fetch_url(tmp_path, as_url):
    missing = tmp_path / "nowhere" / "cifar.tar.gz"
    with pytest.raises(DataError) as error:
        download(missing.as_uri() if as_url else str(missing), PAYLOAD_MD5, tmp_path / "raw.tar.gz")
    assert str(error.value).startswith(f"{missing} does not exist: check fetch.url in params.yaml")
    assert "retry" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
