"""The imagefolder data set's decoding (pitsearch.imagefolder) and the checks on its tree: wide images (16-bit,
32-bit, float) scaled to 8 bits or refused, a decode cache from an older decoder not reused, single-class splits
and undecodable files refused with one line naming the field or file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pitsearch.data import load_dataset, validate_data_config
from pitsearch.errors import ConfigError
from pitsearch.paths import CONF_DIR

# 0..65535 in 256 steps, both ends included, as a 16x16 image; class "b" gets the mirror image
GRADIENT = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)


def conf(**overrides):
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "imagefolder.yaml"), overrides)


def write_tree(root: Path, write, classes=("a", "b"), val_classes=None, suffix=".png") -> Path:
    """root/{train,val}/<class>/0<suffix>, each written by write(path, class index)."""
    for split, names in (("train", classes), ("val", classes if val_classes is None else val_classes)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            write(root / split / name / f"0{suffix}", classes.index(name))
    return root


def gray16(index: int) -> np.ndarray:
    return GRADIENT if index == 0 else 65535 - GRADIENT


def write_gray16(path: Path, index: int) -> None:
    from PIL import Image

    Image.fromarray(gray16(index)).save(path)  # uint16 -> mode "I;16" -> a 16-bit grayscale PNG / PGM


def write_rgb48(path: Path, index: int) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand: PIL cannot write one. Channels: gradient, mirror, 300."""
    pixels = np.stack([gray16(index), gray16(1 - index), np.full_like(GRADIENT, 300)], axis=-1)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter byte 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0)  # width, height, bit depth 16, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def scaled(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.rint(values.astype(np.float64) * 255 / 65535))


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("suffix,mode", [(".png", "I;16"), (".pgm", "I")])  # PIL opens a 16-bit PGM as "I"
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path, in_chans, suffix, mode):
    from PIL import Image

    root = write_tree(tmp_path, write_gray16, suffix=suffix)
    assert Image.open(root / "train" / "a" / f"0{suffix}").mode == mode  # really a 16-bit file
    data = load_dataset(conf(root=str(root), img_size=16, in_chans=in_chans))  # native size: no resampling
    assert data.train_x.shape == (2, in_chans, 16, 16)
    for split_x in (data.train_x, data.val_x):
        for index in (0, 1):
            for channel in split_x[index]:  # grayscale replicated into RGB
                assert (channel.double() - scaled(gray16(index))).abs().max() <= 1
    assert data.train_x.unique().numel() > 200  # the old decoder gave only 0 and 255


def test_48bit_rgb_png_keeps_each_channels_high_byte(tmp_path):
    root = write_tree(tmp_path, write_rgb48)
    x = load_dataset(conf(root=str(root), img_size=16)).train_x[0]
    expected = [scaled(GRADIENT), scaled(65535 - GRADIENT), scaled(np.full_like(GRADIENT, 300))]
    for channel, want in zip(x, expected):
        assert (channel.double() - want).abs().max() <= 1
    assert x[2].unique().tolist() == [1]  # 300 >> 8


def test_float_image_in_0_1_is_scaled(tmp_path):
    from PIL import Image

    def write(path, index):
        Image.fromarray((gray16(index) / 65535).astype(np.float32)).save(path)  # mode "F"

    root = write_tree(tmp_path, write, suffix=".tif")
    x = load_dataset(conf(root=str(root), img_size=16, in_chans=1)).train_x
    assert (x[0, 0].double() - scaled(GRADIENT)).abs().max() <= 1


@pytest.mark.parametrize("values,message", [
    (np.array([[0, 70000]], dtype=np.int32), "32-bit integer image with values 0..70000, outside 0..65535"),
    (np.array([[0, 255]], dtype=np.float32), "float image with values 0..255, outside 0..1"),
])
def test_wide_image_without_a_known_range_is_refused(tmp_path, values, message):
    from PIL import Image

    root = write_tree(tmp_path, lambda path, index: Image.fromarray(values).save(path), suffix=".tif")
    with pytest.raises(ConfigError, match=f"^{root / 'train' / 'a' / '0.tif'}: {message}") as err:
        load_dataset(conf(root=str(root), img_size=8))
    assert "\n" not in str(err.value)


