"""Image folders -> InternVL pixel tiles, with the processor the model ships with.

Shared by stage 1 (image-only calibration) and the data layer: one place that finds
images, checks they decode, and tiles them exactly as mlx-vlm's InternVL processor does.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import SpeedQError
from ..model import internvl

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def find_images(folder: Path) -> list[Path]:
    """All image files under `folder` (recursive), sorted for determinism."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpeedQError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SpeedQError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def open_image(path: Path):
    """PIL RGB image; a file that is not an image is a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise SpeedQError(f"{path}: not a readable image ({type(e).__name__})") from None


def image_processor(config: dict, dynamic: bool = True):
    """mlx-vlm's InternVL image processor configured from the checkpoint's config.json."""
    from mlx_vlm.models.internvl_chat.processor import InternVLImageProcessor

    tiles = internvl.tiling(config)
    return InternVLImageProcessor(
        size=internvl.image_size(config), do_dynamic_preprocess=dynamic,
        dynamic_min_num=tiles["min"], dynamic_max_num=tiles["max"],
        dynamic_use_thumbnail=tiles["thumbnail"])


def tiles(processor, path: Path) -> mx.array:
    """[n_tiles, 3, size, size] pixel values of one image (dynamic tiling + thumbnail)."""
    out = processor.preprocess([open_image(path)])
    return out["pixel_values"][0]
