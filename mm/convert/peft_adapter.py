"""LoRA adapters <-> HF PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`).

PEFT stores, per adapted HF module `M` (e.g. `model.layers.0.self_attn.q_proj`), `base_model.model.M.lora_A.weight`
`[r, in]` and `base_model.model.M.lora_B.weight` `[out, r]`, and computes `W x + (alpha / r) B A x`. mm's
adapters (`mm.lora_params`) are `A [in.., r]`, `B [r, out..]` next to a kernel `[in.., out..]`; the family's
name map (`mm.checkpoints.name_map`) gives each kernel's HF module. The conversion is exact (a reshape and a
transpose), and it is checked per module: the kernel's own transform must map `[in.., out..]` to `[out, in]`
by that same reshape + transpose, or the module is refused by name.

Written config: `peft_type` LORA, `r` / `lora_alpha` / `use_rslora` (the most common; `rank_pattern` /
`alpha_pattern` name the modules that differ), `target_modules` (the short names when every module of that
name is adapted, else the full module names), `lora_dropout` 0, `bias` "none", `task_type`. Read configs
with DoRA, `fan_in_fan_out`, trained biases or `modules_to_save` are refused: mm's adapters have none of them.
"""

from __future__ import annotations

import collections
import functools
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mm.checkpoints.errors import ConversionError
from mm import lora_params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _module(entry: Any) -> str:
    if not entry.hf_name.endswith(".weight"):
        raise ConversionError(f"{entry.hf_name}: not a module weight; no PEFT adapter can act on it")
    return entry.hf_name[: -len(".weight")]


def _check_layout(entry: Any, n_in: int) -> None:
    """The kernel's HF weight must be its `[in.., out..]` array flattened to `[in, out]` and transposed."""
    if not _is_transposed(entry.transform, entry.mm_shape, n_in):
        raise ConversionError(f"{entry.hf_name}: its weight is not the kernel transposed ({entry.transform!r}); "
                              "its adapter cannot be exchanged with PEFT")


@functools.lru_cache(maxsize=64)
def _is_transposed(transform: Any, shape: tuple[int, ...], n_in: int) -> bool:
    """Probed once per layout (every layer's q_proj shares one): an index array through the transform."""
    probe = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    return bool(np.array_equal(transform.to_hf(probe), probe.reshape(int(np.prod(shape[:n_in])), -1).T))


def _adapted(flat: Mapping[str, Any], name_map: Any, mm_prefix: str) -> list[tuple[str, Any, int]]:
    """(mm adapter prefix 'a/b/', name-map entry, n_in) of every adapter in `flat` under `mm_prefix`."""
    p = f"{mm_prefix}/" if mm_prefix else ""
    out = []
    for k in flat:
        if not (k.endswith("/" + lora_params.A) and k.startswith(p)):
            continue
        base = k[: -len(lora_params.A)]
        a, b = np.shape(flat[k]), np.shape(flat[base + lora_params.B])
        try:
            entry = name_map.entry_for_mm(tuple((base[len(p):] + "kernel").split("/")))
        except (ConversionError, KeyError) as e:
            raise ConversionError(f"{base}kernel: no HF module for this adapter ({e})") from e
        n_stack, n_in, _ = lora_params.split_dims(len(np.shape(flat[base + "kernel"])), len(a), len(b))
        if n_stack:
            raise ConversionError(f"{k}: stacked (scanned) layers; export from the per-layer layout")
        out.append((base, entry, n_in))
    return out


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def write_peft(dst: str | Path, flat: Mapping[str, Any], name_map: Any, *, mm_prefix: str = "",
               base_model: str = "", task_type: str = "CAUSAL_LM", overwrite: bool = False) -> Path:
    """Writes the adapters of flat params `flat` (mm paths; those under `mm_prefix`, the name map's root) as a
    PEFT adapter directory `dst`, atomically. Returns `dst`."""
    from safetensors.numpy import save_file

    from mm.checkpoints.staging import staged_output

    adapted = _adapted(flat, name_map, mm_prefix)
    if not adapted:
        raise ConversionError("no LoRA adapters to write (the run trained none)")
    tensors, ranks, alphas = {}, {}, {}
    for base, entry, n_in in adapted:
        _check_layout(entry, n_in)
        a, b = np.asarray(flat[base + lora_params.A], np.float32), np.asarray(flat[base + lora_params.B], np.float32)
        s = float(np.asarray(flat[base + lora_params.SCALE]))
        r = a.shape[-1]
        m = _module(entry)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        ranks[m] = r
        alphas[m] = s * r  # alpha / r = s; rsLoRA is written as an equivalent plain alpha (s * r)
    r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
    a0 = collections.Counter(alphas.values()).most_common(1)[0][0]
    all_modules = {_module(e) for e in name_map.entries if e.hf_name.endswith(".weight")}
    short = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    everywhere = all({m for m in all_modules if m.rsplit(".", 1)[-1] == s} <= set(ranks) for s in short)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": str(base_model),
        "r": r0, "lora_alpha": a0, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "target_modules": short if everywhere else sorted(ranks),
        "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != a0},
        "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "layers_to_transform": None, "revision": None,
    }
    with staged_output(dst, overwrite) as stage:
        save_file(tensors, str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(dst)


def read_config(src: str | Path) -> dict[str, Any]:
    path = Path(src) / CONFIG_FILE
    if not path.exists():
        raise ConversionError(f"{src}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not JSON ({e})") from e
    bad = {"peft_type": cfg.get("peft_type", "LORA") != "LORA", "use_dora": bool(cfg.get("use_dora")),
           "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")), "bias": cfg.get("bias", "none") != "none",
           "modules_to_save": bool(cfg.get("modules_to_save"))}
    for key, is_bad in bad.items():
        if is_bad:
            raise ConversionError(f"{path}: {key} = {cfg.get(key)!r} is not supported (plain LoRA on linear "
                                  "weights only)")
    return cfg


