"""Inner-Adaptor Architecture: multimodal branches plugged into a frozen LLM (DESIGN.md section 2).

Params: `{"base": <the LLM's params, untouched>, "<branch>": {...}, ...}`. A branch (`mm`, `g` for grounding)
has its own projector, embedding table (MM-EL), insertion layers `layers_{k}`, final `norm` and `lm_head`
(MM-LH); `init_branch_from_base` makes them copies of the base's parts (insertion layer k copies base layer
`positions[k]`), as the paper initialises them.

Workflows:
- `text`: `LLM.__call__` on `params["base"]` - the very function and params the plain LLM uses, so its output is
  bit-identical to the LLM's.
- a branch name: tokens embedded by the branch's MM-EL, image features (projected by the branch's projector)
  spliced at `image_mask`; after base layer i, if i is an insertion position, the branch's insertion layer
  takes the hidden state and its output replaces it (order L0 C0 L1 C1 L2 ... for IAA-14); the branch's norm
  and head give the logits.
Each workflow has its own KV cache (`init_cache(config, workflow, ...)`): in a branch the frozen layers see
modified states, so a text cache cannot be reused there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm.config import IAA_8, IAA_14, TEXT, BranchConfig, IAAConfig, LLMConfig, ProjectorConfig
from mm.models import llm, protocol
from mm.models.connectors import Projector
from mm.models.splice import image_span_ids, splice_image_features

Array = jax.Array

class Branch(nn.Module):
    """The trainable parts of one IAA branch."""

    llm_config: LLMConfig
    branch: BranchConfig

    def setup(self) -> None:
        c = self.llm_config
        self.projector = Projector(self.branch.projector)
        self.embed_tokens = llm.Embed(c.vocab_size, c.hidden_size, c.params_dtype)
        cls = llm.layer_class(c)
        self.layers_list = [cls(c, name=f"layers_{k}") for k in range(len(self.branch.positions))]
        self.norm = llm.RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.compute_dtype, param_dtype=c.params_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = llm.Dense(c.vocab_size, ("embed", "vocab"), dtype=c.compute_dtype,
                                      param_dtype=c.params_dtype)

    def project(self, image_features: Array) -> Array:
        return self.projector(image_features)

    def embed(self, ids: Array) -> Array:
        return self.embed_tokens(jnp.maximum(ids, 0)).astype(self.llm_config.compute_dtype)

    def layer(self, k: int, *args: Any) -> tuple[Array, Any]:
        return self.layers_list[k](*args)

    def head(self, x: Array) -> Array:
        x = self.norm(x)
        if self.llm_config.tie_word_embeddings:
            w = self.embed_tokens.embedding.astype(self.llm_config.compute_dtype)
            return jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)
        return self.lm_head(x).astype(jnp.float32)


class IAA(nn.Module):
    """Frozen base LLM + branches. `workflow` is static: "text" or a branch name."""

    config: IAAConfig

    def setup(self) -> None:
        self.base = llm.LLM(self.config.llm)
        self.branch_modules = {b.name: Branch(self.config.llm, b, name=b.name) for b in self.config.branches}

    def __call__(self, input_ids: Array, positions: Array | None = None, *, workflow: str = TEXT,
                 image_features: Array | None = None, image_mask: Array | None = None,
                 segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
                 cache: Any = None, cache_index: Array | None = None,
                 return_hidden: bool = False) -> tuple[Array, Any]:
        """Logits `[B, T, V]` (float32) and the workflow's updated cache; `return_hidden` gives the workflow's
        final-normed hidden states instead (for a loss that applies the head in chunks)."""
        if workflow == TEXT:
            return self.base(input_ids, positions, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                             cache=cache, cache_index=cache_index, return_hidden=return_hidden)
        branch = self.branch_modules[workflow]
        positions_list = self.config.branch(workflow).positions
        x = branch.embed(input_ids)
        if image_features is not None:
            x = splice_image_features(x, branch.project(image_features), image_mask)
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = self.base.rope(positions)
        bidir = None
        if self.config.bidirectional_image_attention and image_mask is not None:
            bidir = image_span_ids(image_mask)
        mask_args = llm.make_mask_args(segment_ids, kv_segment_ids, bidir)
        new_cache = None if cache is None else {"base": [], "branch": []}
        k = 0
        for i in range(self.config.llm.num_layers):
            x, lc = self.base.layer(i, x, cos, sin, mask_args, None if cache is None else cache["base"][i],
                                    cache_index)
            if cache is not None:
                new_cache["base"].append(lc)
            if k < len(positions_list) and positions_list[k] == i:
                x, lc = branch.layer(k, x, cos, sin, mask_args, None if cache is None else cache["branch"][k],
                                     cache_index)
                if cache is not None:
                    new_cache["branch"].append(lc)
                k += 1
        if return_hidden:
            return branch.norm(x), new_cache
        return branch.head(x), new_cache

    def init_all(self, input_ids: Array, image_features: Array) -> dict[str, Array]:
        """Touches every workflow (for `init` / `eval_shape`); image features cover the first positions."""
        mask = jnp.zeros(input_ids.shape, bool).at[:, : image_features.shape[1]].set(True)
        return {w: self(input_ids, workflow=w, image_features=None if w == TEXT else image_features,
                        image_mask=None if w == TEXT else mask)[0] for w in self.config.workflows}


# ----------------------------------------------------------------------------------------- params
def _dummy_inputs(config: IAAConfig) -> tuple[Array, Array]:
    proj = config.branches[0].projector
    return jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 2, proj.input_width), jnp.float32)


def abstract_params(config: IAAConfig) -> Any:
    """Boxed shapes of the whole IAA tree (logical axis names included), nothing allocated."""
    ids, feats = _dummy_inputs(config)
    return jax.eval_shape(lambda: IAA(config).init(jax.random.PRNGKey(0), ids, feats, method=IAA.init_all))["params"]


def branch_sources(config: IAAConfig, branch_name: str) -> dict[str, str]:
    """Which base subtree each copied part of a branch starts as (branch key -> base key): MM-EL, final norm and
    MM-LH copy the base's; insertion layer k copies base layer `positions[k]` (DESIGN.md section 2). The
    projector is the one part no base structure corresponds to. The one statement of the branch
    initialisation: `init_branch_from_base` and the trainer (which copies from whatever base a run loads)
    both follow it."""
    b = config.branch(branch_name)
    out = {"embed_tokens": "embed_tokens", "norm": "norm"}
    if not config.llm.tie_word_embeddings:
        out["lm_head"] = "lm_head"
    out.update({f"layers_{k}": f"layers_{pos}" for k, pos in enumerate(b.positions)})
    return out


def init_branch_from_base(config: IAAConfig, branch_name: str, base_params: Mapping[str, Any],
                          rng: Array) -> dict[str, Any]:
    """A branch whose MM-EL, insertion layers, norm and head are copies of the base's; projector random."""
    b = config.branch(branch_name)
    proj = Projector(b.projector).init(rng, jnp.zeros((1, 1, b.projector.input_width), jnp.float32))["params"]
    copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # noqa: E731 - own buffers
    out = {"projector": nn.unbox(proj)}
    out.update({k: copy(base_params[src]) for k, src in branch_sources(config, branch_name).items()})
    return out


