"""Procedural scenes with exact masks: textured objects that nest, occlude and touch.

`generate_scene(seed, H, W)` returns a `Scene`:

    image   (H, W, 3) uint8
    masks   (N, H, W) bool    visible region of each object (parts included)
    parent  (N,) int64        index of the containing object, -1 for a whole
    level   (N,) int64        0 whole, 1 part, 2 subpart
    owner   (H, W) int32      index of the object whose colour each pixel shows, -1 background
    kind    (N,) str (<U9)    the shape drawn: "ellipse", "rectangle", "polygon", "blob" or "ring"
                              (wholes); a part's is the shape it was cut by ("ellipse" ...
                              "blob"), or "band" for parts that tile their whole in bands
    colour  (N, 3) float32    mean RGB (0-255) of the image pixels the object itself shows
                              (`owner == i`: its parts' pixels excluded); of its whole mask
                              when its parts cover it entirely

Objects are painted back to front without anti-aliasing, each pixel taking
the colour of the top-most object covering it, so a mask is exactly the union
of `owner` over the object and its descendants. A part's shape is clipped to
its whole's, a subpart's to its part's, so part masks lie inside whole masks
and occlusion clips an object and its parts alike. Masks are in paint order,
each object followed by its parts: `parent[i] < i`.

`kind` and `colour` describe objects for captions (`sam_jax.data.captions`); they
are recorded without any extra random draw, so a seed's image and masks are the
same as before they existed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple, Union

import numpy as np

Seed = Union[int, np.random.SeedSequence, np.random.Generator]

MIN_TARGET_AREA = 30  # the smallest object drawn, in pixels ("a few dozen")
_PART_MIN_PARENT_AREA = 400  # objects smaller than this get no parts
_MAX_CHILD_FRACTION = 0.9  # a part showing >= 90% of its parent's pixels is dropped (near-duplicate mask)
_SHAPES = ("ellipse", "rectangle", "polygon", "blob")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One painted object: its shape (clipped to the image and to its parent's shape) and texture."""

    y0: int
    x0: int
    shape: np.ndarray  # (h, w) bool, at image[y0:y0+h, x0:x0+w]
    texture: np.ndarray  # (h, w, 3) uint8


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) bool
    parent: np.ndarray  # (N,) int64
    level: np.ndarray  # (N,) int64
    owner: np.ndarray  # (H, W) int32
    kind: np.ndarray  # (N,) str: the object's shape kind (module docstring)
    colour: np.ndarray  # (N, 3) float32: mean RGB of the pixels the object shows itself
    layers: Optional[List[Layer]] = None  # (N,) in mask order, with keep_layers=True
    background: Optional[np.ndarray] = None  # (H, W, 3) uint8, with keep_layers=True


@dataclasses.dataclass
class _Shape:
    y0: int  # patch origin, may lie outside the image
    x0: int
    mask: np.ndarray  # (h, w) bool

    def shifted(self, dy: int, dx: int) -> "_Shape":
        return _Shape(self.y0 + dy, self.x0 + dx, self.mask)


@dataclasses.dataclass
class _Object:
    shape: _Shape  # clipped to the image and the parent's shape
    parent: int
    level: int
    palette: np.ndarray  # (2, 3) float32 end colours of the texture
    texture: dict
    kind: str = ""  # the shape kind drawn (Scene.kind)


def sample_size(rng: np.random.Generator, min_side: int, max_side: int) -> Tuple[int, int]:
    """(height, width), each log-uniform in [min_side, max_side]: aspect ratios up to max/min."""
    h, w = np.exp(rng.uniform(math.log(min_side), math.log(max_side + 1), size=2))
    return min(int(h), max_side), min(int(w), max_side)


