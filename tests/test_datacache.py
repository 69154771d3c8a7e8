"""pitsearch.datacache through pitsearch.data: one decode per machine however many processes ask at once, a torn
or half-written cache never read (rebuilt), a killed decoder blocking nobody, mapped loads equal to a decode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pitsearch import imagefolder
from pitsearch.data import _channel_stats, load_dataset
from pitsearch.errors import ConfigError
from helpers import conf, write_fake_cifar, write_png_tree

# One process loading the tree at ROOT: every decode_all call appends its process's tag to SYNC/decodes; the
# processes start together (each waits for COUNT ready files) and a decode sleeps SLEEP s, so the others arrive
# while the first holds the lock. Prints what it loaded.
LOADER = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from pitsearch import imagefolder
from pitsearch.data import load_dataset
from pitsearch.paths import CONF_DIR

root, sync, tag, count, sleep = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
decode_all = imagefolder.decode_all

def counted(files, *args):
    with open(sync / "decodes", "a") as log:
        log.write(tag + "\\n")
    time.sleep(sleep)
    return decode_all(files, *args)

imagefolder.decode_all = counted
(sync / f"ready-{tag}").touch()
while len(list(sync.glob("ready-*"))) < count:
    time.sleep(0.01)
cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "imagefolder.yaml"), {"root": str(root), "img_size": 16})
data = load_dataset(cfg)
print(data.train_x.long().sum().item(), data.val_x.long().sum().item(), data.train_y.tolist(), data.mean)
"""


