"""Frozen model configs, built from HF `config.json` dicts or ConfigDicts, and written back.

One dataclass per model family concept. `LLMConfig` covers the Llama family (Llama 2, 3, 3.1 with
`llama3` RoPE scaling) and Qwen2 (q/k/v biases, optional tied embeddings): they differ only in fields.
`VisionConfig` the CLIP / SigLIP towers; `ProjectorConfig` the vision -> LLM connectors; `LLaVAConfig`,
`IAAConfig` (its `BranchConfig`s) the LLM-side models; `VLMConfig` a tower + one of those. They live here,
not beside the Flax modules, so checkpoint code (`mm.convert`) reads and writes configs without model code.
Numerics (`dtype`, `param_dtype`), layer scanning and rematerialisation are run-time options that live in
the same config so a Flax module needs nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax.numpy as jnp

SUPPORTED_LLM_TYPES = ("llama", "qwen2")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key (and file, when there is one)."""


def unknown_key_error(key: str, parent: str, name: str, known: Iterable[str]) -> ConfigError:
    """The error for a config key that does not exist: `key` as written, whose part `name` is not among the
    keys `known` of the section `parent` ("" = top level). Names the closest valid keys (difflib), or all of
    the section's keys when none is close: "unknown config key 'train.setps' (did you mean: train.steps?)"."""
    known = sorted(str(k) for k in known)
    near = difflib.get_close_matches(name, known, n=3)
    dotted = ", ".join(f"{parent}.{k}" if parent else k for k in (near or known))
    if near:
        return ConfigError(f"unknown config key {key!r} (did you mean: {dotted}?)")
    where = f"in {parent}" if parent else "at the top"
    return ConfigError(f"unknown config key {key!r} (valid keys {where}: {dotted})")


