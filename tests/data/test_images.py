"""Decoding (modes, EXIF, errors) and CLIP / SigLIP preprocessing against transformers' PIL-backed
processors (pinned: `CLIPImageProcessorPil`, `SiglipImageProcessorPil`, the no-torchvision path)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import center_crop as hf_center_crop
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mm.data.images import (ImageError, Normalizer, ProcessorConfig, catty, center_crop, dynamic_tiles, load_image,
                            mean_fill, pad_to_square, preprocess)

TOL = 1e-5


def _smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth image with some noise: resampling errors show up on gradients, not only on noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


PROCESSORS = {
    "clip224": lambda: CLIPImageProcessorPil(),
    "clip336": lambda: CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    "siglip224": lambda: SiglipImageProcessorPil(),
    "siglip384": lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}),
}


@pytest.mark.parametrize("proc", sorted(PROCESSORS))
@pytest.mark.parametrize("size", [(640, 480), (333, 501), (336, 336), (120, 60), (1001, 337), (50, 400)])
def test_preprocess_matches_transformers(proc, size):
    hf = PROCESSORS[proc]()
    img = _smooth(*size, seed=size[0])
    ref = hf(images=img, return_tensors="np")["pixel_values"][0]
    ours = preprocess(img, ProcessorConfig.from_hf_dict(hf.to_dict()))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert float(np.max(np.abs(ours - ref))) <= TOL


def test_presets_equal_hf_configs():
    assert ProcessorConfig.from_hf_dict(PROCESSORS["clip336"]().to_dict()) == ProcessorConfig.clip(336)
    assert ProcessorConfig.from_hf_dict(PROCESSORS["siglip384"]().to_dict()) == ProcessorConfig.siglip(384)


@pytest.mark.parametrize("shape", [(100, 80), (400, 500), (10, 500)])
def test_center_crop_matches_hf_including_padding(shape):
    arr = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    for size in [(64, 64), (200, 120), (336, 336)]:
        ref = hf_center_crop(arr, size, input_data_format="channels_last")
        assert np.array_equal(center_crop(arr, size), ref)


def test_normalizer_is_bit_identical_to_rescale_then_normalize():
    cfg = ProcessorConfig.clip()
    arr = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 256, 3)
    expected = ((arr.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(cfg.image_mean)) / np.float32(
        cfg.image_std)
    assert np.array_equal(Normalizer(cfg)(arr), np.moveaxis(expected, -1, 0))


# ------------------------------------------------------------------------------------------ modes
def _modes() -> dict[str, Image.Image]:
    rgb = _smooth(64, 48)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))))
    pal_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t.info["transparency"] = 3
    return {"L": rgb.convert("L"), "1": rgb.convert("1"), "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE),
            "P+transparency": pal_t, "LA": rgba.convert("LA"), "RGBA": rgba, "CMYK": rgb.convert("CMYK"),
            "YCbCr": rgb.convert("YCbCr")}


@pytest.mark.parametrize("mode", sorted(_modes()))
def test_modes_convert_like_transformers(mode):
    """Every mode becomes RGB; with the default white background it equals HF's convert_to_rgb, so the whole
    pipeline equals HF's processor for such files."""
    img = _modes()[mode]
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG"}.get(mode, "PNG")
    data = _encode(img, fmt)
    ours = load_image(data, name=f"x.{fmt.lower()}")
    assert ours.mode == "RGB" and ours.size == img.size
    ref = hf_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    assert np.array_equal(np.asarray(ours), ref)
    hf = PROCESSORS["clip224"]()
    assert np.abs(preprocess(ours, ProcessorConfig.from_hf_dict(hf.to_dict()))
                  - hf(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]).max() <= TOL