def start_loader(root: Path, sync: Path, tag: str, count: int, sleep: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOADER, str(root), str(sync), tag, str(count), str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def decodes(monkeypatch):
    """The decode_all calls of this process (two per build: train, then val)."""
    calls = []
    decode_all = imagefolder.decode_all

    def counted(files, *args):
        calls.append(len(files))
        return decode_all(files, *args)

    monkeypatch.setattr(imagefolder, "decode_all", counted)
    return calls


def fresh_decode(root: Path, split: str, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(d.name for d in (root / "train").iterdir())
    files = [(p, label) for label, name in enumerate(classes) for p in sorted((root / split / name).glob("*.png"))]
    return imagefolder.decode_all(files, img_size, 3)


def test_three_processes_asking_at_once_decode_once(tmp_path):
    root, sync = write_png_tree(tmp_path / "tree"), tmp_path / "sync"
    sync.mkdir()
    loaders = [start_loader(root, sync, str(i), count=3, sleep=0.5) for i in range(3)]
    outputs = [loader.communicate(timeout=120) for loader in loaders]
    assert [loader.returncode for loader in loaders] == [0, 0, 0], [err for _, err in outputs]
    assert len((sync / "decodes").read_text().split()) == 2  # train + val, by one process
    assert len({out for out, _ in outputs}) == 1
    cached = load_dataset(conf("imagefolder", root=str(root), img_size=16))
    assert outputs[0][0].split()[:2] == [str(cached.train_x.long().sum().item()), str(cached.val_x.long().sum().item())]


def test_a_killed_decoder_leaves_no_cache_and_blocks_nobody(tmp_path, decodes):
    root, sync = write_png_tree(tmp_path / "tree"), tmp_path / "sync"
    sync.mkdir()
    loader = start_loader(root, sync, "killed", count=1, sleep=60)
    deadline = time.monotonic() + 60
    while not (sync / "decodes").exists():  # it holds the lock from here on
        assert loader.poll() is None and time.monotonic() < deadline, loader.stderr and loader.stderr.read()
        time.sleep(0.02)
    loader.send_signal(signal.SIGKILL)
    loader.communicate()
    assert not list((root / ".pitsearch_cache").glob("*.json"))
    started = time.monotonic()
    data = load_dataset(conf("imagefolder", root=str(root), img_size=16))
    assert time.monotonic() - started < 10 and decodes == [12, 6]
    assert torch.equal(data.train_x, fresh_decode(root, "train", 16)[0])


def test_a_torn_or_half_written_cache_is_ignored_and_rebuilt(tmp_path, decodes):
    root = write_png_tree(tmp_path / "tree")
    cfg = conf("imagefolder", root=str(root), img_size=16)
    first = load_dataset(cfg)
    [npy] = (root / ".pitsearch_cache").glob("*.npy")
    whole = npy.read_bytes()
    torn = tmp_path / "torn.npy"  # shorter than its header says; a new file, since `first` maps the old one
    torn.write_bytes(whole[:len(whole) // 2])
    os.replace(torn, npy)
    with pytest.warns(UserWarning, match=f"^{npy}: unreadable cache .*; decoding the images again$"):
        again = load_dataset(cfg)
    assert torch.equal(again.train_x, first.train_x) and npy.read_bytes() == whole
    # A writer killed between its two renames: a complete .npy, no .json, and its stray temporary file
    sidecar = npy.with_suffix(".json")
    sidecar.unlink()
    stray = npy.with_name(npy.name + ".tmp-99999")
    stray.write_bytes(whole[:100])
    assert torch.equal(load_dataset(cfg).val_x, first.val_x)
    assert not stray.exists() and sidecar.exists()
    sidecar.write_text("{not json")
    with pytest.warns(UserWarning, match=f"^{sidecar}: unreadable cache"):
        assert torch.equal(load_dataset(cfg).train_y, first.train_y)
    assert len(decodes) == 2 * 4  # the first build and each of the three rebuilds
    assert torch.equal(load_dataset(cfg).train_x, first.train_x) and len(decodes) == 8


def test_the_mapped_load_equals_a_fresh_decode(tmp_path, decodes):
    root = write_png_tree(tmp_path / "tree")
    cfg = conf("imagefolder", root=str(root), img_size=16)
    load_dataset(cfg)
    mapped = load_dataset(cfg)
    assert len(decodes) == 2  # the second load decoded nothing
    [npy] = (root / ".pitsearch_cache").glob("*.npy")
    assert str(npy) in Path("/proc/self/maps").read_text()  # mapped, not read into memory
    train_x, train_y = fresh_decode(root, "train", 16)
    val_x, val_y = fresh_decode(root, "val", 16)
    assert torch.equal(mapped.train_x, train_x) and torch.equal(mapped.val_x, val_x)
    assert torch.equal(mapped.train_y, train_y) and torch.equal(mapped.val_y, val_y)
    assert (mapped.mean, mapped.std) == _channel_stats(train_x)  # the stored statistics are the computed ones
    assert mapped.train_x.dtype == torch.uint8 and mapped.train_x.is_contiguous()
    mapped.train_x[0] = 0  # copy-on-write: the trainer may write, the file is never changed
    assert torch.equal(load_dataset(cfg).train_x, train_x)


def test_a_bad_image_stores_nothing(tmp_path):
    root = write_png_tree(tmp_path / "tree")
    (root / "val" / "bee" / "1.png").write_bytes(b"\x00garbage")
    cfg = conf("imagefolder", root=str(root), img_size=16)
    with pytest.raises(ConfigError, match=f"^{root / 'val' / 'bee' / '1.png'}: cannot read image"):
        load_dataset(cfg)
    assert sorted(p.suffix for p in (root / ".pitsearch_cache").iterdir()) == [".lock"]


@pytest.mark.parametrize("img_size", [None, 16])
def test_cifar_is_decoded_once_then_mapped(tmp_path, monkeypatch, img_size):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    write_fake_cifar(tmp_path, "cifar10")
    cfg = conf("cifar10", root=str(tmp_path), img_size=img_size)
    first = load_dataset(cfg)
    assert len(list((tmp_path / ".pitsearch_cache").glob(f"cifar10-{img_size or 32}px-*.npy"))) == 1
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", None)  # a second decode would fail
    mapped = load_dataset(cfg)
    assert torch.equal(mapped.train_x, first.train_x) and torch.equal(mapped.val_y, first.val_y)
    assert mapped.class_names == first.class_names and mapped.mean == first.mean