def test_cache_from_an_older_decoder_is_not_reused(tmp_path, monkeypatch):
    from pitsearch import imagefolder

    root = write_tree(tmp_path, write_gray16)
    cfg = conf(root=str(root), img_size=16, in_chans=1)
    with monkeypatch.context() as patch:
        patch.setattr(imagefolder, "DECODER_VERSION", 1)
        load_dataset(cfg)
    [stale] = (root / ".pitsearch_cache").glob("*.npy")
    np.lib.format.open_memmap(stale, mode="r+")[:] = 255  # what decoder 1 wrote
    data = load_dataset(cfg)
    assert (data.train_x[0, 0].double() - scaled(GRADIENT)).abs().max() <= 1
    assert len(list((root / ".pitsearch_cache").glob("*.npy"))) == 2


def test_image_files_are_what_sorted_rglob_gives(tmp_path):
    from pitsearch.imagefolder import IMAGE_SUFFIXES, image_files

    for name in ("a.png", "B.PNG", "a b.jpg", "sub/x.png", "sub-x.png", "sub/deep/y.JPG", "sub0/w.webp", "t.tar.png",
                 ".hidden.png", ".hid/z.png", "x.", "notes.txt", "folder.png/in.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "link_dir").symlink_to(tmp_path / "sub")  # not followed, as rglob does not
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "missing.png")
    expected = sorted(p for p in tmp_path.rglob("*")
                      if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    assert image_files(tmp_path) == expected
    names = [str(p.relative_to(tmp_path)) for p in expected]
    assert names[names.index("sub/deep/y.JPG"):] == ["sub/deep/y.JPG", "sub/x.png", "sub-x.png", "sub0/w.webp",
                                                      "t.tar.png"]  # part by part, not character by character


def write_gray8(path: Path, index: int) -> None:
    from PIL import Image

    Image.fromarray(np.full((4, 4), 40 * index, dtype=np.uint8)).save(path)


def test_a_single_class_in_train_is_refused(tmp_path):
    root = write_tree(tmp_path, write_gray8, classes=("ant",))
    with pytest.raises(ConfigError, match=f"^data.root: {root / 'train'} has a single class folder \\('ant'\\); "
                                          "a classifier needs at least 2"):
        validate_data_config(conf(root=str(root), img_size=8))


def test_val_with_a_single_class_is_refused_and_missing_classes_warned(tmp_path):
    root = write_tree(tmp_path / "one", write_gray8, classes=("a", "b"), val_classes=("b",))
    with pytest.raises(ConfigError, match=f"^{root / 'val'}: has a single class folder \\('b'\\)"):
        validate_data_config(conf(root=str(root), img_size=8))
    root = write_tree(tmp_path / "two", write_gray8, classes=("a", "b", "c"), val_classes=("a", "c"))
    with pytest.warns(UserWarning, match="no images of class b; val accuracy covers 2 of 3 classes"):
        assert load_dataset(conf(root=str(root), img_size=8)).num_classes == 3


def test_synthetic_needs_two_classes_in_train():
    base = OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml")
    with pytest.raises(ConfigError, match="^data.num_classes: must be an integer >= 2, got 1$"):
        validate_data_config(OmegaConf.merge(base, {"num_classes": 1}))
    with pytest.raises(ConfigError, match=r"^data: the train split of 'synthetic' holds a single class"):
        load_dataset(OmegaConf.merge(base, {"num_train": 1, "num_val": 4, "img_size": 4}))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_an_undecodable_image_is_one_line_naming_the_file(tmp_path, damage):
    root = write_tree(tmp_path, write_gray16)
    broken = root / "val" / "b" / "0.png"
    whole = broken.read_bytes()
    broken.write_bytes({"truncated": whole[:len(whole) // 2], "empty": b"", "garbage": b"\x00garbage" * 9}[damage])
    with pytest.raises(ConfigError, match=f"^{broken}: cannot read image \\(.+\\)$") as err:
        load_dataset(conf(root=str(root), img_size=16))
    assert "\n" not in str(err.value) and str(err.value).count(str(broken)) == 1
