"""Finding and decoding image files for the `imagefolder` data set (pitsearch.data checks the tree and caches).

PIL's `convert("L")` / `convert("RGB")` clips modes wider than 8 bits instead of scaling them: a 16-bit PNG
(mode "I;16") came out as 0 or 255, a 0..1 float image as 0 or 1. Those modes are scaled to 8 bits here before
any conversion; a wide image whose range is unknown is refused with a one-line ConfigError naming the file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pitsearch.errors import ConfigError

# Part of the decode cache's key (pitsearch.data): bump it whenever decoding changes, so that no cache written
# by an older decoder is reused. 1: straight convert() (16-bit / float clipped); 2: wide modes scaled.
DECODER_VERSION = 2

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}

# 16 bits per pixel, any byte order. 16-bit RGB(A) and gray+alpha PNGs need nothing here: PIL opens them as
# 8-bit "RGB"/"RGBA" already, keeping each value's high byte (v >> 8).
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def _to_8bit(image, path: Path):
    """Scale a 16-bit, 32-bit integer or float grayscale image to mode "L"; 8-bit modes pass through.

    16-bit values map to v >> 8 (the high byte), not round(v * 255 / 65535): the two differ by at most 1, and the
    high byte is what PIL itself keeps for 16-bit RGB PNGs, so a gray and a colour 16-bit tree scale alike.
    The nominal range (0..65535, 0..1) is used, never each image's own min..max: stretching per image would
    change how images compare to each other, which is what a classifier learns from.
    """
    from PIL import Image

    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        # Mode "I" (32-bit signed) is what PIL gives 16-bit PGMs (maxval rescaled to 0..65535) and 32-bit TIFFs:
        # taken as 16-bit when it fits, since a 32-bit image has no nominal range to scale from.
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ConfigError(str(path), f"32-bit integer image with values {values.min()}..{values.max()}, "
                              "outside 0..65535: no known range to scale to 8 bits; save it as 8- or 16-bit")
        return Image.fromarray((values.astype(np.int64) >> 8).astype(np.uint8), "L")
    if mode == "F":
        values = np.asarray(image)
        # 0..1 is the usual convention for float images; anything else (0..255, HDR, depth) has no known scale.
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ConfigError(str(path), f"float image with values {np.nanmin(values):g}..{np.nanmax(values):g}, "
                              "outside 0..1: no known range to scale to 8 bits; save it as 8- or 16-bit")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L")
    return image


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` at any depth, not hidden, sorted as Paths sort (part by part), without following
    links to folders: what sorted(folder.rglob("*")) filtered gives, in half the time (os.scandir's entry types
    instead of a stat per file, no Path until the end; a 60,000-image tree is scanned on every load)."""
    found, pending = [], [str(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    pending.append(entry.path)
                elif (not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
                      and entry.is_file()):
                    found.append(entry.path)
    # Part by part: with the separator as "\0", below every character of a name, plain string order is that order
    return [Path(path) for path in sorted(found, key=lambda path: path.replace(os.sep, "\0"))]


def decode(path: Path, img_size: int, in_chans: int) -> np.ndarray:
    """One image as uint8 (img_size, img_size) or (img_size, img_size, 3), squashed to the square size.

    Scaling to 8 bits comes before the resize so that a 16-bit image and its 8-bit copy decode identically.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = _to_8bit(image, path).convert("L" if in_chans == 1 else "RGB")
            return np.asarray(image.resize((img_size, img_size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except ConfigError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        # PIL's "cannot identify image file '/the/path'" repeats the path the message starts with
        reason = " ".join(str(err).replace(f" {str(path)!r}", "").split()) or type(err).__name__
        raise ConfigError(str(path), f"cannot read image ({reason})") from None


def decode_all(files: list[tuple[Path, int]], img_size: int, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 NCHW images, int64 labels) for (path, label) pairs, decoded in threads (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(lambda item: decode(item[0], img_size, in_chans), files))
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if in_chans == 1 else x.permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label for _, label in files], dtype=torch.int64)