def generate_scene(seed: Seed, height: int, width: int, *, min_area: int = 16,
                   keep_layers: bool = False) -> Scene:
    """A random scene of size (height, width); the same seed gives the same scene.

    Objects whose visible area is below `min_area` pixels are removed with
    their parts (and the scene repainted without them). `keep_layers` also
    returns each object's shape and texture and the background, for checks.
    """
    rng = np.random.default_rng(seed)
    h, w = int(height), int(width)
    background_spec = _background_spec(rng)
    objects = _plan_objects(rng, h, w, background_spec["palette"])
    keep = _visible_objects(objects, h, w, min_area)

    index = -np.ones(len(objects), np.int64)
    index[keep] = np.arange(len(keep))
    objects = [dataclasses.replace(objects[i], parent=int(index[objects[i].parent]) if objects[i].parent >= 0 else -1)
               for i in keep]
    owner = _paint_owner(objects, h, w)

    background = _render_background(background_spec, h, w)
    image = background.copy()
    layers = []
    masks = np.zeros((len(objects), h, w), bool)
    for i, obj in enumerate(objects):
        s = obj.shape
        window = (slice(s.y0, s.y0 + s.mask.shape[0]), slice(s.x0, s.x0 + s.mask.shape[1]))
        own = owner[window] == i
        image[window][own] = _render_texture(obj.texture, obj.palette, s.mask.shape, where=own)
        masks[i][window] = own
        if keep_layers:
            layers.append(Layer(s.y0, s.x0, s.mask, _render_texture(obj.texture, obj.palette, s.mask.shape)))
    colour = _mean_colours(image, owner, len(objects))
    for i in range(len(objects) - 1, -1, -1):  # children come after their parents, inside their windows
        if objects[i].parent >= 0:
            s = objects[i].shape
            window = (slice(s.y0, s.y0 + s.mask.shape[0]), slice(s.x0, s.x0 + s.mask.shape[1]))
            masks[objects[i].parent][window] |= masks[i][window]
    for i in np.flatnonzero(np.isnan(colour[:, 0])):  # no pixel of its own: its parts tile it
        colour[i] = image[masks[i]].mean(axis=0)
    return Scene(
        image=image,
        masks=masks,
        parent=np.array([o.parent for o in objects], np.int64),
        level=np.array([o.level for o in objects], np.int64),
        owner=owner,
        kind=np.array([o.kind for o in objects], dtype="<U9").reshape(-1),
        colour=colour,
        layers=layers if keep_layers else None,
        background=background if keep_layers else None,
    )


# ---------------------------------------------------------------- planning


def _plan_objects(rng, h: int, w: int, background_palette) -> List[_Object]:
    """Wholes back to front (large ones mostly behind), each followed by its parts and subparts."""
    n_wholes = int(rng.integers(3, 7 + round(10 * math.sqrt(h * w) / 256)))
    log_areas = rng.uniform(math.log(MIN_TARGET_AREA), math.log(0.8 * h * w), size=n_wholes)
    order = np.argsort(-(log_areas + rng.normal(0, 1.0, size=n_wholes)))
    areas = np.exp(log_areas[order])
    centred = rng.random() < 0.5
    if centred:  # half the scenes have one big object at the back, as a table under things
        areas = np.minimum(areas, 0.2 * h * w)
        areas[0] = h * w * rng.uniform(0.7, 1.3)
    objects: List[_Object] = []
    wholes: List[_Shape] = []  # unclipped shapes, for placing new wholes against them
    for area in areas:
        kind = rng.choice(_SHAPES + ("ring",), p=(0.26, 0.22, 0.22, 0.22, 0.08))
        if centred and not wholes:
            kind, cy, cx = rng.choice(_SHAPES), h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        shape = _rasterize(rng, kind, area, cy, cx)
        if wholes and rng.random() < 0.35:
            shape = _touching(rng, wholes[int(rng.integers(len(wholes)))], shape) or shape
        wholes.append(shape)
        clipped = _clip_to_image(shape, h, w)
        if clipped is None:
            continue
        objects.append(_Object(clipped, -1, 0, *_texture_spec(rng, avoid=background_palette, min_distance=30),
                               kind=str(kind)))
        _add_children(rng, objects, len(objects) - 1)
    return objects


