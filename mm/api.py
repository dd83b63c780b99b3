"""`mm.from_pretrained`: one call for every checkpoint mm reads, returning a handle per model kind.

- `LLMHandle` (HF Llama / Qwen2 dirs, mm "llm" dirs): `logits`, `generate`, `generate_text`.
- `VLMHandle` (HF Llava dirs, IAA release dirs, mm "vlm" dirs): the same with `pixel_values=` and
  `workflow=` ("text" | "mm" | "g" for IAA; "mm" for LLaVA-style), one KV cache and one compiled program
  set per workflow.
- `VisionHandle` (HF CLIP / SigLIP dirs, mm "vision" dirs): `hidden_states`, `last_hidden_state`.

Every handle honours `from_pretrained`'s `dtype`, `param_dtype`, `attention_impl` and `mesh` (+ `rules`) in
the same way, through one `Runtime`: params are cast and laid out on the mesh by the logical-axis rules, the
model computes in `dtype` with `attention_impl`, and logits / hidden states / generation compile under that
mesh and rules. Handles compile once per shape and keep their `Generator`s so repeated calls reuse compiled
programs. Inputs may be numpy arrays or ragged lists of token ids; outputs are float32 numpy arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mm import sharding as sh
from mm.attention import IMPLEMENTATIONS
from mm.config import ConfigError, LLMConfig, VisionConfig, VLMConfig, vlm_with_runtime
from mm.generate import DecodeFns, Generator, left_pad, positions_from_mask
from mm.models import kinds, llm

@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a handle holds and runs its model - `from_pretrained`'s `dtype` (compute; None keeps the
    checkpoint config's), `param_dtype`, `attention_impl` (None keeps the config's, whose None lets
    `mm.attention` pick per backend), `mesh` and `rules` - applied the same way by every handle:

    - `configure(config)`: the model config with those options, in every sub-config of a VLM;
    - `place(params, abstract)`: params cast to the dtypes of the model's abstract params and, with a mesh,
      laid out by the logical-axis rules (`mm.sharding.param_shardings`, one table);
    - `jit(fn)`: compiled under the mesh and rules (the models' logical activation constraints are active),
      taking params in the layout `place` gave them; `inputs(...)` puts batch arrays on the mesh;
    - `generator(fns, pad_id)` / `generate(generator, ...)`: cached decoding traced and run the same way.
    """

    dtype: str | None = None
    param_dtype: str = "float32"
    attention_impl: str | None = None
    mesh: Any = None
    rules: tuple[tuple[str, Any], ...] = sh.DEFAULT_RULES

    def __post_init__(self) -> None:
        for key in ("dtype", "param_dtype"):
            value = getattr(self, key)
            if value is None and key == "dtype":
                continue
            try:
                ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:
                ok = False
            if not ok:
                raise ConfigError(f"from_pretrained: {key}={value!r} is not a floating-point dtype "
                                  "(e.g. 'float32', 'bfloat16')")
        if self.attention_impl is not None and self.attention_impl not in IMPLEMENTATIONS:
            raise ConfigError(f"from_pretrained: attention_impl={self.attention_impl!r}; choose one of "
                              f"{IMPLEMENTATIONS} or None (per backend)")
        if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
            raise ConfigError(f"from_pretrained: mesh={self.mesh!r} is not a jax.sharding.Mesh "
                              "(make one with mm.sharding.make_mesh)")

    def options(self) -> dict[str, Any]:
        opts = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        return {k: v for k, v in opts.items() if v is not None}

    def configure(self, config: Any) -> Any:
        """`config` (an `LLMConfig`, `VisionConfig` or `VLMConfig`) with this runtime's options."""
        if isinstance(config, VLMConfig):
            return vlm_with_runtime(config, **self.options())
        return config.replace(**self.options())

    def shardings(self, abstract: Any) -> Any:
        """NamedShardings for a boxed abstract param tree, or None without a mesh."""
        return None if self.mesh is None else sh.param_shardings(abstract, self.mesh, self.rules)

    def place(self, params: Any, abstract: Any, source: str = "params") -> Any:
        """`params` (numpy or jax arrays) cast to `abstract`'s dtypes and placed on their shardings."""
        want = traverse_util.flatten_dict(nn.unbox(abstract))
        got = traverse_util.flatten_dict(params)
        if set(want) != set(got):
            missing = sorted("/".join(k) for k in set(want) - set(got))
            extra = sorted("/".join(k) for k in set(got) - set(want))
            raise ConfigError(f"{source}: params do not match the model (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")
        shard = traverse_util.flatten_dict(self.shardings(abstract)) if self.mesh is not None else {}
        placed = {}
        for path, spec in want.items():
            x = got[path]
            if tuple(x.shape) != tuple(spec.shape):
                raise ConfigError(f"{source}: param {'/'.join(path)} has shape {tuple(x.shape)}, "
                                  f"the model {tuple(spec.shape)}")
            x = (x if x.dtype == spec.dtype else x.astype(spec.dtype)) if isinstance(x, jax.Array) \
                else np.asarray(x, spec.dtype)
            if not shard:
                placed[path] = jnp.asarray(x)
            elif getattr(x, "sharding", None) == shard[path]:
                placed[path] = x
            else:
                placed[path] = jax.device_put(x, shard[path])
        return traverse_util.unflatten_dict(placed)

    def inputs(self, *arrays: Any) -> tuple[Any, ...]:
        """Batch arrays (None passes through) on the mesh: batch over the data-parallel axes when it divides
        them, replicated otherwise. Without a mesh they are returned as they are."""
        if self.mesh is None:
            return arrays
        axes = sh.batch_sharding(self.mesh, 1, self.rules).spec[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        dp = int(np.prod([self.mesh.shape[a] for a in axes]))
        out = []
        for x in arrays:
            if x is None:
                out.append(None)
                continue
            x = np.asarray(x)
            s = sh.batch_sharding(self.mesh, x.ndim, self.rules) if x.shape[0] % dp == 0 else sh.replicated(self.mesh)
            out.append(jax.device_put(x, s))
        return tuple(out)

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return jax.jit(fn) if self.mesh is None else sh.sharded_jit(fn, self.mesh, self.rules)

    def generator(self, fns: DecodeFns, pad_id: int) -> Generator:
        """A `Generator` whose prefill / step / cache functions trace under the logical-axis rules."""
        if self.mesh is not None:
            fns = DecodeFns(prefill=self._with_rules(fns.prefill), step=self._with_rules(fns.step),
                            init_cache=self._with_rules(fns.init_cache))
        return Generator(fns, pad_id=pad_id)

    def generate(self, generator: Generator, *args: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            return generator(*args, **kw)

    def _with_rules(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def traced(*args: Any, **kw: Any) -> Any:
            with nn.logical_axis_rules(list(self.rules)):
                return fn(*args, **kw)
        return traced


@dataclasses.dataclass
class LLMHandle:
    """A loaded decoder LLM. Use `mm.from_pretrained` rather than constructing this directly."""

    config: LLMConfig
    params: Any
    tokenizer: Any = None
    runtime: Runtime = Runtime()
    source: str = ""

    def __post_init__(self) -> None:
        self.config = self.runtime.configure(self.config)
        model = kinds.of(self.config)
        self.params = self.runtime.place(self.params, model.abstract_params(), self.source or "params")

        def forward(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
            logits, _ = model.apply(params, ids, positions_from_mask(mask), workflow="text", segment_ids=mask)
            return logits

        self._forward = self.runtime.jit(forward)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self._generator = self.runtime.generator(model.decode_fns("text"), pad)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """float32 logits `[B, T, V]`. Ragged lists are left-padded; padded positions' rows are meaningless."""
        ids, mask = self.runtime.inputs(*_as_batch(input_ids, attention_mask, self._generator.pad_id))
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
        out, _ = self.runtime.generate(self._generator, self.params, input_ids, attention_mask=attention_mask,
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


def _load_tokenizer(directory: Path | None) -> Any:
    if directory is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def from_pretrained(path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh: Any = None, rules: Sequence[tuple[str, Any]] | None = None,
                    attention_impl: str | None = None, vision: str | Path | None = None,
                    adapter: str | Path | None = None) -> Any:
    """Loads an HF or mm checkpoint directory and returns the handle for its kind (see module docstring).

    `adapter=` an HF PEFT LoRA adapter dir (`adapter_config.json` + `adapter_model.safetensors`, e.g. what
    `mm-convert export-run --lora-format peft` writes) for this LLM: it is merged into the loaded weights
    (`W + alpha / r * B A`, PEFT's `merge_and_unload`), so the handle runs at the base model's speed.

    LLMs: HF Llama / Qwen2 safetensors dirs and mm "llm" dirs. VLMs: HF Llava dirs, IAA release dirs
    (`vision=` a local CLIP dir overrides `mm_vision_tower`), mm "vlm" dirs. Towers: HF CLIP / SigLIP dirs.

    Every handle honours the same keywords (see `Runtime`): `dtype` is the compute dtype (default: the
    checkpoint config's, float32 for HF dirs), `param_dtype` the dtype params are held in (default: float32),
    `attention_impl` one of `mm.attention.IMPLEMENTATIONS` (default: per backend). With `mesh`, params are
    sharded by the logical-axis `rules` (default `mm.sharding.DEFAULT_RULES`) and every forward and generation
    compiles under that mesh. An invalid value is a `ConfigError` naming the keyword.
    """
    if not Path(path).is_dir():
        raise ConfigError(f"{path}: not a directory")
    path = Path(path).resolve()  # Orbax reads metadata of absolute paths only
    runtime = Runtime(dtype=dtype, param_dtype=param_dtype or "float32", attention_impl=attention_impl, mesh=mesh,
                      rules=tuple(rules or sh.DEFAULT_RULES))
    handle = _load(path, runtime, vision)
    return handle if adapter is None else _merge_adapter(handle, Path(adapter))


def _merge_adapter(handle: Any, adapter: Path) -> Any:
    from mm.checkpoints.errors import ConversionError
    from mm.convert.llm_family import llm_name_map
    from mm.convert.peft_adapter import read_peft
    from mm import lora_params

    if not isinstance(handle, LLMHandle):
        raise ConfigError(f"adapter={adapter}: PEFT adapters load onto LLMs (HF Llama / Qwen2, mm llm dirs); "
                          f"{handle.source} loads as a {type(handle).__name__}")
    c = dataclasses.replace(handle.config, scan_layers=False)
    try:
        adapters = read_peft(adapter, llm_name_map(c), llm.adapter_candidates(c))
    except ConversionError as e:
        raise ConfigError(f"adapter={adapter}: {e}") from e
    params = handle.params
    scanned = handle.config.scan_layers
    if scanned:
        params = llm.unscan_params(params, c.num_layers)
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = traverse_util.unflatten_dict(lora_params.merged({**flat, **adapters}), sep="/")
    handle.params = llm.scan_params(merged, c.num_layers) if scanned else merged
    handle.source = f"{handle.source} + {adapter}"
    return handle


@dataclasses.dataclass
class VisionHandle:
    """A loaded CLIP / SigLIP tower: HF-compatible hidden states as float32 numpy arrays."""

    config: VisionConfig
    params: Any
    source: str = ""
    runtime: Runtime = Runtime()

    def __post_init__(self) -> None:
        from mm.models import vision

        self.config = self.runtime.configure(self.config)
        self.params = self.runtime.place(self.params, vision.abstract_params(self.config), self.source or "params")
        self._vision = vision
        self._forward: dict[bool, Any] = {}

    def _run(self, pixel_values: Any) -> Any:
        interp = self._vision._needs_interpolation(self.config, pixel_values)
        if interp not in self._forward:
            tower = self._vision.VisionTower(self.config)
            self._forward[interp] = self.runtime.jit(lambda p, x: tower.apply({"params": p}, x, interp))
        (pix,) = self.runtime.inputs(np.asarray(pixel_values, np.float32))
        return self._forward[interp](self.params, pix)

    def hidden_states(self, pixel_values: Any) -> list[np.ndarray]:
        """HF's `output_hidden_states` list: the embeddings' output, then each layer's."""
        return [np.asarray(h, np.float32) for h in self._run(pixel_values)["hidden_states"]]

    def last_hidden_state(self, pixel_values: Any) -> np.ndarray:
        """HF's `last_hidden_state` (SigLIP: after post-layernorm; CLIP: the last layer's output)."""
        return np.asarray(self._run(pixel_values)["last_hidden_state"], np.float32)


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
    runtime: Runtime = Runtime()

    def __post_init__(self) -> None:
        self.config = self.runtime.configure(self.config)
        self._model = kinds.of(self.config)
        self.params = self.runtime.place(self.params, self._model.abstract_params(), self.source or "params")

        if self.image_token is None:
            tok_id = None
            if self.tokenizer is not None:
                from mm.config import IMAGE_TOKEN

                tok_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
                tok_id = None if tok_id == self.tokenizer.unk_token_id else tok_id
            self.image_token = self.config.image_token_id if tok_id is None else tok_id
        self._forward: dict[tuple, Any] = {}
        self._generators: dict[str, Generator] = {}

    @property
    def workflows(self) -> tuple[str, ...]:
        return self._model.workflows

    def _prepare(self, input_ids: Any, pixel_values: Any, workflow: str, image_tiles: Any = None) -> tuple:
        """Placeholders expanded to each image's positions: `tokens_per_image` a tile, one tile an image unless
        `image_tiles` (per row, the tile count of each image: its tiles are consecutive in `pixel_values`)."""
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
            n_images = sum(1 for t in r if t == self.image_token)
            tiles = [1] * n_images if image_tiles is None else list(image_tiles[i])
            if len(tiles) != n_images or sum(tiles) > len(p):
                raise ValueError(f"prompt {i} has {n_images} image placeholders for {len(p)} tiles "
                                 f"({'one an image' if image_tiles is None else tiles})")
            ids, m = expand_placeholders(r, self.image_token, [n * self.config.tokens_per_image for n in tiles])
            pix[i, :len(p)] = p
            expanded.append(ids)
            masks.append(np.asarray(m, bool))
        return expanded, pix, masks

    def logits(self, input_ids: Any, *, pixel_values: Any = None, workflow: str = "mm",
               image_tiles: Any = None) -> np.ndarray:
        """float32 logits `[B, T', V]` over the expanded sequence (left-padded when ragged)."""
        rows, pix, masks = self._prepare(input_ids, pixel_values, workflow, image_tiles)
        width = max(len(r) for r in rows)
        ids, att = left_pad(rows, width, 0)
        img = None
        if masks is not None:
            img = np.zeros_like(att, bool)
            for i, m in enumerate(masks):
                img[i, width - len(m):] = m
        key = (workflow, pix is None)
        if key not in self._forward:
            model = self._model

            def fwd(params: Any, ids: Any, att: Any, pix: Any, img: Any) -> Any:
                return model.apply(params, jnp.maximum(ids, 0) if pix is None else ids, positions_from_mask(att),
                                   pixel_values=pix, image_mask=img, workflow=workflow, segment_ids=att)[0]
            self._forward[key] = self.runtime.jit(fwd)
        ids, att, pix, img = self.runtime.inputs(ids, att, pix, img)
        return np.asarray(self._forward[key](self.params, ids, att, pix, img), np.float32)

    def generate(self, input_ids: Any, *, pixel_values: Any = None, workflow: str = "mm",
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] | None = None, seed: int = 0, image_tiles: Any = None) -> np.ndarray:
        """New tokens `[B, max_new_tokens]`; cached decoding in the chosen workflow."""
        rows, pix, masks = self._prepare(input_ids, pixel_values, workflow, image_tiles)
        if workflow not in self._generators:
            pad = self.config.lm.llm.pad_token_id
            self._generators[workflow] = self.runtime.generator(self._model.decode_fns(workflow),
                                                                0 if pad is None else pad)
        extra = {} if pix is None else {"pixel_values": pix, "image_mask": masks}
        llm_cfg = self.config.lm.llm
        stops = llm_cfg.eos_token_id if stop_tokens is None else tuple(stop_tokens)
        out, _ = self.runtime.generate(self._generators[workflow], self.params, rows, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops,
                                       seed=seed, extra=extra)
        return out


    def tile(self, images: Any) -> tuple[np.ndarray, list[int]]:
        """PIL images or paths -> (their tiles `[sum n_i, 3, T, T]` in order, n_i per image), cut as the model's
        training data was (`config.tiling`: CATTY tiles + thumbnail for POINTS, a padded square otherwise; the
        data pipeline's `ImageTiler`, CLIP normalisation, tiles of the tower's image size)."""
        from mm.data import images as img_lib
        from mm.data.pipeline import DataConfig, ImageTiler

        tiler = ImageTiler(DataConfig(tiling=self.config.tiling, tile=self.config.vision.image_size))
        tiles = []
        for im in images:
            pic = img_lib.to_rgb(im) if not isinstance(im, (str, Path)) else img_lib.load_image(str(im))
            tiles.append(tiler(pic)[0])
        return np.concatenate(tiles), [len(t) for t in tiles]

    def generate_text(self, prompt: str, images: Any = (), *, workflow: str = "mm", **kw: Any) -> str:
        """Text in (with `mm.data.conversations.IMAGE_PLACEHOLDER` where each image goes; without any, the images
        come first), images as PIL images or paths (tiled here, `tile`), generated text out (up to the first stop
        token; `generate`'s options in `kw`). Needs the checkpoint's tokenizer."""
        from mm.data.conversations import IMAGE_PLACEHOLDER

        if self.tokenizer is None:
            raise ValueError(f"{self.source}: no tokenizer files found next to the checkpoint")
        images = [images] if isinstance(images, (str, Path)) or hasattr(images, "size") else list(images)
        if images and IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER * len(images) + "\n" + prompt
        parts = prompt.split(IMAGE_PLACEHOLDER)
        ids = list(self.tokenizer(parts[0])["input_ids"])
        for part in parts[1:]:
            ids += [self.image_token] + list(self.tokenizer(part, add_special_tokens=False)["input_ids"])
        pix, tiles = self.tile(images) if images else (None, None)
        out = self.generate([ids], pixel_values=None if pix is None else [pix], workflow=workflow,
                            image_tiles=None if tiles is None else [tiles], **kw)[0]
        stops = set(self.config.lm.llm.eos_token_id if kw.get("stop_tokens") is None else kw["stop_tokens"])
        toks = []
        for t in out.tolist():
            if t in stops:
                break
            toks.append(t)
        return self.tokenizer.decode(toks, skip_special_tokens=True)


def _abstract(handle: str, config: Any) -> Any:
    from mm.models import vision

    return vision.abstract_params(config) if handle == "vision" else kinds.of(config).abstract_params()


def _load(path: Path, runtime: Runtime, vision: Any) -> Any:
    """Opens the directory through the family registry (which kind of checkpoint it is), configures the model
    with `runtime` and reads the params straight onto the mesh (no host copy of the whole model with one)."""
    from mm.convert import registry

    with registry.open_checkpoint(path, vision=vision) as opened:
        config = runtime.configure(opened.config)
        handle = opened.family.handle
        shardings = runtime.shardings(_abstract(handle, config))
        _, params = registry.load(opened, dtype=runtime.param_dtype, shardings=shardings)
    if opened.note:
        logging.warning("mm.from_pretrained(%s): %s", path, opened.note)
    src = str(path)
    if handle == "vision":
        return VisionHandle(config, params, src, runtime)
    tokenizer = _load_tokenizer(opened.tokenizer_dir)
    if handle == "vlm":
        return VLMHandle(config, params, tokenizer, src, vision_source=opened.note, runtime=runtime)
    return LLMHandle(config, params, tokenizer, runtime, src)
