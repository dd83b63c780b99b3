"""Image decoding and CLIP / SigLIP preprocessing: file -> RGB -> resized, normalised `[3, H, W]` float32.

Decoding (`load_image`) uses Pillow, applies the EXIF orientation, and converts every mode to 8-bit RGB:
grey / bilevel / palette / CMYK / YCbCr via Pillow; 16-bit and 32-bit integer grey (`I;16*`, `I`) scaled from
0..65535 to 0..255 (value / 257, rounded); float grey (`F`) clipped to 0..255. Transparency (RGBA, LA, PA,
palette or grey with a transparent colour) is composited onto `background`: *choice* white by default,
exactly what transformers' `convert_to_rgb` does, so our arrays equal the HF processors' for such files;
pass `background=mean_fill(config)` to composite on the mean colour instead (then transparent areas look like
LLaVA's square padding). Truncated or corrupt files, images over the pixel budget and images with a side of
0 all raise `ImageError`, whose message starts with the file name.

Preprocessing (`preprocess`) reproduces transformers' PIL-backed `CLIPImageProcessorPil` /
`SiglipImageProcessorPil` (the path without torchvision, DESIGN.md section 8): Pillow resize of the uint8
image (CLIP: shortest edge to `size`, long edge `int(size * long / short)`, then a centre crop; SigLIP:
straight to `size` x `size`), bicubic; then `x * (1/255)` in float64 cast to float32, minus mean, over std
in float32. The last step is a 256-entry lookup table per channel built with those same operations, so the
result is bit-identical to HF's and cheaper. `pad_to_square` is LLaVA's `expand2square` (mean colour,
image centred).
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mm.data.tiling import TilePlan, catty_plan, internvl_plan

ImageSource = Union[str, Path, bytes, BinaryIO, Image.Image]

DEFAULT_MAX_PIXELS = 1 << 26  # 67M pixels (8192 x 8192); Pillow's own bomb limit is 89M
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image cannot be used: corrupt, truncated, unsupported, or of an absurd size. Names the file."""


# ------------------------------------------------------------------------------------------ decode
def _name_of(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or "<PIL image>"
    return getattr(src, "name", None) or "<bytes>"


def check_size(width: int, height: int, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Rejects sides of 0 and images over the pixel budget (before any pixel is decoded)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image size {width}x{height} has a side of 0")
    if width * height > max_pixels:
        raise ImageError(f"{name}: image size {width}x{height} = {width * height} pixels is over the budget of "
                         f"{max_pixels} pixels")


def to_rgb(image: Image.Image, background: Sequence[int] = WHITE, name: str = "<PIL image>") -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image, np.float64)), 0, 255).astype(np.uint8), "L")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            bg = Image.new("RGBA", image.size, tuple(int(v) for v in background) + (255,))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert mode {mode!r} to RGB ({e})") from e


def load_image(src: ImageSource, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               background: Sequence[int] = WHITE) -> Image.Image:
    """Decodes a file / bytes / stream / PIL image into an RGB image with EXIF orientation applied."""
    label = _name_of(src, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                img = src
            elif isinstance(src, bytes):
                img = Image.open(io.BytesIO(src))
            else:
                img = Image.open(src)
            check_size(img.width, img.height, label, max_pixels)
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{label}: file not found") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{label}: over Pillow's decompression-bomb limit ({e})") from e
    except UnidentifiedImageError as e:  # Pillow's message names the in-memory stream by its address
        raise ImageError(f"{label}: corrupt or truncated image (no format Pillow can identify)") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{label}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    check_size(img.width, img.height, label, max_pixels)
    return to_rgb(img, background, label)


