"""The overlay picture `sam-jax segment` writes: one tile per output mask, side by side.

Each tile is the image with one mask tinted and outlined, the prompt drawn
on top (foreground points green, background points red, the box yellow) and
a caption below with the mask's index and predicted IoU.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from sam_jax.cli.prompt_args import Prompt

MASK_COLOURS = ((30, 144, 255), (255, 140, 0), (186, 85, 211), (0, 200, 200))
FOREGROUND, BACKGROUND, BOX = (0, 220, 0), (230, 30, 30), (255, 215, 0)
TINT = 0.45  # mask colour weight inside the mask
GAP = 4  # white pixels between tiles


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile(image: np.ndarray, mask: np.ndarray, colour, prompt: Prompt) -> Image.Image:
    height, width = mask.shape
    scale = max(height, width)
    tinted = image.astype(np.float32)
    tinted[mask] = (1 - TINT) * tinted[mask] + TINT * np.asarray(colour, np.float32)
    thickness = max(1, scale // 400)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    tinted[edge] = colour
    tile = Image.fromarray(np.clip(tinted + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    line = max(2, scale // 300)
    if prompt.box is not None:
        draw.rectangle([float(v) for v in prompt.box], outline=BOX, width=line)
    if prompt.point_coords is not None:
        radius = max(3, scale // 120)
        for (x, y), label in zip(prompt.point_coords, prompt.point_labels):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                         fill=FOREGROUND if label == 1 else BACKGROUND, outline=(255, 255, 255),
                         width=max(1, radius // 3))
    return tile


def overlay(image: np.ndarray, masks: np.ndarray, scores: np.ndarray, prompt: Prompt,
            captions: Optional[list[str]] = None) -> Image.Image:
    """(H, W, 3) uint8 image, (C, H, W) bool masks, (C,) scores -> one RGB picture, C tiles wide."""
    height, width = image.shape[:2]
    if captions is None:
        captions = [f"mask {i}  IoU {float(s):.3f}" for i, s in enumerate(scores)]
    tiles = [_tile(image, mask, MASK_COLOURS[i % len(MASK_COLOURS)], prompt) for i, mask in enumerate(masks)]
    font = _font(max(12, max(height, width) // 40))
    pad = max(2, max(height, width) // 200)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_height = max((measure.textbbox((0, 0), c, font=font)[3] for c in captions), default=0)
    band = text_height + 2 * pad  # captions go in a band below the tiles
    canvas = Image.new("RGB", (max(1, len(tiles) * (width + GAP) - GAP), height + band), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        canvas.paste(tile, (i * (width + GAP), 0))
        draw.text((i * (width + GAP) + pad, height + pad), caption, fill=(0, 0, 0), font=font)
    return canvas
