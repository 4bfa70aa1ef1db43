"""Fetching dataset files over the network (urllib, short timeout) with an MD5 check.

`fetch_url` is the one function that touches the network; loaders call it through this module
(``download.fetch_url``) so tests can replace it with a function that writes local files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import tqdm

DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK_BYTES = 1 << 20


class DownloadError(OSError):
    """A file could not be fetched from any of its URLs (network down, HTTP error, checksum mismatch)."""


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 digest of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(url: str, destination: str | os.PathLike, *, timeout: float = DOWNLOAD_TIMEOUT_S,
              progress: bool = True) -> None:
    """Download ``url`` to ``destination`` (written to a temporary file, then renamed into place).

    Raises urllib.error.URLError / OSError / TimeoutError on failure; leaves no partial file behind.
    """
    destination = Path(destination)
    descriptor, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        import urllib.request  # imported here: only a download needs it

        request = urllib.request.Request(url, headers={"User-Agent": "jaxnn-data"})
        with urllib.request.urlopen(request, timeout=timeout) as response, os.fdopen(descriptor, "wb") as out:
            size = response.headers.get("Content-Length")
            with tqdm.tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                           desc=f"download {destination.name}", disable=not progress, leave=False) as bar:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def download_verified(urls: Sequence[str], destination: str | os.PathLike, md5: str | None, *,
                      timeout: float = DOWNLOAD_TIMEOUT_S, progress: bool = True) -> Path:
    """Fetch ``destination`` from the first of ``urls`` (mirrors) that works and whose MD5 equals ``md5``.

    A file with the wrong checksum is deleted and the next mirror tried. Raises `DownloadError` listing
    every URL tried and why it failed, after removing the folders it created (it leaves nothing behind).
    """
    destination = Path(destination)
    created = [folder for folder in (destination.parent, *destination.parent.parents) if not folder.exists()]
    destination.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        try:
            fetch_url(url, destination, timeout=timeout, progress=progress)
        except (OSError, TimeoutError, ValueError) as error:  # urllib.error.URLError is an OSError
            failures.append(f"{url}: {type(error).__name__}: {error}")
            continue
        if not destination.is_file():
            failures.append(f"{url}: the fetch wrote no file at {destination}")
            continue
        if md5 is not None:
            actual = file_md5(destination)
            if actual != md5:
                destination.unlink()
                failures.append(f"{url}: MD5 mismatch (expected {md5}, got {actual})")
                continue
        return destination
    for folder in created:  # deepest first: a failed download leaves no empty folders behind
        try:
            folder.rmdir()
        except OSError:
            break
    raise DownloadError(f"could not download {destination.name}: " + "; ".join(failures))

