"""Decoded data sets shared by every process on a machine: built once under a file lock, then memory-mapped.

An entry is two files in the cache folder, named PREFIX-DIGEST where DIGEST hashes the caller's key (which holds
the decoder version, so nothing written by an older decoder is reused):

- NAME.npy:  every image, uint8 (N, C, H, W), the train split then the val split
- NAME.json: the key's sha1, the shape, the train count, labels, class names, the train split's channel
             statistics, and what the caller describes the entry with (decoder version, size, source)

Each file is written under a temporary name and renamed into place, the .json last: a .json means its .npy is
complete, and a killed writer leaves a stray temporary file, never a torn entry. The first process to miss takes
NAME.lock (fcntl.flock, released by the kernel when its holder dies), decodes and writes; the others block on the
lock, then map the finished file. Maps share the page cache across workers: a load costs a map, not a decode or
a read, and the stored statistics spare a pass over every pixel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from pitsearch.filelock import file_lock

__all__ = ["Decoded", "load_or_build", "locked"]

log = logging.getLogger("pitsearch.datacache")

# Part of every entry's digest: bump it when the files' layout changes.
FORMAT_VERSION = 1


class Decoded(NamedTuple):
    """A decoded data set: uint8 NCHW images and int64 labels (CPU tensors), class names, train-split statistics
    (per channel, 0..1 units, as pitsearch.data computes them)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_or_build(cache_dir: Path, prefix: str, key: Any, build: Callable[[], Decoded],
                  about: dict | None = None) -> Decoded:
    """The cached entry for `key`, mapped; else `build()` once per machine (under the entry's lock), stored, mapped.

    `about` (small, JSON) is copied into the .json for whoever reads it; `key` may be large (a file listing): only
    its sha1 is stored. Errors from `build` (a ConfigError naming a bad file) propagate and nothing is stored. A
    folder that cannot be written only warns: the data set is built in this process and used uncached.
    """
    digest = _key_sha1(key)  # once: a key holding a 60,000-file listing takes tens of ms to hash
    name = f"{prefix}-{digest[:16]}"  # the .json holds all 40 digits, compared on every read
    npy, sidecar = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    found = _read(npy, sidecar, digest)
    if found is not None:
        return found
    with contextlib.ExitStack() as stack:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(cache_dir / f"{name}.lock",
                                       waiting=f"{cache_dir}: another process is decoding {name}; waiting for it"))
        except OSError as err:
            warnings.warn(f"{cache_dir}: cannot write the decode cache ({err}); set data.cache_dir", stacklevel=2)
            return build()
        found = _read(npy, sidecar, digest)  # built by the process that held the lock while this one waited
        if found is not None:
            return found
        for stray in cache_dir.glob(f"{name}.*.tmp-*"):  # only a lock holder writes these: their writer died
            stray.unlink(missing_ok=True)
        decoded = build()
        try:
            _write(npy, sidecar, digest, decoded, about or {})
        except OSError as err:
            warnings.warn(f"{cache_dir}: cannot write the decode cache ({err}); set data.cache_dir", stacklevel=2)
            return decoded
        return _read(npy, sidecar, digest) or decoded


def locked(path: Path, waiting: str = ""):
    """An exclusive lock on `path` (pitsearch.filelock); `waiting` is logged when another process holds it."""
    return file_lock(path, on_wait=(lambda: log.info(waiting)) if waiting else None)


def _key_sha1(key: Any) -> str:
    return hashlib.sha1(json.dumps([FORMAT_VERSION, key], sort_keys=True).encode()).hexdigest()


def _write(npy: Path, sidecar: Path, digest: str, decoded: Decoded, about: dict) -> None:
    n_train, n_val = len(decoded.train_x), len(decoded.val_x)
    shape = (n_train + n_val, *decoded.train_x.shape[1:])
    pid = os.getpid()
    partial = npy.with_name(f"{npy.name}.tmp-{pid}")
    try:
        # Written in place through a map: no concatenated copy of the whole data set in memory.
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        images[:n_train] = decoded.train_x.numpy()
        images[n_train:] = decoded.val_x.numpy()
        images.flush()
        del images
        _fsync(partial)
        os.replace(partial, npy)
        meta = {**about, "key_sha1": digest, "shape": list(shape), "n_train": n_train, "classes": list(decoded.classes),
                "train_y": decoded.train_y.tolist(), "val_y": decoded.val_y.tolist(),
                "mean": list(decoded.mean), "std": list(decoded.std)}
        partial = sidecar.with_name(f"{sidecar.name}.tmp-{pid}")
        partial.write_text(json.dumps(meta))
        _fsync(partial)
        os.replace(partial, sidecar)  # the commit: from here on the entry is read
    finally:
        partial.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Data on disk before the rename, so that a power cut cannot leave a renamed file without its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(npy: Path, sidecar: Path, digest: str) -> Decoded | None:
    """The entry mapped copy-on-write (pages shared until written, writes private, the file never changes);
    None when absent, and None with a warning when unreadable, torn or not what its name says (rebuilt then)."""
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        warnings.warn(f"{sidecar}: unreadable cache ({err}); decoding the images again", stacklevel=2)
        return None
    try:
        if meta["key_sha1"] != digest:
            raise ValueError("written for another key")
        images = np.load(npy, mmap_mode="c")  # a file shorter than its header says is refused here
        n_train, shape = meta["n_train"], tuple(meta["shape"])
        if images.dtype != np.uint8 or images.shape != shape:
            raise ValueError(f"holds {images.dtype} {images.shape}, its .json says uint8 {shape}")
        if len(meta["train_y"]) != n_train or n_train + len(meta["val_y"]) != shape[0]:
            raise ValueError("label counts do not match the images")
        x = torch.from_numpy(images)
        return Decoded(x[:n_train], torch.tensor(meta["train_y"], dtype=torch.int64), x[n_train:],
                       torch.tensor(meta["val_y"], dtype=torch.int64), tuple(meta["classes"]),
                       tuple(meta["mean"]), tuple(meta["std"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"{npy}: unreadable cache ({err}); decoding the images again", stacklevel=2)
        return None
