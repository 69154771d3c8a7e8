"""Training speed of pitsearch's PiT against timm's PoolingVisionTransformer with the same architecture.

1. Training steps: both models, same input, measured alternately in one process (so machine noise hits both),
   median over rounds; prints img/s of each and, last, `ratio_vs_timm=<pitsearch / timm>`.
   `bench_preset_vs_timm`: a preset at its own size (pit_s at 224 px) vs timm's model, eager and compiled
   (bench/gpu_sweep.py uses it).
2. One epoch end to end (data + steps + eval) on CIFAR-size synthetic data: pitsearch's device-resident batches
   and batched augmentation against the same model fed by a plain torchvision DataLoader pipeline.

    python bench/train_step.py [--device cpu|cuda] [--rounds 5] [--steps 10] [--epoch-images 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

ARCH = dict(img_size=32, patch_size=4, stride=2, head_dim=32, depths=(2, 6, 4), heads=(2, 4, 8), num_classes=10)


def build_pair(device):
    import timm.models.pit as timm_pit

    from pitsearch.models import build_model

    a = ARCH
    ours = build_model({"depths": list(a["depths"]), "heads": list(a["heads"]), "head_dims": [a["head_dim"]] * 3,
                        "patch_size": a["patch_size"], "stride": a["stride"], "pool": "conv",
                        "img_size": a["img_size"], "in_chans": 3, "num_classes": a["num_classes"]})
    reference = timm_pit.PoolingVisionTransformer(img_size=a["img_size"], patch_size=a["patch_size"], stride=a["stride"],
                                                  base_dims=[a["head_dim"]] * 3, depth=list(a["depths"]),
                                                  heads=list(a["heads"]), num_classes=a["num_classes"])
    return ours.to(device), reference.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(model, x, y, steps, device) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * len(y) / (time.perf_counter() - started)


def alternating_rates(models: dict, x, y, rounds, steps, device) -> dict[str, float]:
    """img/s of each model, median over rounds that take the models in turn (machine noise hits them all)."""
    for model in models.values():
        step_rate(model, x, y, 2, device)  # warm-up: allocator, kernels, torch.compile's compilation
    rates = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(step_rate(model, x, y, steps, device))
    return {name: statistics.median(values) for name, values in rates.items()}


def bench_steps(device, rounds, steps, batch):
    ours, reference = build_pair(device)
    x = torch.randn(batch, 3, ARCH["img_size"], ARCH["img_size"], device=device)
    y = torch.randint(0, ARCH["num_classes"], (batch,), device=device)
    rates = alternating_rates({"ours": ours, "timm": reference}, x, y, rounds, steps, device)
    return rates["ours"], rates["timm"]


def bench_preset_vs_timm(device, preset="pit_s", img_size=224, batch=64, rounds=3, steps=10,
                         compile_backend="inductor") -> dict:
    """A pitsearch preset (conf/model/<preset>.yaml) against timm's model of the same architecture (the preset's
    timm_name, e.g. pit_s_224, random weights), each eager and torch.compile'd, bf16 autocast on CUDA.
    Returns {"img_per_s": {"pitsearch eager": ..., "timm eager": ..., ...}, "macs": MACs per image}."""
    import timm

    from pitsearch.models import build_model
    from pitsearch.profile import model_stats

    ours = build_model(preset, img_size=img_size)
    macs = model_stats(ours, img_size)["macs"]
    reference = timm.create_model(ours.model_config["timm_name"], pretrained=False, img_size=img_size)
    ours, reference = ours.to(device), reference.to(device)
    models = {"pitsearch eager": ours, "timm eager": reference,
              "pitsearch compiled": torch.compile(ours, backend=compile_backend),
              "timm compiled": torch.compile(reference, backend=compile_backend)}
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, ours.model_config["num_classes"], (batch,), device=device)
    return {"img_per_s": alternating_rates(models, x, y, rounds, steps, device), "macs": macs}


def bench_epoch(device, n_images, batch):
    """pitsearch's trainer for one epoch vs the same model + a torchvision DataLoader pipeline."""
    import numpy as np
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset as TorchDataset

    from pitsearch.data import load_dataset
    from pitsearch.models import build_model
    from pitsearch.train import train_model

    data_cfg = {"name": "synthetic", "num_train": n_images, "num_val": n_images // 4, "img_size": 32, "in_chans": 3,
                "num_classes": 10, "seed": 0, "aug": {"crop_padding": 4, "hflip": True, "mixup": 0.0, "cutmix": 0.0}}
    dataset = load_dataset(data_cfg, device=device)
    model_cfg = {"depths": list(ARCH["depths"]), "heads": list(ARCH["heads"]), "head_dims": [ARCH["head_dim"]] * 3,
                 "patch_size": 4, "stride": 2, "pool": "conv", "img_size": 32, "in_chans": 3, "num_classes": 10}
    train_cfg = {"epochs": 1, "batch_size": batch, "eval_batch_size": 500, "opt": "adamw", "lr": 1e-3, "min_lr": 1e-5,
                 "weight_decay": 0.05, "warmup_epochs": 0, "warmup_lr": 1e-5, "label_smoothing": 0.1, "grad_clip": 1.0,
                 "seed": 0, "progress": False}
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    started = time.perf_counter()
    train_model(model, dataset, train_cfg, data_cfg["aug"])
    _sync(device)
    ours_s = time.perf_counter() - started

    # The reference: PIL-free but per-sample torchvision transforms through a DataLoader, the usual recipe.
    train_np = dataset.train_x.cpu().numpy()
    mean, std = dataset.mean, dataset.std

    class Images(TorchDataset):
        def __init__(self, x, y, transform):
            self.x, self.y, self.transform = x, y, transform

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.transform(torch.from_numpy(np.ascontiguousarray(self.x[i]))), int(self.y[i])

    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ConvertImageDtype(torch.float32),
                          T.Normalize(mean, std)])
    eval_tf = T.Compose([T.ConvertImageDtype(torch.float32), T.Normalize(mean, std)])
    train_loader = DataLoader(Images(train_np, dataset.train_y.cpu().numpy(), train_tf), batch_size=batch, shuffle=True,
                              drop_last=True, num_workers=0)
    val_loader = DataLoader(Images(dataset.val_x.cpu().numpy(), dataset.val_y.cpu().numpy(), eval_tf), batch_size=500)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    started = time.perf_counter()
    model.train()
    for x, y in train_loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x.to(device)).argmax(-1) == y.to(device)).sum().item() for x, y in val_loader)
    _sync(device)
    reference_s = time.perf_counter() - started
    return ours_s, reference_s, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epoch-images", type=int, default=4096)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"architecture: img 32, patch 4, stride 2, head dim 32, depths 2-6-4, heads 2-4-8, batch {args.batch}")

    ours_epoch, reference_epoch, _ = bench_epoch(device, args.epoch_images, args.batch)
    n = args.epoch_images
    print(f"epoch end to end ({n} train + {n // 4} val images, crop+flip): pitsearch {ours_epoch:.2f}s "
          f"({n / ours_epoch:.0f} img/s)  vs  DataLoader pipeline {reference_epoch:.2f}s ({n / reference_epoch:.0f} img/s)"
          f"  speedup {reference_epoch / ours_epoch:.2f}x")
    ours, reference = bench_steps(device, args.rounds, args.steps, args.batch)
    print(f"training step: pitsearch {ours:.0f} img/s  timm {reference:.0f} img/s "
          f"(median of {args.rounds} alternating rounds x {args.steps} steps)")
    print(f"ratio_vs_timm={ours / reference:.3f}")


if __name__ == "__main__":
    main()