class _Numerics:
    """What every model config shares: `dtype` (compute) and `param_dtype` names, checked and as jnp dtypes,
    and `replace`. Subclasses are frozen dataclasses with those two fields."""

    dtype: str
    param_dtype: str

    def _check_dtypes(self) -> None:
        for key in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, key))
            except TypeError as e:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not a dtype") from e

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style (`rope_type="llama3"`) frequency scaling; `None` on the LLM config means plain RoPE."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class LLMConfig(_Numerics):
    """A decoder-only LLM of the Llama / Qwen2 kind."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2: True)
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # Run-time options (not part of the HF config).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None  # None: the dispatcher picks per backend

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_LLM_TYPES:
            raise ConfigError(f"model_type={self.model_type!r}: supported are {SUPPORTED_LLM_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}: choose one of {REMAT_POLICIES}")
        self._check_dtypes()

    # ----------------------------------------------------------------------------------------- HF
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json", **runtime: Any) -> "LLMConfig":
        """Reads an HF `LlamaConfig` / `Qwen2Config` dict; unsupported features stop with a named error."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_LLM_TYPES:
            raise ConfigError(f"{source}: model_type={model_type!r}; mm converts {SUPPORTED_LLM_TYPES}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d.get('hidden_act')!r}; only 'silu' (SwiGLU) is supported")
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        rope_params = d.get("rope_parameters") or {}
        rope_scaling_d = d.get("rope_scaling") or rope_params
        rope_type = (rope_scaling_d or {}).get("rope_type", (rope_scaling_d or {}).get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope_scaling_d["factor"]),
                low_freq_factor=float(rope_scaling_d["low_freq_factor"]),
                high_freq_factor=float(rope_scaling_d["high_freq_factor"]),
                original_max_position_embeddings=int(rope_scaling_d["original_max_position_embeddings"]),
            )
        elif rope_type not in (None, "default"):
            raise ConfigError(f"{source}: rope_type={rope_type!r} is not supported (default, llama3)")
        theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        n_heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // n_heads
        if model_type == "qwen2":
            if d.get("use_sliding_window"):
                raise ConfigError(f"{source}: use_sliding_window=true is not supported")
            attention_bias = True
        else:
            attention_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        eos_t = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=d.get("pad_token_id"),
            **runtime,
        )

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """An HF config dict that `AutoConfig` reads back into an equivalent config."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
            "dtype": torch_dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            d["head_dim"] = self.head_dim
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        else:
            d["use_sliding_window"] = False
        return d

    # ------------------------------------------------------------------------------------ mm files
    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any], source: str = "mm config") -> "LLMConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_id"] = tuple(d.get("eos_token_id", ()))
        return cls(**d)


def read_json(path: str | Path) -> dict[str, Any]:
    """Reads a JSON file (a local path or a URI), naming the file on failure."""
    from mm.paths import as_path

    path = as_path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e


def load_config_file(spec: str) -> Any:
    """Loads `path/to/config.py[:arg]` the way `--config=` does: calls its `get_config(arg)`, locks the result.
    A missing file, or an `arg` the file rejects (ValueError: unknown stage / preset), is a ConfigError.

    A locked ConfigDict turns a misspelt key into an error at the place it is set, before any work starts.
    """
    import importlib.util

    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    module_spec = importlib.util.spec_from_file_location(f"_mm_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg)")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # config files raise ValueError for an unknown stage / preset / variant
        named = str(e).partition(":")[0].endswith(Path(path).name)  # the file's own message names it
        raise ConfigError(str(e) if named else f"{spec}: {e}") from e
    cfg.lock()
    return cfg


# ------------------------------------------------------------------------------------------ vision
SUPPORTED_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new")
_VISION_PARENT_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


@dataclasses.dataclass(frozen=True)
class VisionConfig(_Numerics):
    """A ViT image encoder of the CLIP kind (class token, pre-layernorm) or SigLIP kind (no class token,
    post-layernorm, optional attention-pooling head). Any image size, patch size and depth."""

    model_type: str = "clip_vision_model"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_head: bool = False  # SigLIP attention-pooling head (pooler_output only; features never use it)
    # Run-time options (not part of the HF config).
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_VISION_TYPES:
            raise ConfigError(f"model_type={self.model_type!r}: supported are {SUPPORTED_VISION_TYPES}")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r}: supported are {VISION_ACTIVATIONS}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.patch_size <= 0 or self.image_size < self.patch_size:
            raise ConfigError(f"image_size={self.image_size} / patch_size={self.patch_size}: need 0 < patch <= image")
        if self.use_head and self.model_type != "siglip_vision_model":
            raise ConfigError("use_head=True is only defined for siglip_vision_model")
        self._check_dtypes()

    @property
    def has_class_token(self) -> bool:
        return self.model_type == "clip_vision_model"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at the checkpoint's resolution."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + (1 if self.has_class_token else 0)

    # ----------------------------------------------------------------------------------------- HF
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json", **runtime: Any) -> "VisionConfig":
        """Reads a `CLIPVisionConfig` / `SiglipVisionConfig` dict, or the `vision_config` of a full
        `CLIPConfig` / `SiglipConfig` (model_type clip / siglip)."""
        model_type = d.get("model_type")
        if model_type in _VISION_PARENT_TYPES:
            if not isinstance(d.get("vision_config"), Mapping):
                raise ConfigError(f"{source}: model_type={model_type!r} without a vision_config")
            d = dict(d["vision_config"], model_type=_VISION_PARENT_TYPES[model_type])
            model_type = d["model_type"]
        if model_type not in SUPPORTED_VISION_TYPES:
            raise ConfigError(f"{source}: model_type={model_type!r}; mm converts {SUPPORTED_VISION_TYPES} "
                              f"and the vision towers of {tuple(_VISION_PARENT_TYPES)}")
        siglip = model_type == "siglip_vision_model"
        defaults = ({"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 16}
                    if siglip else {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "image_size": 224,
                                    "patch_size": 32})
        try:
            return cls(
                model_type=model_type,
                hidden_size=int(d.get("hidden_size", 768)),
                intermediate_size=int(d.get("intermediate_size", 3072)),
                num_layers=int(d.get("num_hidden_layers", 12)),
                num_heads=int(d.get("num_attention_heads", 12)),
                image_size=int(d.get("image_size", defaults["image_size"])),
                patch_size=int(d.get("patch_size", defaults["patch_size"])),
                num_channels=int(d.get("num_channels", 3)),
                hidden_act=str(d.get("hidden_act", defaults["hidden_act"])),
                layer_norm_eps=float(d.get("layer_norm_eps", defaults["layer_norm_eps"])),
                use_head=bool(d.get("vision_use_head", True)) if siglip else False,
                **runtime,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A `CLIPVisionConfig` / `SiglipVisionConfig` dict that `AutoConfig` reads back."""
        siglip = self.model_type == "siglip_vision_model"
        d: dict[str, Any] = {
            "architectures": ["SiglipVisionModel" if siglip else "CLIPVisionModel"],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
            "dtype": torch_dtype,
        }
        if siglip:
            d["vision_use_head"] = self.use_head
        return d

    # ------------------------------------------------------------------------------------ mm files
    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any], source: str = "mm config") -> "VisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}")
        return cls(**dict(d))