def init_params(config: IAAConfig, base_params: Mapping[str, Any], rng: Array) -> dict[str, Any]:
    """Full IAA params around existing base params (kept as the same objects, never copied)."""
    params: dict[str, Any] = {"base": base_params}
    for b, key in zip(config.branches, jax.random.split(rng, len(config.branches))):
        params[b.name] = init_branch_from_base(config, b.name, base_params, key)
    return params


# ------------------------------------------------------------------------------------------ cache
def init_cache(config: IAAConfig, workflow: str, batch: int, max_len: int) -> Any:
    """The KV cache of one workflow: the LLM's for text, base + insertion layers for a branch."""
    base = llm.init_cache(config.llm, batch, max_len)
    if workflow == TEXT:
        return base
    n = len(config.branch(workflow).positions)
    return {"base": base, "branch": llm.init_cache(config.llm.replace(num_layers=n), batch, max_len)}


def decode_fns(config: IAAConfig, workflow: str) -> Any:
    """Prefill/step functions for `mm.generate.Generator`; image inputs go to prefill as `extra` kwargs."""
    return IAAKind(config).decode_fns(workflow)


def trainable_counts(config: IAAConfig) -> dict[str, int]:
    """Parameter counts per top-level group (`base` frozen; each branch trainable), from shapes only."""
    abstract = nn.unbox(abstract_params(config))
    return {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in abstract.items()}