def _add_children(rng, objects: List[_Object], p: int) -> None:
    """Appends parts of objects[p] (and, recursively, their subparts) after it."""
    parent = objects[p]
    area = int(parent.shape.mask.sum())
    if parent.level >= 2 or area < _PART_MIN_PARENT_AREA:
        return
    if parent.level == 0 and area >= 1500 and rng.random() < 0.15:
        shapes = _bands(rng, parent.shape)  # parts that tile the whole and touch each other
        kinds = ["band"] * len(shapes)
    else:
        n = int(rng.choice(4, p=(0.3, 0.3, 0.25, 0.15)) if parent.level == 0 else rng.choice(3, p=(0.5, 0.3, 0.2)))
        ys, xs = np.nonzero(parent.shape.mask)
        shapes, kinds = [], []
        for _ in range(n):
            k = int(rng.integers(len(ys)))
            target = max(MIN_TARGET_AREA, area * math.exp(rng.uniform(math.log(0.05), math.log(0.45))))
            cy, cx = parent.shape.y0 + ys[k] + 0.5, parent.shape.x0 + xs[k] + 0.5
            kinds.append(str(rng.choice(_SHAPES)))
            shapes.append(_rasterize(rng, kinds[-1], target, cy, cx))
    for shape, kind in zip(shapes, kinds):
        clipped = _intersect(shape, parent.shape)
        if clipped is None:
            continue
        objects.append(_Object(clipped, p, parent.level + 1, *_texture_spec(rng, avoid=parent.palette, min_distance=70),
                               kind=kind))
        _add_children(rng, objects, len(objects) - 1)


def _rasterize(rng, kind: str, area: float, cy: float, cx: float) -> _Shape:
    """A shape of about `area` pixels centred near (cy, cx), sampled at pixel centres."""
    theta = rng.uniform(0, math.pi)
    aspect = math.exp(rng.uniform(0, math.log(3)))
    if kind == "ellipse" or kind == "ring":
        hole = rng.uniform(0.4, 0.7) if kind == "ring" else 0.0
        a = math.sqrt(area / (1 - hole**2) * aspect / math.pi)
        b = a / aspect
        radius = a
    elif kind == "rectangle":
        a = math.sqrt(area * aspect) / 2
        b = a / aspect
        radius = math.hypot(a, b)
    elif kind == "polygon":
        k = int(rng.integers(3, 10))
        angles = 2 * math.pi * (np.arange(k) + rng.uniform(-0.2, 0.2, k)) / k + rng.uniform(0, 2 * math.pi)
        angles = (angles + math.pi) % (2 * math.pi) - math.pi  # sorted in [-pi, pi) like arctan2
        order = np.argsort(angles)
        angles, radii = angles[order], rng.uniform(0.45, 1.0, k)
        unit_area = 0.5 * np.sum(radii * np.roll(radii, -1) * np.sin(np.roll(angles, -1) - angles + 2 * math.pi * (np.arange(k) == k - 1)))
        radii *= math.sqrt(area / unit_area)
        radius = float(radii.max())
    else:  # blob: r <= R(phi), a smooth random radius function
        harmonics = np.arange(2, 6)
        amplitude = rng.dirichlet(np.ones(4)) * rng.uniform(0.1, 0.55)
        phase = rng.uniform(0, 2 * math.pi, 4)
        r0 = math.sqrt(area / (math.pi * (1 + 0.5 * np.sum(amplitude**2))))
        radius = r0 * (1 + amplitude.sum())
    y0, x0 = math.floor(cy - radius) - 1, math.floor(cx - radius) - 1
    size = math.ceil(2 * radius) + 3
    yy = (np.arange(size, dtype=np.float32) + y0 + 0.5 - cy)[:, None]
    xx = (np.arange(size, dtype=np.float32) + x0 + 0.5 - cx)[None, :]
    if kind in ("ellipse", "ring", "rectangle"):
        u = xx * math.cos(theta) + yy * math.sin(theta)
        v = yy * math.cos(theta) - xx * math.sin(theta)
        if kind == "rectangle":
            mask = (np.abs(u) <= a) & (np.abs(v) <= b)
        else:
            r2 = (u / a) ** 2 + (v / b) ** 2
            mask = (r2 <= 1) & (r2 >= hole**2)
    elif kind == "polygon":
        vx, vy = radii * np.cos(angles), radii * np.sin(angles)
        edge = (np.searchsorted(angles, np.arctan2(yy, xx), side="right") - 1) % k
        ex, ey = np.roll(vx, -1) - vx, np.roll(vy, -1) - vy
        # Counter-clockwise vertices around the centre: inside is left of the edge the pixel's ray crosses.
        mask = ex[edge] * (yy - vy[edge]) - ey[edge] * (xx - vx[edge]) >= 0
    else:
        phi = np.arctan2(yy, xx)
        limit = r0 * (1 + np.sum(amplitude[:, None, None] * np.cos(harmonics[:, None, None] * phi + phase[:, None, None]), axis=0))
        mask = np.hypot(yy, xx) <= limit
    return _Shape(y0, x0, mask)


