"""Batched training augmentation on the data's device: random crop with zero padding, horizontal flip,
normalisation, and mixup / cutmix (timm's `Mixup`), applied to a whole uint8 batch at once.

Every random draw comes from the `torch.Generator` the caller passes (it must live on the batch's device), so one
seed gives bit-identical batches on a given device. timm's `Mixup` draws from numpy's global RNG instead; for it we
take one seed from the generator per batch, seed numpy with it, and restore numpy's previous state afterwards.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F


class BatchAugment:
    """`train` augments and normalises a uint8 batch; `eval` only normalises.

    `cfg_aug` keys (all optional): `crop_padding` (int, 0 = off), `hflip` (bool), `mixup` and `cutmix`
    (Beta alphas, 0 = off). With mixup or cutmix on, `train` returns soft targets (B, num_classes) that already
    carry `label_smoothing`; otherwise it returns the int64 class ids untouched and the loss applies smoothing.
    """

    def __init__(self, cfg_aug: Mapping[str, Any] | None, dataset: Any, num_classes: int,   # dataset: .mean, .std
                 label_smoothing: float = 0.0):
        aug = cfg_aug if cfg_aug is not None else {}
        self.crop_padding = int(aug.get("crop_padding", 0) or 0)
        self.hflip = bool(aug.get("hflip", False))
        mixup_alpha = float(aug.get("mixup", 0.0) or 0.0)
        cutmix_alpha = float(aug.get("cutmix", 0.0) or 0.0)
        if self.crop_padding < 0 or mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("aug.crop_padding, aug.mixup and aug.cutmix must be >= 0")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            # mode="batch": one lambda (and one box) per batch, so no per-sample Python loop inside timm.
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mode="batch",
                               label_smoothing=label_smoothing, num_classes=num_classes)
        std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
        # x_norm = (x / 255 - mean) / std = x * scale + shift, one fused multiply-add per pixel.
        self._scale_shift_cpu = (1.0 / (255.0 * std), -mean / std)
        self._scale_shift: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def soft_targets(self) -> bool:
        """True when `train` returns (B, num_classes) probabilities instead of class ids."""
        return self.mixup is not None

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        if x_uint8.device not in self._scale_shift:
            self._scale_shift[x_uint8.device] = tuple(t.to(x_uint8.device) for t in self._scale_shift_cpu)
        scale, shift = self._scale_shift[x_uint8.device]
        return torch.addcmul(shift, x_uint8.float(), scale)

    def eval(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.normalize(x_uint8)

    def train(self, x_uint8: torch.Tensor, y: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if generator.device.type != x_uint8.device.type:
            raise ValueError(f"generator is on {generator.device} but the batch is on {x_uint8.device}; "
                             f"create it with torch.Generator(device=...)")
        x = self.normalize(self.crop_flip(x_uint8, generator))
        if self.mixup is None:
            return x, y
        return self._mix(x, y, generator)

    def crop_flip(self, x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The random crop and flip alone, uint8 in and out (a CUDA-graphed step runs this part outside its graph,
        pitsearch.graphs); the batch itself when both are off."""
        if self.crop_padding > 0 or self.hflip:
            return random_crop_flip(x_uint8, self.crop_padding, self.hflip, generator)
        return x_uint8

    def _mix(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
        # timm's Mixup asserts an even batch; an odd last batch mixes all but its final sample, which stays as is.
        # x is this call's own tensor, so timm may mix it in place (no copy).
        even = len(x) - len(x) % 2
        soft = mixup_target(y, self.num_classes, 1.0, self.label_smoothing)
        if even:
            numpy_state = np.random.get_state()
            np.random.seed(seed)
            try:
                mixed_x, soft[:even] = self.mixup(x[:even], y[:even])
            finally:
                np.random.set_state(numpy_state)
            if even == len(x):
                return mixed_x, soft
            x[:even] = mixed_x
        return x, soft


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per sample: zero-pad by `padding` on every side and cut an H x W window at a random offset (torchvision's
    RandomCrop(size, padding)), then mirror it with probability 0.5 when `hflip`. Two gathers over the whole
    batch, no loop; the flip is folded into the column indices, so it costs no extra pass."""
    b, c, h, w = x.shape
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=x.device)
        rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, x.shape[-1])
        x = x.gather(2, rows)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if padding > 0:
        cols = cols + torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=x.device)
    if hflip:
        flip = torch.rand(b, 1, generator=generator, device=x.device) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