def read_peft(src: str | Path, name_map: Any, candidates: Mapping[str, Any], *, mm_prefix: str = ""
              ) -> dict[str, np.ndarray]:
    """Flat mm adapter leaves (`lora_a`, `lora_b`, `lora_scale` under `mm_prefix`) of the PEFT adapter dir
    `src`. `candidates`: the model's flat abstract params built under `mm.models.lora.candidates()` (rank-1
    adapters on every adaptable kernel, for the in / out split)."""
    from safetensors.numpy import load_file

    cfg = read_config(src)
    wfile = Path(src) / WEIGHTS_FILE
    if not wfile.exists():
        raise ConversionError(f"{src}: no {WEIGHTS_FILE}")
    tensors = load_file(str(wfile))
    p = f"{mm_prefix}/" if mm_prefix else ""
    by_module = {}
    for e in name_map.entries:
        if e.hf_name.endswith(".weight"):
            by_module[_module(e)] = e
    out: dict[str, np.ndarray] = {}
    seen = set()
    for key in sorted(tensors):
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ConversionError(f"{wfile}: tensor {key!r} is not a LoRA A / B weight")
        module = m.group(1)
        if module in seen:
            continue
        seen.add(module)
        if module not in by_module:
            raise ConversionError(f"{wfile}: {key!r}: the base model has no module {module!r}")
        entry = by_module[module]
        base = p + "/".join(entry.mm_path[:-1]) + "/"
        if base + lora_params.A not in candidates:
            raise ConversionError(f"{wfile}: {module!r} ({base}kernel) cannot carry an adapter in mm")
        ca = candidates[base + lora_params.A]
        cb = candidates[base + lora_params.B]
        n_stack, n_in, _ = lora_params.split_dims(len(entry.mm_shape), len(ca.shape), len(cb.shape))
        if n_stack:
            raise ConversionError(f"{src}: load adapters onto the per-layer layout (scan_layers=False)")
        _check_layout(entry, n_in)
        try:
            a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
        except KeyError as e:
            raise ConversionError(f"{wfile}: {module!r} has lora_A or lora_B but not both ({e})") from e
        in_shape, out_shape = entry.mm_shape[:n_in], entry.mm_shape[n_in:]
        r = a.shape[0]
        if a.shape != (int(np.prod(in_shape)), r)[::-1] or b.shape != (int(np.prod(out_shape)), r):
            raise ConversionError(f"{wfile}: {module!r}: lora_A {a.shape} / lora_B {b.shape} do not fit the "
                                  f"weight {entry.hf_shape}")
        rk = _pattern_key(cfg.get("rank_pattern") or {}, module)
        want_r = int(cfg["rank_pattern"][rk]) if rk else int(cfg.get("r", r))
        if want_r != r:
            raise ConversionError(f"{wfile}: {module!r} has rank {r} but {CONFIG_FILE} says {want_r}")
        ak = _pattern_key(cfg.get("alpha_pattern") or {}, module)
        alpha = float(cfg["alpha_pattern"][ak]) if ak else float(cfg.get("lora_alpha", 8))
        out[base + lora_params.A] = np.ascontiguousarray(a.astype(np.float32).T.reshape(*in_shape, r))
        out[base + lora_params.B] = np.ascontiguousarray(b.astype(np.float32).T.reshape(r, *out_shape))
        s = lora_params.scale(r, alpha, bool(cfg.get("use_rslora", False)))
        out[base + lora_params.SCALE] = np.asarray(s, np.float32)
    if not out:
        raise ConversionError(f"{wfile}: no LoRA weights")
    return out