def _bands(rng, whole: _Shape) -> List[_Shape]:
    """The whole's shape cut by 1-2 parallel lines into bands that tile it."""
    n = int(rng.integers(2, 4))
    theta = rng.uniform(0, math.pi)
    hh, ww = whole.mask.shape
    t = np.arange(hh)[:, None] * math.sin(theta) + np.arange(ww)[None, :] * math.cos(theta)
    lo, hi = np.quantile(t[whole.mask], [0.0, 1.0])
    cuts = np.sort(rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), n - 1))
    band = np.searchsorted(cuts, t)
    return [_Shape(whole.y0, whole.x0, whole.mask & (band == i)) for i in range(n)]


def _touching(rng, anchor: _Shape, shape: _Shape) -> Optional[_Shape]:
    """`shape` moved out of `anchor` along a random direction to the first position where they no longer overlap.

    The path takes unit steps along x or y, so at the last overlapping step
    some pixel p lies in both and at the next one p + step is in the moved
    shape: the two share an edge, with no gap and no overlap. None when the
    shape, centred on the anchor, does not overlap it.
    """
    angle = rng.uniform(0, 2 * math.pi)
    dy, dx = math.sin(angle), math.cos(angle)
    frac_y = abs(dy) / (abs(dy) + abs(dx))
    sy, sx = (1 if dy >= 0 else -1), (1 if dx >= 0 else -1)

    def offset(k: int) -> Tuple[int, int]:
        ky = int(round(k * frac_y))
        return sy * ky, sx * (k - ky)

    cy = anchor.y0 + anchor.mask.shape[0] // 2 - shape.mask.shape[0] // 2
    cx = anchor.x0 + anchor.mask.shape[1] // 2 - shape.mask.shape[1] // 2
    start = _Shape(cy, cx, shape.mask)
    if not _overlaps(anchor, start):
        return None
    lo, hi = 0, 2 * (sum(anchor.mask.shape) + sum(shape.mask.shape)) + 2
    while hi - lo > 1:  # invariant: overlap at lo, none at hi
        mid = (lo + hi) // 2
        if _overlaps(anchor, start.shifted(*offset(mid))):
            lo = mid
        else:
            hi = mid
    return start.shifted(*offset(hi))


def _overlap_window(a: _Shape, b: _Shape):
    y0, x0 = max(a.y0, b.y0), max(a.x0, b.x0)
    y1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
    x1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return (a.mask[y0 - a.y0:y1 - a.y0, x0 - a.x0:x1 - a.x0],
            b.mask[y0 - b.y0:y1 - b.y0, x0 - b.x0:x1 - b.x0])


def _overlaps(a: _Shape, b: _Shape) -> bool:
    window = _overlap_window(a, b)
    return window is not None and bool((window[0] & window[1]).any())


def _intersect(shape: _Shape, parent: _Shape) -> Optional[_Shape]:
    """`shape` clipped to `parent`, on the part of its patch inside the parent's patch; None if empty."""
    y0, x0 = max(shape.y0, parent.y0), max(shape.x0, parent.x0)
    y1 = min(shape.y0 + shape.mask.shape[0], parent.y0 + parent.mask.shape[0])
    x1 = min(shape.x0 + shape.mask.shape[1], parent.x0 + parent.mask.shape[1])
    if y1 <= y0 or x1 <= x0:
        return None
    mask = (shape.mask[y0 - shape.y0:y1 - shape.y0, x0 - shape.x0:x1 - shape.x0]
            & parent.mask[y0 - parent.y0:y1 - parent.y0, x0 - parent.x0:x1 - parent.x0])
    return _Shape(y0, x0, mask) if mask.any() else None