def preset(name: str, llm_config: LLMConfig, vision_width: int, branches: Sequence[str] = ("mm", "g"),
           projector_type: str = "mlp2x_gelu") -> IAAConfig:
    """`iaa14` / `iaa8` on a given LLM (positions must fit its depth)."""
    positions = {"iaa14": IAA_14, "iaa8": IAA_8}[name]
    proj = ProjectorConfig(kind=projector_type, in_dim=vision_width, out_dim=llm_config.hidden_size)
    return IAAConfig(llm=llm_config, branches=tuple(BranchConfig(n, positions, proj) for n in branches))


# ------------------------------------------------------------------------------------- the kind
@dataclasses.dataclass(frozen=True)
class IAAKind(protocol.KindDefaults):
    """IAA as a `mm.models.protocol.ModelKind`: workflows "text" (the base LLM alone: image placeholders read as
    token 0 and image inputs are not used) and one per branch."""

    config: IAAConfig
    name = "iaa"
    base_prefix = "base"
    frozen = ("base",)

    @property
    def llm(self) -> LLMConfig:
        return self.config.llm

    @property
    def workflows(self) -> tuple[str, ...]:
        return self.config.workflows

    def trained_workflow(self, requested: str) -> str:
        return self.config.branch(requested).name

    def abstract_params(self) -> Any:
        return abstract_params(self.config)

    def init_params(self, rng: Array, llm_params: Any = None, vision_params: Any = None) -> Any:
        k1, k2, _ = jax.random.split(rng, 3)  # the third initialises a VLM's tower (`vlm.VLMKind`)
        return init_params(self.config, llm.init_params(self.llm, k1) if llm_params is None else llm_params, k2)

    def apply(self, params: Any, input_ids: Array, positions: Array | None = None, *, workflow: str,
              image_features: Array | None = None, image_mask: Array | None = None,
              pixel_values: Array | None = None, **kw: Any) -> tuple[Array, Any]:
        protocol.check_workflow(self, workflow)
        if pixel_values is not None:
            raise ValueError("iaa: pixel_values need the tower (a VLM); pass image_features")
        if workflow == TEXT:
            return IAA(self.config).apply({"params": params}, jnp.maximum(input_ids, 0), positions, workflow=TEXT,
                                          **kw)
        return IAA(self.config).apply({"params": params}, input_ids, positions, workflow=workflow,
                                      image_features=image_features, image_mask=image_mask, **kw)

    def head_params(self, params: Any, workflow: str) -> Any:
        return params["base"] if workflow == TEXT else params[workflow]

    def init_cache(self, workflow: str, batch: int, max_len: int) -> Any:
        return init_cache(self.config, workflow, batch, max_len)

    def stages(self, seq_len: int, workflow: str) -> list[protocol.Stage]:
        """The base layers and, in a branch, its projector, MM-EL, insertion layers and MM-LH."""
        c = self.llm
        if workflow == TEXT:
            return protocol.llm_stages("base", c, seq_len)
        b = self.config.branch(workflow)
        positions = list(b.positions)
        out = protocol.projector_stages(f"{workflow}/projector", b.projector) + [protocol.embed_stage(workflow)]
        for i in range(c.num_layers):
            out += protocol.layer_stages(f"base/layers_{i}", c, seq_len)
            if i in positions:
                out += protocol.layer_stages(f"{workflow}/layers_{positions.index(i)}", c, seq_len)
        return out + [protocol.head_stage(workflow, c)]

    def derived(self) -> dict[str, str]:
        return {f"{b.name}/{k}": f"base/{src}" for b in self.config.branches
                for k, src in branch_sources(self.config, b.name).items()}
