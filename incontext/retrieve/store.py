"""The prompt bank's on-disk format: atomic versions, a pointer, and verification on load.

    <bank>/BANK.json            {"format": "incontext-prompt-bank", "format_version": 1, "current": "v000003"}
    <bank>/v000003/manifest.json  the bank's own fields plus "files": {name: {"size", "sha256"}}
    <bank>/v000003/<files>      the blobs the bank wrote

``write_version`` writes every blob and the manifest into a temporary folder, fsyncs, renames it to the next
version, then replaces ``BANK.json`` atomically and deletes versions other than the new one and ``keep`` (the
one the writer started from). A reader therefore sees either the old or the new bank, never a mixture, and a
crash mid-write leaves the old one in place. ``open_version`` follows the pointer and checks every listed file
(size always, SHA-256 unless ``verify="size"``): a truncated, partly copied or edited bank raises
``CorruptBankError`` and is never used.
"""

from __future__ import annotations

import hashlib
import io as _pyio
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from incontext.errors import InputError

__all__ = ["FORMAT", "FORMAT_VERSION", "POINTER", "CorruptBankError", "corrupt", "npy_bytes", "open_version",
           "write_version"]

FORMAT = "incontext-prompt-bank"
FORMAT_VERSION = 1
POINTER = "BANK.json"
FULL_VERIFY_MAX_BYTES = 2 * 1024**3  # verify="auto": SHA-256 below this much data, sizes only above


class CorruptBankError(InputError):
    """A bank on disk is incomplete or inconsistent (e.g. a write was cut off); it is never used."""


def corrupt(root: Path, what: str) -> str:
    """The message of a ``CorruptBankError`` about ``root``."""
    return (f"bank {root} is incomplete or corrupted: {what}. It will not be used; rebuild it with "
            f"`python -m incontext.bank build <source> {root}` (or restore a complete copy)")


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` in .npy format."""
    buf = _pyio.BytesIO()
    np.save(buf, np.ascontiguousarray(a))
    return buf.getvalue()

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = _pyio.BytesIO()
    np.save(buf, np.ascontiguousarray(a))
    return buf.getvalue()


def write_version(root: Path, blobs: dict[str, bytes], manifest: dict, keep: str = "") -> Path:
    """Write ``blobs`` and ``manifest`` (plus format fields and file checksums) as the bank's next version and
    make it current; returns the version folder."""
    from incontext.io import atomic_path

    root.mkdir(parents=True, exist_ok=True)
    version = f"v{_latest_version(root) + 1:06d}"
    tmp = root / f".{version}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        for name, data in blobs.items():
            _write_bytes(tmp / name, data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        _write_bytes(tmp / "manifest.json", json.dumps(doc, indent=1, default=str).encode())
        final = root / version
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(root / POINTER) as p:
        _write_bytes(p, json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "current": version},
                                   indent=1).encode())
        os.chmod(p, 0o644)  # mkstemp makes it private; the bank's other files are world-readable
    for d in root.glob("v[0-9]*"):
        if d.is_dir() and d.name not in (version, keep):
            shutil.rmtree(d, ignore_errors=True)
    return final


def open_version(root: Path, verify: str = "auto") -> tuple[Path, dict]:
    """The current version folder and its manifest, after checking every file it lists.

    Args:
        verify: ``"full"`` (sizes and SHA-256), ``"size"`` (sizes only; still catches truncation) or ``"auto"``
            (full below ``FULL_VERIFY_MAX_BYTES`` of data).
    """
    if verify not in ("auto", "full", "size"):
        raise InputError(f"verify: {verify!r}; use auto, full or size")
    vdir, manifest = _read_manifest(root)
    files = manifest["files"]
    total = sum(int(f["size"]) for f in files.values())
    full = verify == "full" or (verify == "auto" and total < FULL_VERIFY_MAX_BYTES)
    for name, meta in files.items():
        p = vdir / name
        if not p.is_file():
            raise CorruptBankError(corrupt(root, f"{name} is missing from {vdir.name}"))
        size = p.stat().st_size
        if size != int(meta["size"]):
            raise CorruptBankError(corrupt(root, f"{vdir.name}/{name} has {size} bytes, the manifest says "
                                                 f"{meta['size']} (the write was cut off or the copy is partial)"))
        if full and _sha256(p) != meta["sha256"]:
            raise CorruptBankError(corrupt(root, f"{vdir.name}/{name} does not match its SHA-256 in the manifest"))
    return vdir, manifest


def _latest_version(root: Path) -> int:
    nums = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    nums += [int(p.name[2:8]) for p in root.glob(".v[0-9]*.tmp-*") if p.name[2:8].isdigit()]
    return max(nums, default=0)


def _corrupt(root: Path, what: str) -> str:
    return (f"bank {root} is incomplete or corrupted: {what}. It will not be used; rebuild it with "
            f"`python -m incontext.bank build <source> {root}` (or restore a complete copy)")


def _read_manifest(root: Path) -> tuple[Path, dict]:
    if not root.is_dir():
        raise InputError(f"bank: no folder at {root}; build one with `python -m incontext.bank build <source> {root}`")
    ptr = root / POINTER
    if not ptr.is_file():
        if any(root.glob("v[0-9]*")) or any(root.glob(".v[0-9]*.tmp-*")):
            raise CorruptBankError(corrupt(root, f"{POINTER} is missing (the first save was cut off)"))
        raise InputError(f"bank: {root} is not a prompt bank (no {POINTER}); build one with "
                         f"`python -m incontext.bank build <source> {root}`")
    try:
        pointer = json.loads(ptr.read_text())
        if pointer.get("format") != FORMAT:
            raise ValueError(f"format {pointer.get('format')!r}")
        if int(pointer.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(f"bank {root}: format version {pointer['format_version']} is newer than this incontext "
                             f"supports ({FORMAT_VERSION}); upgrade incontext")
        vdir = root / str(pointer["current"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBankError(corrupt(root, f"{POINTER} is unreadable ({exc})")) from exc
    mpath = vdir / "manifest.json"
    if not mpath.is_file():
        raise CorruptBankError(corrupt(root, f"{vdir.name}/manifest.json is missing"))
    try:
        manifest = json.loads(mpath.read_text())
        manifest["files"], manifest["count"], manifest["spec"]  # noqa: B018 (presence check)
    except (ValueError, KeyError) as exc:
        raise CorruptBankError(corrupt(root, f"{vdir.name}/manifest.json is unreadable ({exc})")) from exc
    return vdir, manifest