def test_rgba_on_mean_colour():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    fill = mean_fill(ProcessorConfig.clip())
    assert fill == (122, 116, 104)
    out = load_image(_encode(rgba, "PNG"), background=fill)
    assert np.all(np.asarray(out) == np.array(fill, np.uint8))
    half = Image.new("RGBA", (4, 4), (200, 100, 0, 128))
    got = np.asarray(load_image(_encode(half, "PNG"), background=(0, 0, 0)))[0, 0]
    assert np.all(np.abs(got.astype(int) - np.array([100, 50, 0])) <= 1)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grey_is_scaled(mode):
    vals = np.array([[0, 257, 65535, 32896]], np.uint16)
    img = Image.fromarray(vals) if mode == "I;16" else Image.fromarray(vals.astype(np.int32), "I")
    data = _encode(img, "PNG" if mode == "I;16" else "TIFF")
    out = np.asarray(load_image(data, name="grey16"))
    assert out.shape == (1, 4, 3) and list(out[0, :, 0]) == [0, 1, 255, 128]
    assert (out == out[..., :1]).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red square top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data)
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[5, 15, 0] > 200 and arr[5, 15, 1] < 60  # top-left went to top-right


# ----------------------------------------------------------------------------------------- errors
def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    jpeg = _encode(_smooth(200, 200), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    for name in ("cut.jpg", "junk.png", "text.jpg", "missing.png"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)
    # in-memory bytes: the message names the sample and is the same every time (it goes into checkpointed skip
    # examples, which a resumed run must reproduce exactly), not Pillow's repr of a stream object
    messages = set()
    for _ in range(2):
        with pytest.raises(ImageError) as e:
            load_image(b"not an image at all", name="row9 image 0")
        messages.add(str(e.value))
    assert messages == {"row9 image 0: corrupt or truncated image (no format Pillow can identify)"}


def test_absurd_sizes_are_rejected(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageError, match=r"big\.png.*over the budget"):
        load_image(path, max_pixels=300 * 200 - 1)
    assert load_image(path, max_pixels=300 * 200).size == (300, 200)
    with pytest.raises(ImageError, match="side of 0"):
        load_image(Image.new("RGB", (0, 5)), name="empty")
    # A header claiming a side of 0 (IHDR patched, CRC left stale) is rejected, by size or as corrupt.
    png = bytearray(_encode(Image.new("RGB", (4, 4)), "PNG"))
    png[16:20] = (0).to_bytes(4, "big")
    with pytest.raises(ImageError, match="zero.png"):
        load_image(bytes(png), name="zero.png")


# ----------------------------------------------------------------------------------- pad / tiles
def test_pad_to_square_centres_on_the_fill():
    img = Image.new("RGB", (10, 4), (255, 0, 0))
    sq = np.asarray(pad_to_square(img, (1, 2, 3)))
    assert sq.shape == (10, 10, 3)
    assert (sq[3:7] == [255, 0, 0]).all() and (sq[:3] == [1, 2, 3]).all() and (sq[7:] == [1, 2, 3]).all()
    tall = np.asarray(pad_to_square(Image.new("RGB", (3, 8), (0, 255, 0)), (9, 9, 9)))
    assert tall.shape == (8, 8, 3) and (tall[:, 2:5] == [0, 255, 0]).all() and (tall[:, :2] == 9).all()
    assert pad_to_square(img.resize((5, 5)), (0, 0, 0)).size == (5, 5)


def test_catty_tiles_equal_hf_processor_on_each_crop():
    img = _smooth(800, 600)
    tiles = catty(img)
    assert tiles.grid == (3, 2) and tiles.pixel_values.shape == (7, 3, 336, 336)
    from mm.data.tiling import apply_plan
    hf = PROCESSORS["clip336"]()
    ref = hf(images=apply_plan(img, tiles.plan), return_tensors="np")["pixel_values"]
    assert float(np.max(np.abs(tiles.pixel_values - ref))) <= TOL


def test_dynamic_tiles_shapes():
    t = dynamic_tiles(_smooth(900, 300), ProcessorConfig.siglip(448), tile=448, max_tiles=6)
    assert t.grid == (3, 1) and t.pixel_values.shape == (4, 3, 448, 448)
