"""Splitting a high-resolution image into fixed-size tiles: POINTS' CATTY and InternVL's dynamic tiling.

Each method is a pure geometry function `*_plan(width, height, ...) -> TilePlan` (grid, resize targets, crop
boxes; cheap, testable, and enough to know the token count before any pixel is touched) plus `apply_plan`,
which does the pixel work with Pillow and returns the tiles (thumbnail last).

CATTY (POINTS, DESIGN.md section 4), tile 336, at most 8 tiles:
 1. r = W/H clamped to [1/max, max] by resizing to exactly max:1 (1:max) keeping the short side.
 2. candidate grids (cols, rows) with cols*rows = n for n = 1..max, keyed by cols/rows;
 3. one-sided filter: r < 1 keeps keys <= r, r > 1 keys >= r, r == 1 all;
 4. the key closest to r, then within it the grid whose tile count is closest to (W/336)*(H/336)
    (ties: fewer tiles);
 5. aspect-preserving resize: portrait Wt = cols*336, Ht = int(H/W*Wt); otherwise Ht = rows*336,
    Wt = int(W/H*Ht);
 6. strides S = (L-336)//(n-1) per axis (336 when n == 1 or the stride would be 0); crops row by row over
    range(0, L-336+1, S), so tiles overlap along the long side;
 7. the resized image squashed to 336x336 appended last as a thumbnail.
Resampling is bilinear (*choice* recorded by DESIGN.md). Step 6 is taken literally: when L-336 is not a
multiple of n-1 the last crop stops up to n-2 pixels short of the far edge (`TilePlan.uncovered` reports
it; `cover_edges=True` snaps the last crop to the edge instead, a deviation from the reference). The crop
count follows `range`; it equals cols*rows for every size the property tests try.

InternVL dynamic tiling (alternative): grids (cols, rows) with min <= cols*rows <= max tiles; the grid whose
aspect ratio is closest to the image's (ties: the larger grid when the image area exceeds half of the
grid's pixel area); the image is squashed to (cols*T, rows*T) and cut into non-overlapping tiles; a
thumbnail (the whole image squashed to T x T) is appended when there is more than one tile. Resampling is
bicubic (Pillow's `resize` default, which InternVL relies on).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from PIL import Image

Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """How to cut one image: optional clamp resize, main resize, crop boxes (in resized coordinates)."""

    grid: tuple[int, int]  # (cols, rows) of the chosen grid
    resized: tuple[int, int]  # (W, H) the image is resized to before cropping
    boxes: tuple[Box, ...]  # crops, row by row
    tile: int
    thumbnail: bool
    clamped: tuple[int, int] | None = None  # (W, H) after CATTY's aspect clamp (step 1), if it applied
    resample: int = Image.Resampling.BILINEAR
    thumbnail_from: str = "resized"  # "resized" (CATTY) or "original" (InternVL)

    @property
    def num_images(self) -> int:
        """Tiles plus thumbnail: the number of images the encoder sees."""
        return len(self.boxes) + int(self.thumbnail)

    @property
    def uncovered(self) -> tuple[int, int]:
        """Pixels at the right / bottom edge of the resized image that no crop covers."""
        return (self.resized[0] - max(b[2] for b in self.boxes), self.resized[1] - max(b[3] for b in self.boxes))


# ---------------------------------------------------------------------------------------------- CATTY
def catty_candidates(max_tiles: int = 8) -> dict[float, list[tuple[int, int]]]:
    """Grids keyed by cols/rows, n ascending then cols ascending (the order the ties rely on)."""
    out: dict[float, list[tuple[int, int]]] = {}
    for n in range(1, max_tiles + 1):
        for cols in range(1, n + 1):
            if n % cols == 0:
                out.setdefault(cols / (n // cols), []).append((cols, n // cols))
    return out


def catty_clamp(width: int, height: int, max_ratio: float) -> tuple[int, int] | None:
    """Step 1: the size to resize to when the aspect ratio is beyond max_ratio:1, else None."""
    if width > max_ratio * height:
        return int(max_ratio * height), height
    if height > max_ratio * width:
        return width, int(max_ratio * width)
    return None


def catty_grid(width: int, height: int, tile: int = 336, max_tiles: int = 8) -> tuple[int, int]:
    """Steps 2-4: the (cols, rows) grid for an image of this size (already clamped)."""
    r = width / height
    cands = catty_candidates(max_tiles)
    if r < 1:
        keys = [k for k in cands if k <= r]
    elif r > 1:
        keys = [k for k in cands if k >= r]
    else:
        keys = list(cands)
    key = min(keys, key=lambda k: abs(k - r))  # min keeps the first of equals
    target = (width / tile) * (height / tile)
    return min(cands[key], key=lambda g: abs(g[0] * g[1] - target))


def _starts(length: int, tile: int, n: int, cover_edges: bool) -> list[int]:
    stride = 0 if n == 1 else (length - tile) // (n - 1)
    starts = list(range(0, length - tile + 1, stride or tile))
    if cover_edges and starts[-1] != length - tile:
        starts[-1] = length - tile
    return starts


def catty_plan(width: int, height: int, tile: int = 336, max_tiles: int = 8, thumbnail: bool = True,
               cover_edges: bool = False) -> TilePlan:
    """The full CATTY plan (steps 1-7) for a `width` x `height` image. `cover_edges=True` (not in the
    reference) moves each axis' last crop flush with the far edge so no pixel is left out."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}: both sides must be positive")
    clamped = catty_clamp(width, height, max_tiles)
    w, h = clamped or (width, height)
    cols, rows = catty_grid(w, h, tile, max_tiles)
    if w < h:
        wt = cols * tile
        ht = int(h / w * wt)
    else:
        ht = rows * tile
        wt = int(w / h * ht)
    boxes = tuple((x, y, x + tile, y + tile) for y in _starts(ht, tile, rows, cover_edges)
                  for x in _starts(wt, tile, cols, cover_edges))
    return TilePlan((cols, rows), (wt, ht), boxes, tile, thumbnail, clamped, Image.Resampling.BILINEAR)


