"""Robustness of a trained model on the validation split (the PiT paper's center-occlusion and FGSM checks).

Perturbations act on the un-normalised image (uint8 0..255, what the data set stores), then the batch goes
through `augment.eval` (normalisation only) exactly as clean validation does. That is why a zero-size
perturbation reproduces clean accuracy bit for bit: the same pixels take the same path.

All functions use the first `max_images` validation images in order, in batches, with the model in eval mode
(its previous mode is restored) and leave the parameters untouched: FGSM takes the gradient with respect to
the input only (`torch.autograd.grad`), so no `.grad` is written and no `requires_grad` flag changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# uint8 batch, labels -> normalised model input
Perturb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def occlude_center(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """A copy of uint8 `images` (B, C, H, W) with a centered square of `fraction` of the area set to 0 (black).

    Side = round(sqrt(fraction * H * W)), at most min(H, W); offset (H - side) // 2, (W - side) // 2.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    height, width = images.shape[-2:]
    side = min(round(math.sqrt(fraction * height * width)), height, width)
    occluded = images.clone()
    top, left = (height - side) // 2, (width - side) // 2
    occluded[..., top:top + side, left:left + side] = 0
    return occluded


def fgsm_images(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment,
                epsilon: float) -> torch.Tensor:
    """One-step FGSM on uint8 `images`: x + epsilon * sign(d CE / d x), clamped to 0..255, as float 0..255.

    Working in 0..255 units is the brief's 0..1 recipe scaled by 255 (x/255 + epsilon/255 * sign, clamped to
    [0, 1]); the sign of the gradient is the same in both units, and epsilon 0 returns the clean pixels exactly
    (no x/255*255 round trip). The loss is summed so each image's gradient is its own.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    with torch.enable_grad():
        pixels = images.float().requires_grad_(True)
        loss = F.cross_entropy(model(augment.eval(pixels)).float(), labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, pixels)  # input only: parameters get no .grad
    return (pixels.detach() + epsilon * gradient.sign()).clamp_(0, 255)


@torch.no_grad()
def perturbed_accuracy(model: torch.nn.Module, dataset, perturb: Perturb, max_images: int | None = 1000,
                       batch_size: int = 250) -> float:
    """Top-1 accuracy on the first `max_images` validation images after `perturb` (uint8, labels -> input)."""
    count = len(dataset.val_y) if max_images is None else min(int(max_images), len(dataset.val_y))
    if count <= 0:
        raise ValueError("no validation images to evaluate")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=dataset.val_y.device)
    try:
        for start in range(0, count, batch_size):
            images = dataset.val_x[start:min(start + batch_size, count)]
            labels = dataset.val_y[start:start + len(images)]
            correct += (model(perturb(images, labels)).argmax(-1) == labels).sum()
    finally:
        model.train(was_training)
    return correct.item() / count


def clean_accuracy(model: torch.nn.Module, dataset, augment, *, max_images: int | None = 1000,
                   batch_size: int = 250) -> float:
    """Accuracy on the same images with no perturbation: the reference for the two below."""
    return perturbed_accuracy(model, dataset, lambda images, _labels: augment.eval(images), max_images, batch_size)


def occlusion_accuracy(model: torch.nn.Module, dataset, augment, fraction: float, *,
                       max_images: int | None = 1000, batch_size: int = 250) -> float:
    """Accuracy with a black centered square over `fraction` of each image (0 == `clean_accuracy`)."""
    occlude_center(dataset.val_x[:1], fraction)  # checks fraction before any work
    return perturbed_accuracy(model, dataset, lambda images, _labels: augment.eval(occlude_center(images, fraction)),
                              max_images, batch_size)


def fgsm_accuracy(model: torch.nn.Module, dataset, augment, epsilon: float, *, max_images: int | None = 1000,
                  batch_size: int = 250) -> float:
    """Accuracy under one-step FGSM of size `epsilon` in 0..255 pixel units (0 == `clean_accuracy`)."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    return perturbed_accuracy(
        model, dataset, lambda images, labels: augment.eval(fgsm_images(model, images, labels, augment, epsilon)),
        max_images, batch_size)