def _clip_to_image(shape: _Shape, h: int, w: int) -> Optional[_Shape]:
    y0, x0 = max(shape.y0, 0), max(shape.x0, 0)
    mask = shape.mask[y0 - shape.y0:max(h - shape.y0, 0), x0 - shape.x0:max(w - shape.x0, 0)]
    return _Shape(y0, x0, mask) if mask.any() else None


# ---------------------------------------------------------------- occlusion


def _paint_owner(objects: List[_Object], h: int, w: int, alive: Optional[np.ndarray] = None) -> np.ndarray:
    owner = np.full((h, w), -1, np.int32)
    for i, obj in enumerate(objects):
        if alive is None or alive[i]:
            s = obj.shape
            owner[s.y0:s.y0 + s.mask.shape[0], s.x0:s.x0 + s.mask.shape[1]][s.mask] = i
    return owner


def _visible_objects(objects: List[_Object], h: int, w: int, min_area: int) -> np.ndarray:
    """Indices of the objects kept: visible area >= min_area and below 90% of the parent's.

    Removing an object (with its descendants) only uncovers pixels of the
    others, so repainting until nothing more is removed terminates.
    """
    n = len(objects)
    parent = np.array([o.parent for o in objects], np.int64)
    alive = np.ones(n, bool)
    while True:
        owner = _paint_owner(objects, h, w, alive)
        visible = np.bincount(owner.ravel() + 1, minlength=n + 1)[1:].astype(np.int64)
        for i in range(n - 1, -1, -1):
            if parent[i] >= 0:
                visible[parent[i]] += visible[i]
        drop = alive & (visible < min_area)
        has_parent = parent >= 0
        drop[has_parent] |= alive[has_parent] & (visible[has_parent] >= _MAX_CHILD_FRACTION * visible[parent[has_parent]])
        if not drop.any():
            return np.flatnonzero(alive)
        for i in range(n):  # parents come first, so descendants follow their removed ancestors
            if drop[i] or (parent[i] >= 0 and not alive[parent[i]]):
                alive[i] = False


# ---------------------------------------------------------------- textures


