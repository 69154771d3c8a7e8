"""How long a worker waits for a data set that another process already decoded (pitsearch.datacache).

Builds, in a temporary folder, an imagefolder tree of N_TRAIN + N_VAL placeholder files (10 classes) and its
decode cache (32 px RGB; the pixels come from a seeded random "decoder", so no image is really decoded), then
times, in fresh processes (page cache warm, as for a sweep's second and later workers):

  - `load_dataset(cfg)`, the trainer's load path, split into the tree scan (validation + the cache key's file
    listing) and the cache map (pitsearch.datacache.load_or_build);
  - the conversion of the whole train split to the normalized float32 tensor the model sees (BatchAugment.eval,
    done per batch by the trainer, here at once), and `.to("cuda")` when a GPU is there;
  - the same load with no tree to scan: the cache entry alone (what cifar10 / cifar100 cost).

    python bench/data_cache.py [--n-train 50000] [--n-val 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
started = time.perf_counter()
import torch
from omegaconf import OmegaConf
from pitsearch import data, datacache
from pitsearch.augment import BatchAugment
from pitsearch.paths import CONF_DIR
imported = time.perf_counter()
timings = {"import_s": imported - started, "scan_s": 0.0, "map_s": 0.0}

def timed(name, function):
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timings[name] += time.perf_counter() - begin
    return wrapper

data._scan_imagefolder = timed("scan_s", data._scan_imagefolder)
datacache.load_or_build = timed("map_s", datacache.load_or_build)
cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "imagefolder.yaml"), {"root": sys.argv[1], "img_size": 32})
begin = time.perf_counter()
dataset = data.load_dataset(cfg)
timings["load_dataset_s"] = time.perf_counter() - begin
begin = time.perf_counter()
x = BatchAugment(None, dataset, dataset.num_classes).eval(dataset.train_x)
timings["to_float_s"] = time.perf_counter() - begin
timings["shape"] = list(x.shape)
if torch.cuda.is_available():
    torch.cuda.init()
    begin = time.perf_counter()
    on_gpu = dataset.to("cuda")
    torch.cuda.synchronize()
    timings["to_cuda_s"] = time.perf_counter() - begin
print(json.dumps(timings))
"""


def make_tree(root: Path, n_train: int, n_val: int, classes: int = 10) -> None:
    for split, count in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(c, count, classes):
                (folder / f"{i:06d}.png").touch()


def build_cache(root: Path) -> float:
    """The cache written through the real path, with a random decoder standing in for PIL; its wall time."""
    import torch
    from omegaconf import OmegaConf

    from pitsearch import data, imagefolder
    from pitsearch.paths import CONF_DIR

    generator = torch.Generator().manual_seed(0)

    def random_decode(files, img_size, in_chans):
        x = torch.randint(0, 256, (len(files), in_chans, img_size, img_size), generator=generator, dtype=torch.uint8)
        return x, torch.tensor([label for _, label in files], dtype=torch.int64)

    imagefolder.decode_all = random_decode
    begin = time.perf_counter()
    data.load_dataset(OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "imagefolder.yaml"),
                                      {"root": str(root), "img_size": 32}))
    return time.perf_counter() - begin


def cache_only(root: Path) -> dict:
    """The cache entry alone, mapped in a fresh process through datacache (no tree scan): the cifar case."""
    [sidecar] = (root / ".pitsearch_cache").glob("*.json")
    code = r"""
import json, sys, time
import numpy as np, torch
begin = time.perf_counter()
meta = json.loads(open(sys.argv[1] + ".json").read())
x = torch.from_numpy(np.load(sys.argv[1] + ".npy", mmap_mode="c"))
train_y = torch.tensor(meta["train_y"])
mapped = time.perf_counter() - begin
std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
begin = time.perf_counter()
y = (x[:meta["n_train"]].float() / 255 - mean) / std
print(json.dumps({"map_s": mapped, "to_float_s": time.perf_counter() - begin}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(sidecar.with_suffix(""))], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-val", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        begin = time.perf_counter()
        make_tree(root, args.n_train, args.n_val)
        print(f"tree of {args.n_train} + {args.n_val} placeholder files: {time.perf_counter() - begin:.2f} s")
        print(f"cache build (random decoder, write + rename): {build_cache(root):.2f} s")
        [npy] = (root / ".pitsearch_cache").glob("*.npy")
        print(f"cache entry: {npy.stat().st_size / 2**20:.1f} MiB")
        for repeat in range(args.repeats):
            run = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True)
            if run.returncode:
                sys.exit(run.stderr)
            print(f"load_dataset in a fresh process, run {repeat + 1}: {run.stdout.strip()}")
        for repeat in range(args.repeats):
            print(f"cache entry alone, run {repeat + 1}: {json.dumps(cache_only(root))}")


if __name__ == "__main__":
    main()
