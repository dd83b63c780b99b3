"""`mm.from_pretrained`: one call for every checkpoint mm reads, returning a handle per model kind.

- `LLMHandle` (HF Llama / Qwen2 dirs, mm "llm" dirs): `logits`, `generate`, `generate_text`.
- `VLMHandle` (HF Llava dirs, IAA release dirs, mm "vlm" dirs): the same with `pixel_values=` and
  `workflow=` ("text" | "mm" | "g" for IAA; "mm" for LLaVA-style), one KV cache and one compiled program
  set per workflow.
- `VisionHandle` (HF CLIP / SigLIP dirs, mm "vision" dirs): `hidden_states`, `last_hidden_state`.

Handles own the params (optionally laid out on a mesh by the logical-axis rules), compile once per shape,
and keep their `Generator`s so repeated calls reuse compiled programs. Inputs may be numpy arrays or ragged
lists of token ids; outputs are numpy arrays.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mm import sharding as sh
from mm.config import ConfigError, LLMConfig, read_json
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
                    attention_impl: str | None = None, vision: str | Path | None = None) -> Any:
    """Loads an HF or mm checkpoint directory and returns the handle for its kind (see module docstring).

    LLMs: HF Llama / Qwen2 safetensors dirs and mm "llm" dirs. VLMs: HF Llava dirs, IAA release dirs
    (`vision=` a local CLIP dir overrides `mm_vision_tower`), mm "vlm" dirs. Towers: HF CLIP / SigLIP dirs.

    `dtype` is the compute dtype, `param_dtype` the dtype params are held in (default: float32).
    With `mesh`, params are sharded by the logical-axis `rules` and the forward runs as a sharded jit.
    """
    from mm import convert

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory")
    runtime = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl).items()
               if v is not None}
    other = _load_any(path, runtime, mesh, rules, vision)
    if other is not None:
        return other
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


@dataclasses.dataclass
class VisionHandle:
    """A loaded CLIP / SigLIP tower: HF-compatible hidden states as numpy arrays."""

    config: Any
    params: Any
    source: str = ""

    def hidden_states(self, pixel_values: Any) -> list[np.ndarray]:
        from mm.models import vision

        return vision.hidden_states(self.params, self.config, pixel_values)

    def last_hidden_state(self, pixel_values: Any) -> np.ndarray:
        from mm.models import vision

        return vision.last_hidden_state(self.params, self.config, pixel_values)


@dataclasses.dataclass
class VLMHandle:
    """A loaded vision-language model (IAA or LLaVA-style).

    Prompts carry ONE placeholder token per image (`image_token`, by default the tokenizer's image token if it
    has one, else the config's `image_token_id`); it is expanded here to the image's number of feature
    positions. `pixel_values` is `[B, N, C, H, W]` (rows with fewer images padded with anything at the end)
    or a list with one `[n_i, C, H, W]` array per row.
    """

    config: Any
    params: Any
    tokenizer: Any = None
    source: str = ""
    vision_source: str = ""
    image_token: int | None = None

    def __post_init__(self) -> None:
        from mm.models import vlm

        if self.image_token is None:
            tok_id = None
            if self.tokenizer is not None:
                from mm.tiny import IMAGE_TOKEN

                tok_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
                tok_id = None if tok_id == self.tokenizer.unk_token_id else tok_id
            self.image_token = self.config.image_token_id if tok_id is None else tok_id
        self._vlm = vlm
        self._forward: dict[tuple, Any] = {}
        self._generators: dict[str, Generator] = {}

    @property
    def workflows(self) -> tuple[str, ...]:
        return self.config.workflows

    def _prepare(self, input_ids: Any, pixel_values: Any, workflow: str) -> tuple:
        from mm.models.splice import expand_placeholders

        if workflow not in self.workflows:
            raise ValueError(f"{self.source}: workflow {workflow!r}; this model has {self.workflows}")
        rows = [list(map(int, r)) for r in (np.asarray(input_ids) if hasattr(input_ids, "shape") else input_ids)]
        if pixel_values is None:
            if any(self.image_token in r for r in rows):
                raise ValueError("the prompt has image placeholders but no pixel_values were given")
            return rows, None, None
        if workflow == "text":
            raise ValueError("the text workflow takes no images (it is the frozen LLM alone)")
        per_row = [np.asarray(p) for p in pixel_values]
        if len(per_row) != len(rows):
            raise ValueError(f"pixel_values has {len(per_row)} rows for {len(rows)} prompts")
        n_max = max(1, max(len(p) for p in per_row))
        shape = per_row[0].shape[1:]
        pix = np.zeros((len(rows), n_max) + tuple(shape), np.float32)
        expanded, masks = [], []
        for i, (r, p) in enumerate(zip(rows, per_row)):
            counts = [self.config.tokens_per_image] * sum(1 for t in r if t == self.image_token)
            ids, m = expand_placeholders(r, self.image_token, counts)
            if len(counts) > len(p):
                raise ValueError(f"prompt {i} has {len(counts)} image placeholders but {len(p)} images")
            pix[i, :len(p)] = p
            expanded.append(ids)
            masks.append(np.asarray(m, bool))
        return expanded, pix, masks

    def logits(self, input_ids: Any, *, pixel_values: Any = None, workflow: str = "mm") -> np.ndarray:
        """float32 logits `[B, T', V]` over the expanded sequence (left-padded when ragged)."""
        rows, pix, masks = self._prepare(input_ids, pixel_values, workflow)
        width = max(len(r) for r in rows)
        ids, att = left_pad(rows, width, 0)
        img = None
        if masks is not None:
            img = np.zeros_like(att, bool)
            for i, m in enumerate(masks):
                img[i, width - len(m):] = m
        key = (workflow, pix is None)
        if key not in self._forward:
            vlm, cfg = self._vlm, self.config

            def fwd(params: Any, ids: Any, att: Any, pix: Any, img: Any) -> Any:
                return vlm.forward(params, cfg, jnp.maximum(ids, 0) if pix is None else ids, pixel_values=pix,
                                   image_mask=img, workflow=workflow, positions=positions_from_mask(att),
                                   segment_ids=att)[0]
            self._forward[key] = jax.jit(fwd)
        return np.asarray(self._forward[key](self.params, ids, att, pix, img), np.float32)

    def generate(self, input_ids: Any, *, pixel_values: Any = None, workflow: str = "mm",
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] | None = None, seed: int = 0) -> np.ndarray:
        """New tokens `[B, max_new_tokens]`; cached decoding in the chosen workflow."""
        rows, pix, masks = self._prepare(input_ids, pixel_values, workflow)
        if workflow not in self._generators:
            pad = self.config.lm.llm.pad_token_id
            self._generators[workflow] = Generator(self._vlm.decode_fns(self.config, workflow),
                                                   pad_id=0 if pad is None else pad)
        extra = {} if pix is None else {"pixel_values": pix, "image_mask": masks}
        llm_cfg = self.config.lm.llm
        stops = llm_cfg.eos_token_id if stop_tokens is None else tuple(stop_tokens)
        out, _ = self._generators[workflow](self.params, rows, max_new_tokens=max_new_tokens,
                                            temperature=temperature, top_k=top_k, top_p=top_p,
                                            stop_tokens=stops, seed=seed, extra=extra)
        return out


def _load_any(path: Path, runtime: dict[str, Any], mesh: Any, rules: Any, vision: Any) -> Any:
    """Dispatches on the directory's manifest (mm) or config.json model_type (HF)."""
    from mm import convert
    from mm.convert import hf_vision, vlm_dir

    tokenizer = _load_tokenizer(path)
    if (path / convert.MM_CONFIG_FILE).exists():
        kind = read_json(path / convert.MM_CONFIG_FILE).get("kind")
        if kind == hf_vision.VISION_KIND:
            cfg, params = hf_vision.load_mm_vision(path)
            return VisionHandle(cfg, params, str(path))
        if kind == vlm_dir.KIND:
            cfg, params = vlm_dir.load_mm_vlm(path, param_dtype=runtime.get("param_dtype", "float32"))
            return VLMHandle(cfg, params, tokenizer, str(path))
        return None
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: neither an mm checkpoint ({convert.MM_CONFIG_FILE}) nor an HF one (config.json)")
    model_type = read_json(path / "config.json").get("model_type")
    pdt = runtime.get("param_dtype", "float32")
    if model_type == "llava":
        from mm.convert.llava_hf import load_llava

        cfg, params = load_llava(path, param_dtype=pdt)
        return VLMHandle(cfg, params, tokenizer, str(path))
    if model_type == "IAA":
        from mm.convert.iaa_release import load_release_vlm

        cfg, params, used = load_release_vlm(path, vision=vision, param_dtype=pdt)
        print(f"mm.from_pretrained({path}): {used}", flush=True)
        return VLMHandle(cfg, params, tokenizer, str(path), vision_source=used)
    if hf_vision.is_vision_hf_config({"model_type": model_type}):
        cfg, params = hf_vision.load_hf_vision(path, param_dtype=pdt)
        return VisionHandle(cfg, params, str(path))
    return None
