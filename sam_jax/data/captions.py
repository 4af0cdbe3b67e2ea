"""Captions for the synthetic scenes' objects: "<size> <colour> <shape>", e.g. "large red ellipse".

For the paper's text prompts (section 7.5, appendix D.5) on `sam_jax.data.synthetic` scenes: a
tiny CLIP learns (object crop, caption) pairs (`experiments/train_clip.py`) and SAM is then
prompted with the caption's text embedding.

Words, all from `Scene` fields and deterministic:

  size    the object's visible area (`masks[i].sum()`, parts included) as a fraction f of the
          image area: "small" for f < 0.04, "medium" for 0.04 <= f < 0.12, "large" for f >= 0.12
          (`SIZE_THRESHOLDS`). With objects of at least ~1% of the image (the paper's 100^2 at 1024)
          the three words come out roughly a third each on the `sam_synthetic/cpu` images.
  colour  one of the 12 names of `COLOURS` for `Scene.colour[i]` (the mean RGB of the pixels the
          object shows itself): the name of the nearest prototype colour by Euclidean distance in
          CIELAB (CIE76 delta E, sRGB with the D65 white), a perceptual-enough space. Each name
          has 1-3 prototypes (its bright colour and darker / lighter shades) so that the muted
          colours of uniformly drawn RGB are named by hue; on uniform RGB the names come out
          from ~1% (black) to ~21% (green), most between 4% and 15%.
  shape   `Scene.kind[i]`: "ellipse", "rectangle", "polygon", "blob" or "ring".

Only whole objects (level 0) get captions (`captioned_objects`), and only those that show their
own colour on at least half their mask (a whole mostly covered by its parts has no single
colour). `unique_captions` keeps the captioned objects whose caption no other whole of the image
shares, the unambiguous phrases an evaluation can prompt with.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from sam_jax.data.synthetic import Scene

SIZE_WORDS = ("small", "medium", "large")
SIZE_THRESHOLDS = (0.04, 0.12)  # visible area / image area: small < 0.04 <= medium < 0.12 <= large

# The named colours, each with one to three sRGB prototypes (0-255): a bright one and darker or lighter
# shades, so that the many muted colours of uniformly drawn RGB are named by hue ("dark green" is
# "green", not "grey"). A colour takes the name of its nearest prototype in CIELAB.
COLOURS: Dict[str, Tuple[Tuple[int, int, int], ...]] = {
    "black": ((15, 15, 15),),
    "grey": ((128, 128, 128), (80, 80, 80)),
    "white": ((240, 240, 240),),
    "red": ((210, 30, 30), (140, 15, 25)),
    "orange": ((240, 140, 20), (225, 100, 45)),
    "yellow": ((235, 220, 40), (180, 170, 40)),
    "green": ((40, 160, 50), (30, 100, 40), (120, 210, 80)),
    "cyan": ((40, 200, 210), (20, 120, 130)),
    "blue": ((40, 70, 210), (30, 40, 130), (100, 150, 235)),
    "purple": ((130, 50, 170), (70, 40, 110)),
    "pink": ((240, 120, 190), (200, 40, 150)),
    "brown": ((120, 75, 35), (80, 50, 25)),
}
SHAPE_WORDS = ("ellipse", "rectangle", "polygon", "blob", "ring")
MIN_OWN_FRACTION = 0.5  # a captioned object shows its own colour on at least this share of its mask


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 255] -> (..., 3) CIELAB (L in [0, 100]), D65 white."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PROTOTYPE_NAMES = tuple(name for name, prototypes in COLOURS.items() for _ in prototypes)
_PROTOTYPE_LAB = srgb_to_lab(np.array([rgb for prototypes in COLOURS.values() for rgb in prototypes], np.float64))


def colour_name(rgb) -> str:
    """The name (`COLOURS`) of the prototype nearest to an sRGB (3,) colour in CIELAB (CIE76 delta E)."""
    distance = np.linalg.norm(_PROTOTYPE_LAB - srgb_to_lab(np.asarray(rgb, np.float64).reshape(3)), axis=-1)
    return _PROTOTYPE_NAMES[int(np.argmin(distance))]


def size_word(fraction: float) -> str:
    """"small" / "medium" / "large" for a visible-area fraction of the image (`SIZE_THRESHOLDS`)."""
    return SIZE_WORDS[int(np.searchsorted(SIZE_THRESHOLDS, fraction, side="right"))]


def attributes(scene: Scene, index: int, image_area: Optional[float] = None) -> Tuple[str, str, str]:
    """(size, colour, shape) words of object `index`; `image_area` defaults to the scene's H * W."""
    if image_area is None:
        image_area = scene.image.shape[0] * scene.image.shape[1]
    fraction = float(scene.masks[index].sum()) / float(image_area)
    return size_word(fraction), colour_name(scene.colour[index]), str(scene.kind[index])


def caption(scene: Scene, index: int, image_area: Optional[float] = None) -> str:
    """"<size> <colour> <shape>" for object `index`, e.g. "large red ellipse" (module docstring)."""
    return " ".join(attributes(scene, index, image_area))


def captioned_objects(scene: Scene, min_area: int = 0) -> List[int]:
    """Indices of the objects that get captions: wholes (level 0) with at least `min_area` visible
    pixels that show their own colour on at least `MIN_OWN_FRACTION` of their mask."""
    n = len(scene.masks)
    area = scene.masks.reshape(n, -1).sum(axis=1)
    flat = scene.owner.ravel()
    own = np.bincount(flat[flat >= 0], minlength=n)[:n]
    keep = (scene.level == 0) & (area >= max(min_area, 1)) & (own >= MIN_OWN_FRACTION * area)
    return [int(i) for i in np.flatnonzero(keep)]


def unique_captions(scene: Scene, min_area: int = 0, image_area: Optional[float] = None) -> Dict[int, str]:
    """{index: caption} of the captioned objects (`captioned_objects(scene, min_area)`) whose caption
    no other whole (level 0) of the scene has, captioned or not: a phrase that also fits a whole too
    small or too covered to be captioned is ambiguous all the same."""
    wholes = [int(i) for i in np.flatnonzero(scene.level == 0)]
    texts = {i: caption(scene, i, image_area) for i in wholes}
    counts: Dict[str, int] = {}
    for text in texts.values():
        counts[text] = counts.get(text, 0) + 1
    return {i: texts[i] for i in captioned_objects(scene, min_area) if counts[texts[i]] == 1}