# -------------------------------------------------------------------------------------------- InternVL
def internvl_grid(width: int, height: int, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; ties go to the larger grid when the image has
    more than half that grid's pixels."""
    grids = sorted({(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if min_tiles <= c * r <= max_tiles}, key=lambda g: g[0] * g[1])
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def internvl_plan(width: int, height: int, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12,
                  thumbnail: bool = True) -> TilePlan:
    """Non-overlapping dynamic tiling: squash to (cols*T, rows*T), cut a cols x rows grid, thumbnail last."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}: both sides must be positive")
    cols, rows = internvl_grid(width, height, tile, min_tiles, max_tiles)
    boxes = tuple((x * tile, y * tile, (x + 1) * tile, (y + 1) * tile) for y in range(rows) for x in range(cols))
    return TilePlan((cols, rows), (cols * tile, rows * tile), boxes, tile, thumbnail and len(boxes) > 1, None,
                    Image.Resampling.BICUBIC, "original")


# ------------------------------------------------------------------------------------------- pixels
def apply_plan(image: Image.Image, plan: TilePlan) -> list[Image.Image]:
    """Cuts an RGB image by `plan`: the tiles row by row, then the thumbnail."""
    original = image
    if plan.clamped is not None:
        image = image.resize(plan.clamped, plan.resample)
    resized = image.resize(plan.resized, plan.resample)
    tiles = [resized.crop(b) for b in plan.boxes]
    if plan.thumbnail:
        source = resized if plan.thumbnail_from == "resized" else original
        tiles.append(source.resize((plan.tile, plan.tile), plan.resample))
    return tiles


def tile_sizes(tiles: Sequence[Image.Image]) -> set[tuple[int, int]]:
    return {t.size for t in tiles}