# ------------------------------------------------------------------------------ multimodal models
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Projector from the vision width `in_dim` to the LLM width `out_dim` (IAA release: mlp2x_gelu 1024->4096)."""

    kind: str = "mlp2x_gelu"
    in_dim: int = 1024
    out_dim: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"
    # POINTS' shared projector over several feature sources (general + OCR ViT): the input holds the sources side
    # by side on its last axis (`len(merge) * in_dim`), each is projected by the same weights and the results are
    # merged as `sum(merge[i] * projected_i)`; () = one source, no merge
    merge: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.merge) == 1 or any(not 0.0 <= w <= 1.0 for w in self.merge):
            raise ConfigError(f"projector.merge={self.merge}: () or one weight in [0, 1] per feature source (>= 2)")
        if self.kind not in ("linear", "identity") and not _MLP.match(self.kind):
            raise ConfigError(f"projector.kind={self.kind!r}: choose linear, identity or mlp<N>x_gelu")
        if _MLP.match(self.kind) and int(_MLP.match(self.kind).group(1)) < 1:
            raise ConfigError(f"projector.kind={self.kind!r}: depth must be >= 1")
        if self.kind == "identity" and self.in_dim != self.out_dim:
            raise ConfigError(f"projector.kind='identity' needs in_dim == out_dim, got {self.in_dim}, {self.out_dim}")

    @property
    def sources(self) -> int:
        """Feature sources the input holds side by side (`merge`)."""
        return max(1, len(self.merge))

    @property
    def input_width(self) -> int:
        """The width of the features the projector takes: `in_dim` per source."""
        return self.in_dim * self.sources

    @property
    def depth(self) -> int:
        """Number of Linear layers."""
        if self.kind == "identity":
            return 0
        if self.kind == "linear":
            return 1
        return int(_MLP.match(self.kind).group(1))

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.merge:  # one source: the files of single-tower models stay as they were
            del d["merge"]
        else:
            d["merge"] = list(self.merge)
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], source: str = "projector") -> "ProjectorConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}")
        return cls(**{**d, "merge": tuple(d.get("merge", ()))})


@dataclasses.dataclass(frozen=True)
class LLaVAConfig:
    llm: LLMConfig = LLMConfig()
    projector: ProjectorConfig = ProjectorConfig()
    bidirectional_image_attention: bool = False

    def __post_init__(self) -> None:
        if self.projector.out_dim != self.llm.hidden_size:
            raise ConfigError(f"llava.projector.out_dim={self.projector.out_dim} != "
                              f"llm.hidden_size={self.llm.hidden_size}")


IAA_14 = (0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31)
# IAA-8 positions are not published (DESIGN.md: choice). Same pattern as IAA-14 - pairs of adjacent layers -
# spread evenly over the 32 layers of Llama-3-8B.
IAA_8 = (0, 1, 10, 11, 20, 21, 30, 31)
TEXT = "text"
# The image placeholder (DESIGN.md section 2): the token a prompt carries per image, and the id image positions
# hold in `input_ids` until the features are spliced there. (LLaVA JSON data marks images with `<image>` in its
# text instead: `mm.data.conversations.IMAGE_PLACEHOLDER`.)
IMAGE_TOKEN = "<|reserved_special_token_44|>"
IMAGE_TOKEN_ID = -200


@dataclasses.dataclass(frozen=True)
class BranchConfig:
    """One plug-in branch: where its insertion layers go and how image features reach its width."""

    name: str = "mm"
    positions: tuple[int, ...] = IAA_14
    projector: ProjectorConfig = ProjectorConfig()


@dataclasses.dataclass(frozen=True)
class IAAConfig:
    llm: LLMConfig = LLMConfig()
    branches: tuple[BranchConfig, ...] = (BranchConfig("mm"), BranchConfig("g"))
    bidirectional_image_attention: bool = False  # off as in the original

    def __post_init__(self) -> None:
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names) or TEXT in names:
            raise ConfigError(f"iaa.branches: names must be unique and not {TEXT!r}, got {names}")
        for b in self.branches:
            bad = [p for p in b.positions if not 0 <= p < self.llm.num_layers]
            if bad or list(b.positions) != sorted(set(b.positions)):
                raise ConfigError(f"iaa.branches[{b.name}].positions={b.positions}: must be increasing and "
                                  f"within [0, {self.llm.num_layers})")
            if b.projector.out_dim != self.llm.hidden_size:
                raise ConfigError(f"iaa.branches[{b.name}].projector.out_dim={b.projector.out_dim} != "
                                  f"llm.hidden_size={self.llm.hidden_size}")
        if self.llm.scan_layers:
            raise ConfigError("iaa: llm.scan_layers must be False (insertion layers interleave the frozen ones)")

    def branch(self, name: str) -> BranchConfig:
        for b in self.branches:
            if b.name == name:
                return b
        raise ConfigError(f"iaa: no branch {name!r}; have {[b.name for b in self.branches]}")

    @property
    def workflows(self) -> tuple[str, ...]:
        return (TEXT,) + tuple(b.name for b in self.branches)


# what makes two ViTs "the same architecture" for POINTS' dual encoder (their features share one projector)
TOWER_ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
                     "patch_size", "num_channels")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """A ViT tower (`vision`) in front of an IAA / LLaVA-style LM side; POINTS (DESIGN.md section 4) adds an
    OCR tower of the same architecture (`ocr_vision`, params `ocr_vision/`) and pixel shuffle. With two towers
    the projector's `merge` holds (w, 1 - w): both towers' features go through the one projector and are merged
    `w * general + (1 - w) * ocr` after it."""

    vision: VisionConfig = VisionConfig()
    lm: IAAConfig | LLaVAConfig = LLaVAConfig()
    feature_layer: int = -2  # penultimate layer, as LLaVA and IAA
    feature: str = "patch"  # "patch" drops CLIP's class token, "cls_patch" keeps it
    image_token_id: int = IMAGE_TOKEN_ID
    ocr_vision: VisionConfig | None = None  # POINTS' OCR ViT; None: one tower
    pixel_shuffle: bool = False  # 2x2 patch neighbourhoods on channels: a quarter of the tokens, 4x the width
    # how a handle cuts an image into tiles of the tower's size (`mm.data.pipeline.ImageTiler`, as training did):
    # "square" (padded to a square, one tile) or "catty" (POINTS: CATTY tiles + thumbnail)
    tiling: str = "square"

    def __post_init__(self) -> None:
        if self.tiling not in ("square", "catty"):
            raise ConfigError(f"vlm.tiling={self.tiling!r}: 'square' or 'catty'")
        projectors = [b.projector for b in self.lm.branches] if isinstance(self.lm, IAAConfig) else [self.lm.projector]
        width = self.vision.hidden_size * (4 if self.pixel_shuffle else 1)
        widths = [p.in_dim for p in projectors]
        if any(w != width for w in widths):
            raise ConfigError(f"projector in_dim {widths} != vision.hidden_size {self.vision.hidden_size}"
                              + (" x 4 (pixel shuffle)" if self.pixel_shuffle else ""))
        towers = 1 if self.ocr_vision is None else 2
        if any(p.sources != towers for p in projectors):
            raise ConfigError(f"projector merge {[p.merge for p in projectors]}: {towers} tower(s) need "
                              f"{'() (one source)' if towers == 1 else '(w, 1 - w)'}")
        if self.ocr_vision is not None:
            diff = [f for f in TOWER_ARCH_FIELDS if getattr(self.ocr_vision, f) != getattr(self.vision, f)]
            if diff:
                raise ConfigError(f"ocr_vision differs from vision in {diff}: the dual encoder needs one architecture")
        if self.pixel_shuffle:
            grid = self.vision.image_size // self.vision.patch_size
            if self.feature != "patch" or grid % 2:
                raise ConfigError(f"pixel_shuffle needs feature='patch' and an even patch grid (got "
                                  f"{self.feature!r}, {grid}x{grid})")

    @property
    def is_iaa(self) -> bool:
        return isinstance(self.lm, IAAConfig)

    @property
    def towers(self) -> tuple[tuple[str, VisionConfig], ...]:
        """(param subtree, config) of each ViT, in the order their features sit side by side."""
        return (("vision", self.vision),) + (() if self.ocr_vision is None else (("ocr_vision", self.ocr_vision),))

    @property
    def tokens_per_image(self) -> int:
        """Image positions per image (or tile): its patches, a quarter of them with pixel shuffle."""
        n = (self.vision.image_size // self.vision.patch_size) ** 2
        if self.pixel_shuffle:
            return n // 4
        return n + (1 if self.feature == "cls_patch" else 0)

    @property
    def workflows(self) -> tuple[str, ...]:
        return self.lm.workflows if self.is_iaa else ("mm",)


def vlm_with_runtime(config: VLMConfig, **options: Any) -> VLMConfig:
    """The config with run-time options (`dtype`, `param_dtype`, `attention_impl`) set in every sub-config
    that has them: the tower, the LLM and each projector (projectors have no attention)."""
    proj_opts = {k: v for k, v in options.items() if k != "attention_impl"}
    lm = config.lm
    if config.is_iaa:
        lm = dataclasses.replace(lm, llm=lm.llm.replace(**options), branches=tuple(
            dataclasses.replace(b, projector=dataclasses.replace(b.projector, **proj_opts)) for b in lm.branches))
    else:
        lm = dataclasses.replace(lm, llm=lm.llm.replace(**options),
                                 projector=dataclasses.replace(lm.projector, **proj_opts))
    ocr = None if config.ocr_vision is None else config.ocr_vision.replace(**options)
    return dataclasses.replace(config, vision=config.vision.replace(**options), lm=lm, ocr_vision=ocr)


def vlm_config_to_json(config: VLMConfig) -> dict[str, Any]:
    """A JSON-able dict that `vlm_config_from_json` reads back into an equal config."""
    lm = config.lm
    if config.is_iaa:
        lm_d = {"kind": "iaa", "llm": lm.llm.to_json_dict(),
                "branches": [{"name": b.name, "positions": list(b.positions), "projector": b.projector.to_json_dict()}
                             for b in lm.branches],
                "bidirectional_image_attention": lm.bidirectional_image_attention}
    else:
        lm_d = {"kind": "llava", "llm": lm.llm.to_json_dict(), "projector": lm.projector.to_json_dict(),
                "bidirectional_image_attention": lm.bidirectional_image_attention}
    out = {"vision": config.vision.to_json_dict(), "lm": lm_d, "feature_layer": config.feature_layer,
           "feature": config.feature, "image_token_id": config.image_token_id, "pixel_shuffle": config.pixel_shuffle,
           "tiling": config.tiling}
    if config.ocr_vision is not None:
        out["ocr_vision"] = config.ocr_vision.to_json_dict()
    return out


def vlm_config_from_json(d: dict[str, Any], source: str = "vlm config") -> VLMConfig:
    lm_d = d["lm"]
    llm_cfg = LLMConfig.from_json_dict(lm_d["llm"], source=f"{source}: lm.llm")
    if lm_d["kind"] == "iaa":
        branches = tuple(BranchConfig(b["name"], tuple(b["positions"]),
                                          ProjectorConfig.from_json_dict(b["projector"], f"{source}: projector"))
                         for b in lm_d["branches"])
        lm = IAAConfig(llm=llm_cfg, branches=branches,
                       bidirectional_image_attention=lm_d.get("bidirectional_image_attention", False))
    elif lm_d["kind"] == "llava":
        lm = LLaVAConfig(llm=llm_cfg, projector=ProjectorConfig.from_json_dict(lm_d["projector"], source),
                         bidirectional_image_attention=lm_d.get("bidirectional_image_attention", False))
    else:
        raise ConfigError(f"{source}: lm.kind={lm_d['kind']!r}; choose iaa or llava")
    return VLMConfig(vision=VisionConfig.from_json_dict(d["vision"], source=f"{source}: vision"), lm=lm,
                     feature_layer=int(d["feature_layer"]), feature=d["feature"],
                     image_token_id=int(d["image_token_id"]), pixel_shuffle=bool(d.get("pixel_shuffle", False)),
                     tiling=str(d.get("tiling", "square")),
                     ocr_vision=None if d.get("ocr_vision") is None else VisionConfig.from_json_dict(
                         d["ocr_vision"], source=f"{source}: ocr_vision"))
