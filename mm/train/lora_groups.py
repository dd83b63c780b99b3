"""LoRA param-group rules -> adapters on the trainer's model (`mm.models.lora` holds the math).

`attach` asks the model which kernels can carry an adapter (its abstract params built under
`lora.candidates()`), matches `param_groups` against the model's params, and returns the model with, for each
kernel whose first matching rule is a LoRA rule, `lora_a` / `lora_b` / `lora_scale` leaves next to it:
  - abstract params boxed with the kernel's logical axes (the rank axis `lora_rank`, unsharded), so adapters
    shard like their kernel;
  - an init giving PEFT's start: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform, a = sqrt(5)), B = 0
    (the adapted model equals the base exactly), the scale alpha / r (alpha / sqrt(r) with rsLoRA);
  - FLOPs stages that know an adapted weight's stage has trainable params (activation gradients flow from it).
A LoRA rule that matches a kernel no adapter can act on (the LM head, whose kernel the chunked loss reads
directly; patch embeddings) is a ConfigError naming it, as is one that adapts an IAA model's base layers
(the text workflow runs them and must stay the base LLM bit for bit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm.config import ConfigError
from mm import lora_params
from mm.train import param_groups as pg


def _flat_boxed(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {pg.path_str(p): v for p, v in leaves}


@dataclasses.dataclass(frozen=True)
class Adapter:
    kernel: str  # '/'-joined kernel path
    spec: pg.LoraSpec
    n_stack: int  # leading stacked-layer dims (nn.scan)
    a: Any  # boxed abstract leaves
    b: Any
    scale: Any

    @property
    def prefix(self) -> str:
        return self.kernel[: -len("kernel")]


def plan(model: Any, candidates_abstract: Any, rules: Any) -> list[Adapter]:
    """The adapters `rules` ask for on `model` (a `mm.train.models.TrainModel`)."""
    flat = _flat_boxed(model.abstract)
    cand = _flat_boxed(candidates_abstract)
    group_of = pg.first_match(list(flat), rules)
    out, not_adaptable = [], []
    for path, i in group_of.items():
        spec = pg.lora_spec(rules[i][1], f"param_groups[{i}]")
        if spec is None or not path.endswith("/kernel"):
            continue
        prefix = path[: -len("kernel")]
        if prefix + lora_params.A not in cand:
            not_adaptable.append(path)
            continue
        if model.kind == "iaa" and path.startswith(model.base_prefix + "/"):
            raise ConfigError(f"param_groups[{i}] ({rules[i][0]!r}) puts LoRA on {path}: an IAA model's base layers "
                              "run the text workflow, which must stay the base LLM; adapt the branch's insertion "
                              "layers (e.g. 'mm/layers_\\d+/.*')")
        k, ca, cb = flat[path], cand[prefix + lora_params.A], cand[prefix + lora_params.B]
        n_stack, _, _ = lora_params.split_dims(len(k.value.shape), len(ca.value.shape), len(cb.value.shape))
        r = spec.rank
        a_shape = ca.value.shape[:-1] + (r,)
        b_shape = cb.value.shape[:n_stack] + (r,) + cb.value.shape[n_stack + 1:]
        f32 = jnp.float32
        out.append(Adapter(path, spec, n_stack, ca.replace_boxed(jax.ShapeDtypeStruct(a_shape, f32)),
                           cb.replace_boxed(jax.ShapeDtypeStruct(b_shape, f32)),
                           cand[prefix + lora_params.SCALE].replace_boxed(
                               jax.ShapeDtypeStruct(k.value.shape[:n_stack], f32))))
    if not_adaptable:
        raise ConfigError(f"param_groups: a LoRA rule matches kernels no adapter can act on: {not_adaptable[:5]} "
                          "(adaptable: attention / MLP projections of the LLM, IAA insertion layers and the ViT, "
                          "projector layers; not the LM head)")
    if not out:
        raise ConfigError("param_groups: a LoRA rule matches no kernel of this model")
    return out


def init_adapters(adapters: list[Adapter], rng: jax.Array) -> dict[str, jax.Array]:
    """Flat adapter leaves at PEFT's start (see the module docstring)."""
    out = {}
    for ad, key in zip(adapters, jax.random.split(rng, len(adapters))):
        shape = ad.a.value.shape
        fan_in = math.prod(shape[ad.n_stack:-1])
        bound = 1.0 / math.sqrt(fan_in)
        out[ad.prefix + lora_params.A] = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        out[ad.prefix + lora_params.B] = jnp.zeros(ad.b.value.shape, jnp.float32)
        s = lora_params.scale(ad.spec.rank, ad.spec.alpha, ad.spec.rslora)
        out[ad.prefix + lora_params.SCALE] = jnp.full(ad.scale.value.shape, s, jnp.float32)
    return out


def _stages(stages: Callable[[int], list[Any]], adapters: list[Adapter]) -> Callable[[int], list[Any]]:
    by_kernel = {ad.kernel: (ad.prefix + lora_params.A, ad.prefix + lora_params.B) for ad in adapters}

    def adapted(seq_len: int) -> list[Any]:

        out = []
        for s in stages(seq_len):
            extra = tuple(p for w in s.weights for p in by_kernel.get(w, by_kernel.get(pg.scanned_name(w), ())))
            out.append(dataclasses.replace(s, touches=s.touches + extra) if extra else s)
        return out

    return adapted


def attach(model: Any, candidates_abstract: Any, rules: Any) -> Any:
    """`model` with the adapters `rules` ask for (see the module docstring)."""
    adapters = plan(model, candidates_abstract, rules)
    flat = _flat_boxed(model.abstract)
    for ad in adapters:
        flat.update({ad.prefix + lora_params.A: ad.a, ad.prefix + lora_params.B: ad.b,
                     ad.prefix + lora_params.SCALE: ad.scale})
    base_init = model.init

    def init(rng: jax.Array) -> Any:  # the base from `rng` itself: the same random base as without LoRA
        return pg.unflatten({**pg.flatten(base_init(rng)), **init_adapters(adapters, jax.random.fold_in(rng, 0x10DA))})

    return dataclasses.replace(model, abstract=pg.unflatten(flat), init=init, stages=_stages(model.stages, adapters),
                               adapters=tuple(adapters))
