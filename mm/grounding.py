"""Visual grounding in the IAA answer format: boxes as text, IoU, Acc@0.5, and coordinate mapping.

Answers are `[x1, y1, x2, y2]` with coordinates normalised to [0, 1] on the image *padded to a square* (the
image the model saw), several boxes joined by "; ". Boxes in pixel coordinates of the original image map to
and from that frame with `to_padded_square` / `from_padded_square` (padding is split evenly on both sides of
the short side, the odd pixel after the image, exactly as `mm.data.images.pad_to_square` pastes it).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

Box = tuple[float, float, float, float]

PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expr}"
_NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def grounding_prompt(expression: str) -> str:
    return PROMPT.format(expr=expression)


def format_boxes(boxes: Iterable[Box], decimals: int = 2) -> str:
    """`[[0.1, 0.2, 0.5, 0.9], ...]` -> "[0.10, 0.20, 0.50, 0.90]; [...]" (clipped to [0, 1])."""
    out = []
    for b in boxes:
        c = [min(1.0, max(0.0, float(v))) for v in b]
        out.append("[" + ", ".join(f"{v:.{decimals}f}" for v in c) + "]")
    return "; ".join(out)


def parse_boxes(text: str) -> list[Box]:
    """Every well-formed `[x1, y1, x2, y2]` in `text`, in order; malformed fragments are ignored."""
    return [tuple(float(g) for g in m.groups()) for m in _BOX.finditer(text)]  # type: ignore[misc]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two `[x1, y1, x2, y2]` boxes (0 for degenerate boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def accuracy_at(predictions: Sequence[str], targets: Sequence[Box], threshold: float = 0.5) -> float:
    """Fraction of answers whose first parsed box has IoU >= threshold with the target (no box: a miss)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        return 0.0
    hits = 0
    for text, target in zip(predictions, targets):
        boxes = parse_boxes(text)
        hits += bool(boxes) and iou(boxes[0], target) >= threshold
    return hits / len(targets)


def to_padded_square(box: Box, width: int, height: int) -> Box:
    """Pixel box on a `width x height` image -> normalised box on the padded square."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    x1, y1, x2, y2 = box
    return ((x1 + ox) / side, (y1 + oy) / side, (x2 + ox) / side, (y2 + oy) / side)


def from_padded_square(box: Box, width: int, height: int) -> Box:
    """Normalised box on the padded square -> pixel box on the original image (clipped to it)."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    x1, y1, x2, y2 = (v * side for v in box)
    clip = lambda v, hi: min(float(hi), max(0.0, v))  # noqa: E731
    return (clip(x1 - ox, width), clip(y1 - oy, height), clip(x2 - ox, width), clip(y2 - oy, height))
