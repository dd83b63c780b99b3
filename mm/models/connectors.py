"""Vision -> LLM connectors: projectors (POINTS' shared one merging two towers' features included), pixel shuffle.

- `Projector` (`ProjectorConfig.kind`): `linear` (one Linear), `mlp{N}x_gelu` (N Linears with exact-erf GELU
  between them, LLaVA's `mlp2x_gelu` for N = 2), `identity`. Params `linear_{k}/{kernel [in, out], bias}`;
  torch's `nn.Sequential` index of Linear k is 2k (`mm_projector.{0,2}` for mlp2x_gelu), a bare
  `nn.Linear` for `linear`. Kernel axes alternate `(embed, mlp)`, `(mlp, embed)`, ... (column- then
  row-parallel under tensor parallelism).
- `pixel_shuffle`: `[N, h*w, C] -> [N, h*w/4, 4C]` with out[i, j, (2m+k)*C + c] = x[2i+m, 2j+k, c]
  (DESIGN.md section 4), i.e. reshape(N, h/2, 2, w/2, 2, C).transpose(0, 1, 3, 2, 4, 5).
- `ProjectorConfig.merge` (POINTS' dual vision encoder, DESIGN.md section 4): the input holds S feature sources
  side by side (`[..., S * in_dim]`: general ViT, OCR ViT); the same Linears project each source (one matmul
  over `[..., S, in_dim]`) and the results merge as `sum_s merge[s] * projected_s` (w*general + (1-w)*ocr).
  The towers themselves run in `mm.models.vlm.VLMKind`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm.config import ProjectorConfig
from mm.models.partitioning import constrain
from mm.models.vision import Linear

Array = jax.Array


def _axes(k: int) -> tuple[str, str]:
    return ("embed", "mlp") if k % 2 == 0 else ("mlp", "embed")


class Projector(nn.Module):
    """`[..., sources * in_dim] -> [..., out_dim]` (sources > 1: projected each, merged by `config.merge`)."""

    config: ProjectorConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        if x.shape[-1] != c.input_width:
            raise ValueError(f"projector input width {x.shape[-1]} != in_dim {c.in_dim} x {c.sources} source(s)")
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        x = x.astype(dt)
        if c.merge:
            x = x.reshape(x.shape[:-1] + (c.sources, c.in_dim))
        for k in range(c.depth):
            if k:
                x = jax.nn.gelu(x, approximate=False)
            x = Linear(c.out_dim, _axes(k), dtype=dt, param_dtype=pdt, name=f"linear_{k}")(x)
        if c.merge:
            x = jnp.einsum("...sd,s->...d", x, jnp.asarray(c.merge, dt))
            if x.ndim == 3:
                x = constrain(x, ("act_batch", "act_length", "act_embed"))
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