# -------------------------------------------------------------------------------------- processing
@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """What an HF CLIP / SigLIP image processor does, as data. `shortest_edge` set: CLIP-style resize (short
    side to it, then centre crop to `crop_size`); otherwise a straight resize to `size` (height, width)."""

    size: tuple[int, int] = (336, 336)  # (height, width) for straight resizes
    shortest_edge: int | None = 336
    crop_size: tuple[int, int] | None = (336, 336)
    resample: int = int(Image.Resampling.BICUBIC)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def clip(cls, size: int = 336) -> "ProcessorConfig":
        return cls((size, size), size, (size, size))

    @classmethod
    def siglip(cls, size: int = 384) -> "ProcessorConfig":
        return cls((size, size), None, None, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "preprocessor_config.json") -> "ProcessorConfig":
        """Reads a `CLIPImageProcessor` / `SiglipImageProcessor` `preprocessor_config.json`."""
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag, True) is False:
                raise ValueError(f"{source}: {flag}=false is not supported")
        size = d.get("size", {"shortest_edge": 224})
        size = {"height": size, "width": size} if isinstance(size, int) else dict(size)
        crop = d.get("crop_size")
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        do_crop = bool(d.get("do_center_crop", False)) and crop is not None
        short = size.get("shortest_edge")
        hw = (int(size["height"]), int(size["width"])) if "height" in size else (int(short), int(short))
        return cls(
            size=hw,
            shortest_edge=None if short is None else int(short),
            crop_size=(int(crop["height"]), int(crop["width"])) if do_crop else None,
            resample=int(d.get("resample", Image.Resampling.BICUBIC)),
            image_mean=tuple(float(x) for x in d.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(float(x) for x in d.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )


def mean_fill(config: ProcessorConfig) -> tuple[int, int, int]:
    """The mean colour as uint8 RGB, as LLaVA computes it (`int(x * 255)`)."""
    return tuple(int(x * 255) for x in config.image_mean)


def pad_to_square(image: Image.Image, fill: Sequence[int]) -> Image.Image:
    """LLaVA's `expand2square`: the image centred on a square canvas of its long side, filled with `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in fill))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_output_size(width: int, height: int, config: ProcessorConfig) -> tuple[int, int]:
    """(width, height) after the processor's resize step."""
    if config.shortest_edge is None:
        return config.size[1], config.size[0]
    s = config.shortest_edge
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(s * long / short)
    return (s, new_long) if width <= height else (new_long, s)


def center_crop(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HF's `center_crop` on an `[H, W, C]` array: top-left at ((H-h)//2, (W-w)//2), zero padding when small."""
    h, w = arr.shape[:2]
    ch, cw = size
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw) + arr.shape[2:], arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[tp:tp + h, lp:lp + w] = arr
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


class Normalizer:
    """uint8 `[..., H, W, 3]` -> float32 `[..., 3, H, W]`, bit-identical to HF's rescale + normalize."""

    def __init__(self, config: ProcessorConfig):
        scaled = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
        mean = np.asarray(config.image_mean, np.float32)
        std = np.asarray(config.image_std, np.float32)
        self.lut = np.stack([(scaled - mean[c]) / std[c] for c in range(3)]).astype(np.float32)  # [3, 256]

    def __call__(self, arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if arr.dtype != np.uint8 or arr.shape[-1] != 3:
            raise ValueError(f"Normalizer wants uint8 [..., H, W, 3], got {arr.dtype} {arr.shape}")
        shape = arr.shape[:-3] + (3,) + arr.shape[-3:-1]
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"Normalizer: out must be float32 {shape}, got {out.dtype} {out.shape}")
        for c in range(3):  # a gather per channel (faster than np.take(out=) into strided views)
            out[..., c, :, :] = self.lut[c][arr[..., c]]
        return out


def preprocess(image: Image.Image, config: ProcessorConfig, normalizer: Normalizer | None = None) -> np.ndarray:
    """RGB image -> `[3, H, W]` float32, equal to the HF PIL-backed processor's `pixel_values[0]`."""
    normalizer = normalizer or Normalizer(config)
    w, h = resize_output_size(image.width, image.height, config)
    resized = image.resize((w, h), config.resample) if (w, h) != image.size else image
    arr = np.asarray(resized, np.uint8)
    if config.crop_size is not None:
        arr = center_crop(arr, config.crop_size)
    return normalizer(arr)


# ------------------------------------------------------------------------------------------ tiling
@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tiles of one image: `pixel_values [N, 3, T, T]` (thumbnail last when the plan has one) and the plan
    (grid, resize, crop boxes) so token counts are known without looking at pixels."""

    pixel_values: np.ndarray
    plan: TilePlan

    @property
    def grid(self) -> tuple[int, int]:
        return self.plan.grid


def cut_tiles(image: Image.Image, plan: TilePlan) -> np.ndarray:
    """The plan's tiles (thumbnail last) as uint8 `[N, T, T, 3]`: crops are array slices of the resized
    image, so each pixel is copied once. Equal to stacking `mm.data.tiling.apply_plan`'s images."""
    if plan.clamped is not None:
        source = image.resize(plan.clamped, plan.resample)
    else:
        source = image
    resized = source.resize(plan.resized, plan.resample)
    arr = np.asarray(resized, np.uint8)
    out = np.empty((plan.num_images, plan.tile, plan.tile, 3), np.uint8)
    for i, (left, top, right, bottom) in enumerate(plan.boxes):
        out[i] = arr[top:bottom, left:right]
    if plan.thumbnail:
        thumb_src = resized if plan.thumbnail_from == "resized" else image
        out[-1] = np.asarray(thumb_src.resize((plan.tile, plan.tile), plan.resample), np.uint8)
    return out


def tile_image(image: Image.Image, plan: TilePlan, config: ProcessorConfig,
               normalizer: Normalizer | None = None) -> Tiles:
    """Cuts an RGB image by `plan` and normalises every tile (tiles are already `tile x tile`, so the
    processor's resize and crop are no-ops for a CLIP processor of that size; they are not re-run)."""
    normalizer = normalizer or Normalizer(config)
    return Tiles(normalizer(cut_tiles(image, plan)), plan)


def catty(image: Image.Image, config: ProcessorConfig | None = None, *, tile: int = 336, max_tiles: int = 8,
          thumbnail: bool = True, normalizer: Normalizer | None = None) -> Tiles:
    """POINTS' CATTY tiling of an RGB image, tiles normalised for a CLIP tower (see `mm.data.tiling`)."""
    config = config or ProcessorConfig.clip(tile)
    return tile_image(image, catty_plan(image.width, image.height, tile, max_tiles, thumbnail), config, normalizer)


def dynamic_tiles(image: Image.Image, config: ProcessorConfig, *, tile: int = 448, min_tiles: int = 1,
                  max_tiles: int = 12, thumbnail: bool = True, normalizer: Normalizer | None = None) -> Tiles:
    """InternVL-style non-overlapping dynamic tiling (see `mm.data.tiling.internvl_plan`)."""
    plan = internvl_plan(image.width, image.height, tile, min_tiles, max_tiles, thumbnail)
    return tile_image(image, plan, config, normalizer)
