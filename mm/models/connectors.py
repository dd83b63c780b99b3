"""Vision -> LLM connectors: projectors, pixel shuffle, and POINTS' dual vision encoder.

- `Projector` (`ProjectorConfig.kind`): `linear` (one Linear), `mlp{N}x_gelu` (N Linears with exact-erf GELU
  between them, LLaVA's `mlp2x_gelu` for N = 2), `identity`. Params `linear_{k}/{kernel [in, out], bias}`;
  torch's `nn.Sequential` index of Linear k is 2k (`mm_projector.{0,2}` for mlp2x_gelu), a bare
  `nn.Linear` for `linear`. Kernel axes alternate `(embed, mlp)`, `(mlp, embed)`, ... (column- then
  row-parallel under tensor parallelism).
- `pixel_shuffle`: `[N, h*w, C] -> [N, h*w/4, 4C]` with out[i, j, (2m+k)*C + c] = x[2i+m, 2j+k, c]
  (DESIGN.md section 4), i.e. reshape(N, h/2, 2, w/2, 2, C).transpose(0, 1, 3, 2, 4, 5).
- `DualEncoder`: a general ViT and an OCR ViT (same architecture), each -> feature layer (penultimate by
  default) -> pixel shuffle -> one shared projector; merged after projection as w*general + (1-w)*ocr.
  Params `general_vision_tower/...`, `ocr_vision_tower/...` (each a full `VisionTower` tree, so the HF
  vision name map applies with an mm prefix) and `projector/...`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm.config import ConfigError, ProjectorConfig, VisionConfig
from mm.models.partitioning import constrain
from mm.models.vision import (
    FEATURE_KINDS,
    Linear,
    VisionTower,
    select_features,
    select_layer_index,
)

Array = jax.Array


def _axes(k: int) -> tuple[str, str]:
    return ("embed", "mlp") if k % 2 == 0 else ("mlp", "embed")


class Projector(nn.Module):
    """`[..., in_dim] -> [..., out_dim]`."""

    config: ProjectorConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        if x.shape[-1] != c.in_dim:
            raise ValueError(f"projector input width {x.shape[-1]} != in_dim {c.in_dim}")
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        x = x.astype(dt)
        for k in range(c.depth):
            if k:
                x = jax.nn.gelu(x, approximate=False)
            x = Linear(c.out_dim, _axes(k), dtype=dt, param_dtype=pdt, name=f"linear_{k}")(x)
        return x


def pixel_shuffle(x: Array, grid: tuple[int, int] | None = None) -> Array:
    """`[N, h*w, C] -> [N, h*w/4, 4C]`, 2x2 neighbourhoods stacked on channels in (m, k, c) order.
    `grid=(h, w)` defaults to a square grid."""
    n, t, c = x.shape
    if grid is None:
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(f"pixel_shuffle: {t} tokens are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    if h * w != t or h % 2 or w % 2:
        raise ValueError(f"pixel_shuffle: grid {h}x{w} must hold {t} tokens and have even sides")
    y = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, (h // 2) * (w // 2), 4 * c)


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """POINTS' general + OCR ViT pair with a shared projector; `weight` is w in w*general + (1-w)*ocr."""

    general: VisionConfig = VisionConfig()
    ocr: VisionConfig = VisionConfig()
    projector: ProjectorConfig = ProjectorConfig(in_dim=4096)
    weight: float = 0.5
    layer: int = -2
    feature: str = "patch"
    pixel_shuffle: bool = True

    def __post_init__(self) -> None:
        g, o = self.general, self.ocr
        if (g.hidden_size, g.image_size, g.patch_size, g.model_type) != (o.hidden_size, o.image_size, o.patch_size,
                                                                        o.model_type):
            raise ConfigError("dual encoder: general and ocr towers must share kind, width, image and patch size")
        if self.feature not in FEATURE_KINDS:
            raise ConfigError(f"dual encoder: feature={self.feature!r}; choose one of {FEATURE_KINDS}")
        if self.pixel_shuffle and self.feature == "cls_patch":
            raise ConfigError("dual encoder: pixel shuffle needs feature='patch' (a token grid)")
        want = g.hidden_size * (4 if self.pixel_shuffle else 1)
        if self.projector.in_dim != want:
            raise ConfigError(f"dual encoder: projector.in_dim={self.projector.in_dim}, features have width {want}")
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"dual encoder: weight={self.weight} outside [0, 1]")
        select_layer_index(self.layer, g.num_layers)
        select_layer_index(self.layer, o.num_layers)


class DualEncoder(nn.Module):
    """Pixel values `[B, C, H, W]` (tiles) -> merged projected features `[B, T, out_dim]`."""

    config: DualEncoderConfig

    def setup(self) -> None:
        c = self.config
        self.general_vision_tower = VisionTower(c.general)
        self.ocr_vision_tower = VisionTower(c.ocr)
        self.projector = Projector(c.projector)

    def features(self, tower: VisionTower, vc: VisionConfig, pixel_values: Array, interpolate: bool) -> Array:
        """One tower's selected, shuffled features; runs only the layers needed (all while initialising,
        so every layer gets params)."""
        c = self.config
        idx = select_layer_index(c.layer, vc.num_layers)
        out = tower(pixel_values, interpolate, num_layers=None if self.is_initializing() else idx)
        x = select_features(out["hidden_states"][: idx + 1], -1, c.feature, has_class_token=vc.has_class_token)
        if c.pixel_shuffle:
            gh, gw = pixel_values.shape[-2] // vc.patch_size, pixel_values.shape[-1] // vc.patch_size
            x = pixel_shuffle(x, (gh, gw))
        return x

    def __call__(self, pixel_values: Array, ocr_pixel_values: Array | None = None,
                 interpolate_pos_encoding: bool = False) -> Array:
        c = self.config
        ocr_px = pixel_values if ocr_pixel_values is None else ocr_pixel_values
        g = self.projector(self.features(self.general_vision_tower, c.general, pixel_values, interpolate_pos_encoding))
        o = self.projector(self.features(self.ocr_vision_tower, c.ocr, ocr_px, interpolate_pos_encoding))
        out = c.weight * g + (1.0 - c.weight) * o
        return constrain(out, ("act_batch", "act_length", "act_embed"))
