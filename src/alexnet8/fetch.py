"""Stage `fetch`: download the CIFAR-10 binary archive and verify its md5.

Reads: params `fetch.url` (http, https, file URL or local path) and `fetch.md5`.
Writes: the archive at `--out` (dvc.yaml gives the path), only once its md5 matches.

The download streams into a temporary file beside the target, hashing as it goes, and is renamed
into place only when complete and verified: an interrupted or corrupt download never leaves a file
that the next stage would read. An archive already in place with the right md5 is not downloaded
again.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from alexnet8.errors import DataError
from alexnet8.files import CHUNK_BYTES, atomic_path, disk_full, file_md5, no_space_message
from alexnet8.params import Params
from alexnet8.progress import progress_bar

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 60  # for connecting, and for each read
# A server that trickles keeps every read within the timeout; require at least this much per window.
STALL_WINDOW_SECONDS = 60
STALL_MIN_BYTES = 64 * 1024


def _local_path(url: str) -> Path | None:
    """The file that `url` names on this machine (a plain path, or a file URL), or None."""
    parsed = urlparse(url)
    if not parsed.scheme or len(parsed.scheme) == 1:  # no scheme, or a Windows drive letter
        return Path(url)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    return None


def _open(url: str):
    """Open `url` for reading: (the stream, its size in bytes or None). A local file that cannot
    be read is a DataError: retrying cannot help, fetch.url must change."""
    path = _local_path(url)
    if path is None:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS)  # noqa: S310 (scheme checked in params)
        length = response.headers.get("Content-Length")
        return response, int(length) if length else None
    try:
        return open(path, "rb"), path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: check fetch.url in params.yaml ({url})") from None
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror}): check fetch.url in params.yaml") from None


def _progress(total: int | None, name: str):
    """A progress bar (or ~10 log lines) in bytes; tqdm's own, shown on a terminal only, when the size is unknown."""
    if total:
        return progress_bar(total, name, "bytes", rate_unit="MB", rate_scale=1e-6)
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None)


def download(url: str, expected_md5: str, destination: str | Path) -> Path:
    """Download `url` to `destination` and check its md5; skip when `destination` already matches.

    Raises DataError naming the URL and the problem (unreachable, cut short, wrong md5); on any
    failure `destination` is left as it was.
    """
    destination = Path(destination)
    expected_md5 = expected_md5.lower()
    if destination.is_file() and file_md5(destination) == expected_md5:
        logger.info("%s is already there with md5 %s: not downloading", destination, expected_md5)
        return destination

    logger.info("downloading %s to %s", url, destination)
    with atomic_path(destination) as temporary:
        received, total, actual_md5 = _stream(url, temporary, destination.name)
        if total is not None and received != total:
            raise DataError(f"download of {url} was cut short: got {received} of {total} bytes")
        if actual_md5 != expected_md5:
            raise DataError(
                f"md5 mismatch for {url}: expected {expected_md5} (params fetch.md5), got {actual_md5}; "
                f"{destination} was not written"
            )
    logger.info("wrote %s (%d bytes, md5 %s)", destination, received, actual_md5)
    return destination


def _stream(url: str, temporary: Path, name: str) -> tuple[int, int | None, str]:
    """Copy `url` into `temporary`, hashing as it goes: (bytes received, the size the source gave or
    None, md5). Raises DataError naming the problem: unreachable, stalled, a full disk."""
    digest = hashlib.md5()
    received, total = 0, None
    try:
        source, total = _open(url)
        with source, open(temporary, "wb") as sink, _progress(total, name) as progress:
            window_start, window_bytes = time.monotonic(), 0
            # read1: return what one receive brings, so a trickling server is noticed.
            for chunk in iter(lambda: source.read1(CHUNK_BYTES), b""):
                sink.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                window_bytes += len(chunk)
                progress.update(len(chunk))
                if time.monotonic() - window_start >= STALL_WINDOW_SECONDS:
                    if window_bytes < STALL_MIN_BYTES:
                        raise DataError(
                            f"download of {url} stalled: {window_bytes} bytes in the last "
                            f"{STALL_WINDOW_SECONDS} s after {received} in all; rerun `dvc repro` to retry, "
                            "or download the archive yourself and set fetch.url to its path"
                        )
                    window_start, window_bytes = time.monotonic(), 0
    except urllib.error.HTTPError as error:
        raise DataError(
            f"download of {url} failed: the server answered HTTP {error.code} ({error.reason}); "
            "check fetch.url in params.yaml"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        folder = temporary.resolve().parent
        if isinstance(error, OSError) and disk_full(error, folder, total or received):
            temporary.unlink(missing_ok=True)  # the space it took is free again
            raise DataError(no_space_message(folder, "the archive", total or received, exact=bool(total))) from None
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"download of {url} failed after {received} bytes: {reason}; rerun `dvc repro` to retry"
        ) from error
    return received, total, digest.hexdigest()


def main(arguments: argparse.Namespace, params: Params) -> None:
    """The stage, as `python -m alexnet8 fetch` runs it: `arguments` are its options, `params` validated."""
    download(params.fetch.url, params.fetch.md5, arguments.out)
