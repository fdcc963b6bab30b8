"""Download the real Oxford-IIIT Pet dataset through torchvision's ``OxfordIIITPet``.

torchvision unpacks the official archives into ``<dir>/oxford-iiit-pet/`` in the official layout
that :mod:`labseg.data` reads. Without internet the download would hang on its socket; a quick
reachability check first makes it fail within seconds, saying how to place the files by hand.
"""
from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 5.0


class DownloadError(RuntimeError):
    pass


def _manual_help(target: Path) -> str:
    return (f"Put the data there by hand instead: download images.tar.gz and annotations.tar.gz from "
            f"https://www.robots.ox.ac.uk/~vgg/data/pets/ on a machine with internet, then unpack both into "
            f"{target} so that it holds images/ and annotations/ (with annotations/trimaps/, trainval.txt, "
            f"test.txt), and train with `labseg train --data {target}`.")


def _reachable(url: str, timeout: float) -> str | None:
    """None if a TCP connection to the url's host opens within ``timeout``, else the reason."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def download(root: str | Path, timeout: float = CONNECT_TIMEOUT_S) -> Path:
    """Download and unpack Oxford-IIIT Pet under ``root``; return the dataset folder."""
    from torchvision.datasets import OxfordIIITPet

    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise DownloadError(f"{root} is a file; expected the folder to download the dataset into")
    target = root / "oxford-iiit-pet"
    for ready in (root, target):    # already there: in DIR itself (as --data takes it) or where torchvision puts it
        if (ready / "images").is_dir() and (ready / "annotations" / "trimaps").is_dir():
            return ready
    url = OxfordIIITPet._RESOURCES[0][0]
    reason = _reachable(url, timeout)
    if reason:
        raise DownloadError(f"cannot reach {urlparse(url).hostname} to download Oxford-IIIT Pet ({reason}).\n"
                            + _manual_help(target))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)    # a stalled transfer fails instead of hanging forever
    try:
        OxfordIIITPet(root, split="trainval", target_types="segmentation", download=True)
    except Exception as e:
        raise DownloadError(f"download into {target} failed ({type(e).__name__}: {e}).\n"
                            + _manual_help(target)) from None
    finally:
        socket.setdefaulttimeout(previous)
    return target
