"""CATTY (POINTS) and InternVL-style tiling: DESIGN.md's worked examples by hand, properties by hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mm.data.tiling import apply_plan, catty_candidates, catty_grid, catty_plan, internvl_grid, internvl_plan

SIDES = st.integers(min_value=1, max_value=6000)


@pytest.mark.parametrize("size, grid, resized, strides", [
    ((1920, 1080), (4, 2), (1194, 672), (286, 336)),
    ((800, 600), (3, 2), (896, 672), (280, 336)),
    ((1000, 1000), (2, 2), (672, 672), (336, 336)),
    ((1000, 1010), (2, 3), (672, 678), (336, 171)),
    ((3000, 300), (8, 1), (2688, 336), (336, None)),
])
def test_design_worked_examples(size, grid, resized, strides):
    plan = catty_plan(*size)
    assert plan.grid == grid and plan.resized == resized
    xs = sorted({b[0] for b in plan.boxes})
    ys = sorted({b[1] for b in plan.boxes})
    assert len(xs) == grid[0] and len(ys) == grid[1] and len(plan.boxes) == grid[0] * grid[1]
    if strides[0] is not None and len(xs) > 1:
        assert set(np.diff(xs)) == {strides[0]}
    if strides[1] is not None and len(ys) > 1:
        assert set(np.diff(ys)) == {strides[1]}
    assert plan.thumbnail and plan.num_images == len(plan.boxes) + 1


def test_extreme_aspect_is_clamped_to_max_to_one():
    plan = catty_plan(3000, 300)
    assert plan.clamped == (2400, 300)  # 8:1 keeping the short side
    assert catty_plan(300, 3000).clamped == (300, 2400)
    assert catty_plan(300, 3000).grid == (1, 8)
    assert catty_plan(2400, 300).clamped is None


def test_square_gives_one_by_one_plus_thumbnail():
    plan = catty_plan(300, 300)
    assert plan.grid == (1, 1) and plan.num_images == 2 and plan.boxes == ((0, 0, 336, 336),)


def test_candidate_order_and_tile_tie_break():
    cands = catty_candidates(8)
    assert cands[1.0] == [(1, 1), (2, 2)] and cands[2.0] == [(2, 1), (4, 2)] and cands[0.5] == [(1, 2), (2, 4)]
    # 700x350: r == 2 exactly, target tiles 2.08*1.04 = 2.17: (2, 1) is closer than (4, 2).
    assert catty_grid(700, 350) == (2, 1)
    # target exactly between 2 and 8 tiles does not exist for key 2; a tie on |n - target| keeps fewer tiles.
    assert catty_grid(1008, 504) == (2, 1)  # target 4.5: |2-4.5| = 2.5 < |8-4.5| = 3.5


def _check_plan(w, h, max_tiles, cover_edges):
    plan = catty_plan(w, h, max_tiles=max_tiles, cover_edges=cover_edges)
    cols, rows = plan.grid
    wt, ht = plan.resized
    xs, ys = sorted({b[0] for b in plan.boxes}), sorted({b[1] for b in plan.boxes})
    assert 1 <= len(plan.boxes) == len(xs) * len(ys) <= cols * rows <= max_tiles
    # DESIGN step 6 "a 0 stride becomes 336": an axis resized to exactly one tile gets one crop whatever the
    # grid says (only reachable with max_tiles < 3); otherwise the crops match the grid.
    assert len(xs) == (1 if wt == 336 else cols) and len(ys) == (1 if ht == 336 else rows)
    for l, t, r, b in plan.boxes:
        assert (r - l, b - t) == (336, 336) and l >= 0 and t >= 0 and r <= wt and b <= ht
    # rows are emitted top to bottom, left to right inside a row
    assert list(plan.boxes) == sorted(plan.boxes, key=lambda b: (b[1], b[0]))
    ux, uy = plan.uncovered
    if cover_edges:
        assert (ux, uy) == (0, 0)
    else:  # literal strides: at most n-2 pixels short of the far edge
        assert 0 <= ux <= max(len(xs) - 2, 0) and 0 <= uy <= max(len(ys) - 2, 0)
    # no gaps between consecutive crops along either axis
    assert xs[0] == 0 and ys[0] == 0 and all(np.diff(xs) <= 336) and all(np.diff(ys) <= 336)
    assert plan.thumbnail


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(SIDES, SIDES, st.integers(min_value=1, max_value=12), st.booleans())
@example(337, 338, 2, False)  # portrait resized to exactly 336 high on a 1x2 grid: one crop
def test_catty_plan_properties(w, h, max_tiles, cover_edges):
    _check_plan(w, h, max_tiles, cover_edges)


@settings(max_examples=12, deadline=None, database=None, derandomize=True)
@given(st.integers(20, 1400), st.integers(20, 1400))
def test_catty_pixels(w, h):
    """Pixel level: every tile is 336x336 and is the crop of the resized image; the thumbnail comes last."""
    rng = np.random.default_rng(w * 7919 + h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    plan = catty_plan(w, h)
    tiles = apply_plan(img, plan)
    assert len(tiles) == plan.num_images <= 9
    assert {t.size for t in tiles} == {(336, 336)}
    src = img.resize(plan.clamped, Image.Resampling.BILINEAR) if plan.clamped else img
    resized = src.resize(plan.resized, Image.Resampling.BILINEAR)
    for t, box in zip(tiles, plan.boxes):
        assert np.array_equal(np.asarray(t), np.asarray(resized.crop(box)))
    thumb = resized.resize((336, 336), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(thumb))


def _internvl_reference(w, h, tile, lo, hi):
    """Brute force of the rule: closest aspect; on equal distance prefer the larger grid if the image area
    exceeds half of its pixels; candidates visited by ascending tile count."""
    grids = sorted({(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi},
                   key=lambda g: g[0] * g[1])
    best = None
    for g in grids:
        d = abs(w / h - g[0] / g[1])
        if best is None or d < best[0]:
            best = (d, g)
        elif d == best[0] and w * h > 0.5 * tile * tile * g[0] * g[1]:
            best = (d, g)
    return best[1]


@pytest.mark.parametrize("size, grid", [((800, 600), (4, 3)), ((448, 448), (1, 1)), ((2000, 1000), (4, 2)),
                                        ((900, 450), (2, 1)), ((1000, 3000), (2, 6)), ((300, 900), (1, 3)),
                                        ((4000, 1000), (4, 1))])
def test_internvl_examples(size, grid):
    assert internvl_grid(*size, tile=448, min_tiles=1, max_tiles=12) == grid


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(SIDES, SIDES, st.integers(1, 3), st.integers(4, 12))
def test_internvl_properties(w, h, lo, hi):
    plan = internvl_plan(w, h, 448, lo, hi)
    cols, rows = plan.grid
    assert plan.grid == _internvl_reference(w, h, 448, lo, hi)
    assert lo <= cols * rows <= hi and plan.resized == (cols * 448, rows * 448)
    covered = np.zeros((rows * 448, cols * 448), np.int32)
    for l, t, r, b in plan.boxes:
        assert (r - l, b - t) == (448, 448)
        covered[t:b, l:r] += 1
    assert (covered == 1).all()  # non-overlapping and complete
    assert plan.thumbnail == (cols * rows > 1)


def test_internvl_thumbnail_is_the_whole_image():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 900, 3), dtype=np.uint8))
    plan = internvl_plan(900, 300, 448, 1, 6)
    tiles = apply_plan(img, plan)
    assert len(tiles) == len(plan.boxes) + 1
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC)))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="positive"):
        catty_plan(0, 10)
    with pytest.raises(ValueError, match="positive"):
        internvl_plan(10, 0)