def _mean_colours(image: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) float32 mean RGB of the pixels each object owns; NaN rows for objects owning none."""
    flat = owner.ravel()
    shown = flat >= 0
    counts = np.bincount(flat[shown], minlength=n)[:n].astype(np.float64)
    sums = np.stack([np.bincount(flat[shown], weights=image[..., c].ravel()[shown].astype(np.float64), minlength=n)[:n]
                     for c in range(3)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)


def _random_colour(rng, avoid: np.ndarray, min_distance: float) -> np.ndarray:
    """A colour at least `min_distance` (RGB) from every colour in `avoid`, if 30 draws find one."""
    best, best_distance = None, -1.0
    for _ in range(30):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        distance = float(np.min(np.linalg.norm(avoid - colour, axis=-1)))
        if distance >= min_distance:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _texture_spec(rng, avoid: np.ndarray, min_distance: float, contrast: float = 25.0):
    """(palette (2, 3), texture parameters) for an object, its colours away from `avoid` (k, 3)."""
    # The palette's whole colour range stays away from `avoid`, so that a part's boundary shows.
    avoid = np.concatenate([avoid, avoid.mean(0, keepdims=True)])
    first = _random_colour(rng, avoid, min_distance)
    for _ in range(10):
        second = np.clip(first + rng.normal(0, contrast, 3), 0, 255).astype(np.float32)
        if float(np.min(np.linalg.norm(avoid - second, axis=-1))) >= min_distance:
            break
    else:
        second = first
    palette = np.stack([first, second])
    spec = dict(
        kind=str(rng.choice(["flat", "noise", "stripes", "checker", "gradient"], p=(0.15, 0.35, 0.15, 0.15, 0.2))),
        seed=int(rng.integers(2**63)),
        grain=float(rng.uniform(0, 6)),
    )
    return palette, spec


def _background_spec(rng):
    first = rng.uniform(0, 255, 3).astype(np.float32)
    palette = np.stack([first, np.clip(first + rng.normal(0, 60, 3), 0, 255).astype(np.float32)])
    second = rng.uniform(0, 255, 3).astype(np.float32)
    palette2 = np.stack([second, np.clip(second + rng.normal(0, 60, 3), 0, 255).astype(np.float32)])
    return dict(
        palette=np.concatenate([palette, palette2]),
        kinds=[str(k) for k in rng.choice(["noise", "stripes", "checker", "gradient"], size=2)],
        seed=int(rng.integers(2**63)),
        grain=float(rng.uniform(2, 8)),
    )


def _render_background(spec, h: int, w: int) -> np.ndarray:
    """A mixture of two textures blended by smooth noise: (h, w, 3) uint8."""
    rng = np.random.default_rng(spec["seed"])
    first = _pattern(rng, spec["kinds"][0], h, w)
    second = _pattern(rng, spec["kinds"][1], h, w)
    blend = np.clip((_smooth_noise(rng, h, w, rng.uniform(24, 128)) - 0.5) * 4 + 0.5, 0, 1)[..., None]
    p = spec["palette"]
    colour = first[..., None] * (p[1] - p[0])
    colour += p[0]
    other = second[..., None] * (p[3] - p[2])
    other += p[2]
    other -= colour
    other *= blend
    colour += other  # (1 - blend) * colour + blend * other
    colour += spec["grain"] * rng.standard_normal((h, w, 1), dtype=np.float32)
    return np.clip(np.rint(colour, out=colour), 0, 255, out=colour).astype(np.uint8)


def _render_texture(spec, palette: np.ndarray, shape: Tuple[int, int], where: Optional[np.ndarray] = None) -> np.ndarray:
    """An object's texture on its patch, colours between the palette's two.

    (h, w, 3) uint8, or (k, 3) at the k pixels where `where` (h, w) is true:
    the same values, computed only where they are shown.
    """
    rng = np.random.default_rng(spec["seed"])
    h, w = shape
    t = _pattern(rng, spec["kind"], h, w)
    grain = spec["grain"] * rng.standard_normal((h, w), dtype=np.float32)
    if where is not None:
        t, grain = t[where], grain[where]
    colour = palette[0] + t[..., None] * (palette[1] - palette[0]) + grain[..., None]
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8)


def _pattern(rng, kind: str, h: int, w: int) -> np.ndarray:
    """(h, w) float32 in [0, 1]."""
    if kind == "flat":
        return np.zeros((h, w), np.float32)
    if kind == "noise":
        return _smooth_noise(rng, h, w, rng.uniform(3, 48))
    theta = rng.uniform(0, math.pi)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    u = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(u * (2 * math.pi / rng.uniform(4, 24)) + rng.uniform(0, 2 * math.pi))
    if kind == "checker":
        v = yy * math.cos(theta) - xx * math.sin(theta)
        cell = rng.uniform(3, 20)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    u = u - u.min()
    return u / max(float(u.max()), 1.0)  # gradient


def _smooth_noise(rng, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise: uniform values on a grid of `cell` pixels, bilinearly interpolated, (h, w) in [0, 1]."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    top, fy = _interpolation(h, cell, gh)
    left, fx = _interpolation(w, cell, gw)
    rows = grid[top] * (1 - fy)[:, None] + grid[top + 1] * fy[:, None]  # (h, gw)
    field = rows[:, left] * (1 - fx) + rows[:, left + 1] * fx
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def _interpolation(n: int, cell: float, grid: int) -> Tuple[np.ndarray, np.ndarray]:
    """(n,) index of the grid point before each pixel and (n,) float32 fraction towards the next."""
    pos = np.arange(n, dtype=np.float32) / np.float32(cell)
    before = np.minimum(pos.astype(np.int64), grid - 2)
    return before, pos - before
