"""`mm.from_pretrained`: one handle over HF and mm checkpoints, with `logits` and `generate`.

The handle owns the params (optionally laid out on a mesh by the logical-axis rules), compiles its forward
once per shape, and keeps one `Generator` so repeated `generate` calls reuse compiled programs. Inputs may be
numpy arrays or ragged lists of token ids; outputs are numpy arrays.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mm import sharding as sh
from mm.config import ConfigError, LLMConfig
from mm.generate import Generator, left_pad, positions_from_mask
from mm.models import llm

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclasses.dataclass
class LLMHandle:
    """A loaded decoder LLM. Use `mm.from_pretrained` rather than constructing this directly."""

    config: LLMConfig
    params: Any
    tokenizer: Any = None
    mesh: Any = None
    rules: Sequence[tuple[str, Any]] = sh.DEFAULT_RULES
    source: str = ""

    def __post_init__(self) -> None:
        model = llm.LLM(self.config)

        def forward(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
            logits, _ = model.apply({"params": params}, ids, positions_from_mask(mask), segment_ids=mask)
            return logits

        if self.mesh is None:
            self._forward = jax.jit(forward)
        else:
            pshard = sh.param_shardings(llm.abstract_params(self.config), self.mesh, self.rules)
            self.params = jax.device_put(self.params, pshard)
            batch = sh.batch_sharding(self.mesh, 2, self.rules)
            self._forward = sh.sharded_jit(
                forward, self.mesh, self.rules, in_shardings=(pshard, batch, batch),
                out_shardings=sh.logical_sharding(self.mesh, ("act_batch", "act_length", "act_vocab"), self.rules))
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self._generator = Generator(llm.decode_fns(self.config), pad_id=pad)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """float32 logits `[B, T, V]`. Ragged lists are left-padded; padded positions' rows are meaningless."""
        ids, mask = _as_batch(input_ids, attention_mask, self._generator.pad_id)
        return np.asarray(self._forward(self.params, ids, mask), dtype=np.float32)

    def generate(self, input_ids: Any, *, attention_mask: Any = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] | None = None, seed: int = 0) -> np.ndarray:
        """New tokens `[B, max_new_tokens]` (rows padded with the pad id after a stop token).

        `stop_tokens` defaults to the config's EOS ids; pass `()` to generate exactly `max_new_tokens`.
        """
        stops = self.config.eos_token_id if stop_tokens is None else tuple(stop_tokens)
        if not isinstance(input_ids, np.ndarray) and not hasattr(input_ids, "shape"):
            input_ids = [list(map(int, row)) for row in input_ids]
        out, _ = self._generator(self.params, input_ids, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, stop_tokens=stops, seed=seed)
        return out

    def generate_text(self, prompts: str | Sequence[str], **kw: Any) -> list[str]:
        """Tokenises, generates and decodes (needs the checkpoint's tokenizer)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: no tokenizer files found next to the checkpoint")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        out = self.generate(ids, **kw)
        stops = set(self.config.eos_token_id)
        texts = []
        for row in out:
            toks = []
            for t in row.tolist():
                if t in stops:
                    break
                toks.append(t)
            texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        return texts


def _as_batch(input_ids: Any, attention_mask: Any, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(input_ids, np.ndarray) or hasattr(input_ids, "shape"):
        ids = np.asarray(input_ids, np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32).reshape(ids.shape)
        return ids, mask
    rows = [list(map(int, r)) for r in input_ids]
    return left_pad(rows, max(len(r) for r in rows), pad_id)


def _load_tokenizer(path: Path) -> Any:
    for d in (path / "tokenizer", path):
        if any((d / f).exists() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(d))
    return None


def from_pretrained(path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh: Any = None, rules: Sequence[tuple[str, Any]] | None = None,
                    attention_impl: str | None = None) -> LLMHandle:
    """Loads an HF checkpoint directory (Llama / Qwen2 safetensors) or an mm checkpoint directory.

    `dtype` is the compute dtype, `param_dtype` the dtype params are held in (default: float32).
    With `mesh`, params are sharded by the logical-axis `rules` and the forward runs as a sharded jit.
    """
    from mm import convert

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory")
    runtime = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl).items()
               if v is not None}
    if (path / convert.MM_CONFIG_FILE).exists():
        config = convert.read_mm_config(path).replace(**runtime)
        shardings = None
        if mesh is not None:  # restore straight onto the mesh: no host copy of the whole model
            abstract = llm.abstract_params(config)
            shardings = sh.param_shardings(abstract, mesh, tuple(rules or sh.DEFAULT_RULES))
        params = convert.load_mm_params(path, config, shardings=shardings)
    elif (path / "config.json").exists():
        config, params = convert.load_hf_llm(path, **runtime)
    else:
        raise ConfigError(f"{path}: neither an mm checkpoint ({convert.MM_CONFIG_FILE}) nor an HF one (config.json)")
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x, config.params_dtype), params)
    return LLMHandle(config=config, params=params, tokenizer=_load_tokenizer(path), mesh=mesh,
                     rules=tuple(rules or sh.DEFAULT_RULES), source=str(path))
