"""The demo's synthetic image data: coloured shapes at positions on images of several sizes and aspect ratios.

Every scene holds 1-3 objects (by default) with distinct colours and distinct shapes, placed without overlap, so "the
circle" or "the red circle" names exactly one object. Questions ask for a colour, a shape, the number of
objects, which of two objects is further left, a caption, or a grounding box (`mm.grounding`'s answer format:
`[x1, y1, x2, y2]` normalised to the image padded to a square). Training rows are multi-turn LLaVA JSON
conversations; held-out items are single questions on unseen images, each with its reference answer (and box).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mm import grounding
from mm.answers import normalise

COLOURS = {"red": (220, 50, 47), "green": (50, 160, 60), "blue": (40, 90, 220), "yellow": (235, 195, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (250, 250, 250)
QA_KINDS = ("colour", "shape", "count", "position")
KINDS = QA_KINDS + ("grounding", "caption")
BOX_DECIMALS = 1  # boxes in tenths: a tiny model's coordinate vocabulary; IoU >= 0.5 is still a tight test


@dataclasses.dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # pixels, x2/y2 exclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclasses.dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[Obj, ...]


@dataclasses.dataclass(frozen=True)
class MMItem:
    image: str  # path relative to the image root
    kind: str
    question: str
    answer: str
    box: tuple[float, float, float, float] | None = None  # grounding target on the padded square


def make_scene(rng: np.random.Generator, min_side: int, max_side: int, max_objects: int = 3,
               scale: tuple[float, float] = (0.3, 0.45), max_aspect: float = 2.0) -> Scene:
    """A random scene; sides in [min_side, max_side] with aspect ratio at most `max_aspect`, 1..max_objects
    objects whose sides are `scale` (a range) times the image's short side."""
    while True:
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        if max(w, h) <= max_aspect * min(w, h):
            break
    n = int(rng.integers(1, max_objects + 1))
    colours = rng.permutation(list(COLOURS))[:n]
    shapes = rng.permutation(list(SHAPES))[:n]
    objs: list[Obj] = []
    for c, s in zip(colours, shapes):
        for _ in range(200):
            size = int(rng.uniform(*scale) * min(w, h))
            x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            box = (x, y, x + size, y + size)
            if all(box[2] + 1 <= o.box[0] or o.box[2] + 1 <= box[0] or box[3] + 1 <= o.box[1]
                   or o.box[3] + 1 <= box[1] for o in objs):
                objs.append(Obj(str(c), str(s), box))
                break
    return Scene(w, h, tuple(objs))


def render(scene: Scene) -> Any:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
    return img


def _caption(scene: Scene) -> str:
    names = [f"a {o.name}" for o in sorted(scene.objects, key=lambda o: o.cx)]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return body[0].upper() + body[1:] + "."


def _box(scene: Scene, o: Obj) -> tuple[float, float, float, float]:
    return grounding.to_padded_square(tuple(float(v) for v in o.box), scene.width, scene.height)


def questions(scene: Scene, rng: np.random.Generator, image: str) -> dict[str, MMItem]:
    """One question of each kind that the scene supports (position needs two objects clearly apart)."""
    objs = list(scene.objects)
    o = objs[int(rng.integers(len(objs)))]
    out = {
        "colour": MMItem(image, "colour", f"What colour is the {o.shape}?", o.colour),
        "shape": MMItem(image, "shape", f"What shape is the {o.colour} object?", o.shape),
        "count": MMItem(image, "count", "How many shapes are there?", str(len(objs))),
        "caption": MMItem(image, "caption", "Describe the image.", _caption(scene)),
    }
    # the rounded reference answer must itself score (IoU >= 0.5 with the exact box): small boxes may not
    groundable = [g for g in objs if grounding.accuracy_at(
        [grounding.format_boxes([_box(scene, g)], decimals=BOX_DECIMALS)], [_box(scene, g)]) == 1.0]
    if groundable:
        g = groundable[int(rng.integers(len(groundable)))]
        box = _box(scene, g)
        out["grounding"] = MMItem(image, "grounding", grounding.grounding_prompt(f"the {g.name}"),
                                  grounding.format_boxes([box], decimals=BOX_DECIMALS), box)
    pairs = [(a, b) for a in objs for b in objs if a is not b and abs(a.cx - b.cx) > 0.15 * scene.width]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        out["position"] = MMItem(image, "position", f"Is the {a.name} left or right of the {b.name}?",
                                 "left" if a.cx < b.cx else "right")
    return out


def _conversation(items: list[MMItem]) -> list[dict[str, str]]:
    conv = []
    for k, it in enumerate(items):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + it.question},
                 {"from": "gpt", "value": it.answer}]
    return conv


@dataclasses.dataclass(frozen=True)
class ShapesData:
    train_json: str
    eval_json: str  # held-out rows in the training format (eval losses)
    image_root: str
    eval_items: list[MMItem]


def write(out_dir: str | os.PathLike, n_train: int, n_eval: int, seed: int = 0, min_side: int = 40,
          max_side: int = 96, rounds: tuple[int, int] = (2, 4), max_objects: int = 3,
          train_kinds: tuple[str, ...] = KINDS, scale: tuple[float, float] = (0.3, 0.45),
          max_aspect: float = 2.0, grounding_rate: float = 1.0) -> ShapesData:
    """Writes `images/`, `train.json` (multi-turn rows, shuffled question kinds of `train_kinds`; a grounding
    question in a `grounding_rate` fraction of rows), `eval.json` and
    `eval_items.json` (one single-turn item per kind a held-out scene supports) under `out_dir`."""
    out = Path(out_dir)
    root = out / "images"
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "eval": []}
    eval_items: list[MMItem] = []
    for split, n, sub in (("train", n_train, 1), ("eval", n_eval, 2)):
        rng = np.random.default_rng([seed, sub])
        for i in range(n):
            scene = make_scene(rng, min_side, max_side, max_objects, scale, max_aspect)
            name = f"{split}_{i:06d}.png"
            render(scene).save(root / name)
            qs = questions(scene, rng, name)
            kinds = [x for x in qs if x in train_kinds or split == "eval"]
            if split == "train" and "grounding" in kinds and rng.random() >= grounding_rate:
                kinds.remove("grounding")  # a box answer is ~9x a one-word answer's tokens: keep its share down
            order = [kinds[j] for j in rng.permutation(len(kinds))]
            k = int(rng.integers(rounds[0], rounds[1] + 1))
            rows[split].append({"id": f"{split}{i:06d}", "image": name,
                                "conversations": _conversation([qs[x] for x in order[:k]])})
            if split == "eval":
                eval_items += [qs[x] for x in KINDS if x in qs and x != "caption"]
    paths = {}
    for split in rows:
        paths[split] = str(out / f"{split}.json")
        Path(paths[split]).write_text(json.dumps(rows[split]))
    (out / "eval_items.json").write_text(json.dumps([dataclasses.asdict(x) for x in eval_items]))
    return ShapesData(paths["train"], paths["eval"], str(root), eval_items)


def read_eval_items(path: str | os.PathLike) -> list[MMItem]:
    return [MMItem(**{**d, "box": tuple(d["box"]) if d.get("box") else None})
            for d in json.loads(Path(path).read_text())]


def answer_correct(item: MMItem, prediction: str) -> bool:
    """QA: case- and punctuation-insensitive exact match; grounding: first box's IoU >= 0.5."""
    if item.kind == "grounding":
        return item.box is not None and grounding.accuracy_at([prediction], [item.box]) == 1.0
    return normalise(prediction) == normalise(item.answer)
