"""Model soups (DESIGN.md section 4): the uniform mean of checkpoints fine-tuned from one start, chosen three ways.

  average   every ingredient;
  maximum   the `top_p` ingredients with the best scores;
  greedy    ingredients sorted by score, best first; the best enters, each next one enters when the score of
            the soup with it is `>=` (accept="ge", POINTS) or `>` (accept="gt", the model-soups paper) the
            score of the soup without it. There is no default comparison: the caller names it.

Scores come from a scorer, `scorer(path) -> float` (higher is better), called on each ingredient's directory
and on each candidate soup written to disk (in the output dtype, exactly what would be kept). The split a
scorer evaluates on is the scorer's business; it must be a held-out split, never the test split.

Ingredients are all of one kind, and the soup is written in that kind:
  - mm checkpoint dirs (`mm_config.json` + Orbax `params/`) of one kind and config;
  - finished `mm-train` workdirs (`config.json` + `checkpoints/`): `soup()` exports each, one at a time, into
    its staging area (`mm.train.export.export_run`: the trained params of the latest step merged with their
    frozen source, so host memory holds one model while exporting) and soups the exported mm dirs; they mix
    with mm dirs. Scorers see the exported directory; the report names the workdir;
  - HF dirs (`config.json` + safetensors) of one architecture.
Every tensor name, shape and dtype family is checked across all ingredients from metadata before anything is
read; the error names the first tensor that differs and the two files. Float tensors stored in different float
dtypes need an explicit `dtype`.

Streaming: tensor by tensor, each ingredient's copy is read in turn and added to one float32 accumulator,
whatever the stored dtype; the mean is `sum / N` in float32, rounded once to the output dtype (for bf16 inputs
the float32 sum is exact, so this is the float64 mean rounded once to bf16). Host memory holds about the
float32 accumulator and one ingredient's copy of one tensor (the first copy is kept only until a second one
differs from it), the rounded result, plus the output unit being written (an Orbax save unit such as one decoder layer
for mm dirs; one tensor for HF dirs) - never a
whole model. A tensor that is bit-identical in every ingredient (a frozen part) is copied, not averaged. For
IAA checkpoints (kind "vlm" with branches) the frozen base LLM (`base/...`) must be identical in every
ingredient - they must be branches of one base - and is copied from the first; the branches and the rest are
averaged. Output is staged and renamed into place when complete (`mm.checkpoints.staging.staged_output`): a
failure leaves nothing at the destination.

The destination also gets `soup_report.json` (method, each ingredient's score, each soup scored, greedy's order
and decisions) and, when there are scores, `soup_report.png` (a bar chart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ml_dtypes
import numpy as np
from flax import traverse_util

from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.engine import DTYPES
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import save_unit
from mm.checkpoints.safetensors_io import (DEFAULT_SHARD_BYTES, INDEX_FILE, PlannedTensor, SafetensorsCheckpoint,
                                           ShardedSafetensorsWriter)
from mm.checkpoints.staging import staged_output
from mm.config import ConfigError, VisionConfig, read_json
from mm.models import kinds as model_kinds

METHODS = ("average", "maximum", "greedy")
ACCEPT = ("ge", "gt")
REPORT_JSON = "soup_report.json"
REPORT_PNG = "soup_report.png"
# config.json keys that say how an HF checkpoint was saved, not what architecture it is.
_HF_NON_ARCH_KEYS = ("torch_dtype", "dtype", "_name_or_path", "transformers_version")
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float64): "float64"}

Scorer = Callable[[str], float]


# ------------------------------------------------------------------------------------------ selection
@dataclasses.dataclass
class Selection:
    """What a method chose. Indices are ingredient positions in the input order.

    `order`: ingredients by score, best first (ties: input order); `soups`: every soup scored, in the order it
    was scored, as `{"members": [...], "score": s, "accepted": bool | None}` (None outside greedy)."""

    method: str
    members: list[int]
    order: list[int] | None = None
    ingredient_scores: list[float] | None = None
    soups: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    score: float | None = None


def by_score(scores: Sequence[float]) -> list[int]:
    """Indices sorted by score, highest first; equal scores keep their input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def select(method: str, n: int, ingredient_score: Callable[[int], float] | None,
           soup_score: Callable[[list[int]], float] | None, *, top_p: int | None = None,
           accept: str | None = None) -> Selection:
    """Runs one selection over `n` ingredients.

    `ingredient_score(i)` scores ingredient i; `soup_score(members)` scores the mean of `members` (called only
    for soups of two or more; a soup of one is that ingredient). `average` needs no scores; `maximum` needs
    `top_p` (1..n); `greedy` needs `accept` ("ge" or "gt"). The final soup of `average` / `maximum` is scored
    by `soup_score` when it is given (for the report), greedy's final score is the one its last decision saw.
    """
    check_options(method, n, top_p, accept, have_scorer=ingredient_score is not None)
    scores = None if ingredient_score is None else [float(ingredient_score(i)) for i in range(n)]
    if method == "average":
        sel = Selection(method, list(range(n)), ingredient_scores=scores)
    elif method == "maximum":
        order = by_score(scores)
        sel = Selection(method, sorted(order[:top_p]), order=order, ingredient_scores=scores)
    else:
        order = by_score(scores)
        members, best = [order[0]], scores[order[0]]
        soups = []
        for i in order[1:]:
            s = float(soup_score(members + [i]))
            ok = s >= best if accept == "ge" else s > best
            soups.append({"members": members + [i], "score": s, "accepted": ok})
            if ok:
                members, best = members + [i], s
        return Selection(method, members, order=order, ingredient_scores=scores, soups=soups, score=best)
    if soup_score is not None:
        sel.score = scores[sel.members[0]] if len(sel.members) == 1 else float(soup_score(list(sel.members)))
        sel.soups.append({"members": list(sel.members), "score": sel.score, "accepted": None})
    return sel


def check_options(method: str, n: int, top_p: int | None, accept: str | None, have_scorer: bool) -> None:
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: choose one of {METHODS}")
    if n < 1:
        raise ConfigError("a soup needs at least one ingredient")
    if method == "greedy" and accept not in ACCEPT:
        raise ConfigError(f"greedy needs --accept ge (POINTS: keep when the score does not drop) or gt (model-soups "
                          f"paper: keep only when it rises); got {accept!r}")
    if method != "greedy" and accept is not None:
        raise ConfigError(f"--accept is for greedy soups only (method={method!r})")
    if method == "maximum" and (top_p is None or not 1 <= top_p <= n):
        raise ConfigError(f"maximum needs --top-p between 1 and the number of ingredients ({n}); got {top_p!r}")
    if method != "maximum" and top_p is not None:
        raise ConfigError(f"--top-p is for maximum soups only (method={method!r})")
    if method in ("maximum", "greedy") and not have_scorer:
        raise ConfigError(f"{method} needs scores: pass --score loss|exact-match --split VAL.json, or "
                          "--scorer module:function")


def load_scorer(spec: str) -> Scorer:
    """`"package.module:function"` -> the function (the current directory is importable, as for `python -m`)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"--scorer {spec!r}: expected module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"--scorer {spec!r}: cannot import {module!r} ({e})") from e
    except AttributeError as e:
        raise ConfigError(f"--scorer {spec!r}: module {module!r} has no {name!r}") from e
    if not callable(fn):
        raise ConfigError(f"--scorer {spec!r}: {name!r} is not callable")
    return fn


def _checked_score(scorer: Scorer, path: Path) -> float:
    s = scorer(str(path))
    try:
        s = float(s)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"scorer returned {s!r} for {path}, not a number") from e
    if not math.isfinite(s):
        raise ConversionError(f"scorer returned {s} for {path}; scores must be finite")
    return s


# ----------------------------------------------------------------------------------------- ingredients
@dataclasses.dataclass
class Ingredients:
    """Checked inputs: their kind ("mm" or "hf"), directories, and per tensor (in write order) shape and the
    stored dtype of each ingredient. `frozen`: tensor keys that must be identical everywhere (IAA base)."""

    kind: str
    paths: list[Path]
    tensors: dict[Any, tuple[tuple[int, ...], list[np.dtype]]]
    where: list[dict[Any, str]]  # per ingredient: tensor key -> file it lives in (for messages)
    frozen: set[Any]
    manifest: dict[str, Any] | None = None  # mm: the first ingredient's mm_config.json
    labels: list[str] | None = None  # what the user passed (a run's workdir, not its export); default: paths


def input_kind(path: Path) -> str:
    """"mm", "run" (an mm-train workdir) or "hf"; anything else is a ConversionError naming the path."""
    if (path / mmd.MM_CONFIG_FILE).is_file():
        return "mm"
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return "run"
    if (path / "config.json").is_file() and ((path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))):
        return "hf"
    raise ConversionError(f"{path}: neither an mm checkpoint (no {mmd.MM_CONFIG_FILE}) nor an HF safetensors directory "
                          f"(config.json + *.safetensors)")


def _show(key: Any) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)


def _family(dt: np.dtype) -> str:
    return "float" if dt in _DTYPE_NAMES else np.dtype(dt).kind


def _strip(d: Any, keys: Sequence[str]) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v, keys) for k, v in d.items() if k not in keys}
    return d


def _first_difference(a: Any, b: Any, at: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{at}{k}"
            d = _first_difference(a[k], b[k], f"{at}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else at.rstrip(".") or "(root)"


def _check_configs(paths: list[Path], configs: list[Any], file: str) -> None:
    for p, c in zip(paths[1:], configs[1:]):
        key = _first_difference(configs[0], c)
        if key is not None:
            raise ConversionError(f"{paths[0] / file} and {p / file} differ at {key!r}: ingredients of a soup must "
                                  f"have one architecture")


def open_ingredients(paths: Sequence[str | Path]) -> Ingredients:
    """Checks that `paths` (mm or HF dirs, all one kind) can be souped; metadata only."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("a soup needs at least one ingredient")
    for p in paths:
        if not p.is_dir():
            raise ConversionError(f"{p}: not a directory")
    kinds = [input_kind(p) for p in paths]
    for p, k in zip(paths, kinds):
        if k == "run":
            raise ConversionError(f"{p}: an mm-train workdir; `soup()` / mm-soup export it first (or run mm-convert "
                                  f"export-run --src {p} --dst DIR and pass DIR)")
    for p, k in zip(paths, kinds):
        if k != kinds[0]:
            raise ConversionError(f"{paths[0]} is an {kinds[0]} directory but {p} is an {k} directory: a soup's "
                                  f"ingredients must all be of one kind")
    manifest = None
    frozen: set[Any] = set()
    metas: list[dict[Any, tuple[tuple[int, ...], np.dtype]]] = []
    where: list[dict[Any, str]] = []
    if kinds[0] == "mm":
        from mm.convert.registry import read_config

        manifests = [mmd.read_mm_manifest(p) for p in paths]
        configs = [_strip({k: v for k, v in m.items() if k != "source"}, ("param_dtype",)) for m in manifests]
        config_file = mmd.MM_CONFIG_FILE
        manifest = manifests[0]
        for p in paths:
            meta = mmd.params_metadata(p)
            metas.append({k: meta[k] for k in sorted(meta, key=lambda k: (save_unit(k), k))})
            where.append({k: str(p / mmd.PARAMS_DIR) for k in meta})
        config = read_config(paths[0])
        if not isinstance(config, VisionConfig):
            frozen = {k for k in metas[0] if k[0] in model_kinds.of(config).frozen}
    else:  # "hf"
        configs = [_strip(read_json(p / "config.json"), _HF_NON_ARCH_KEYS) for p in paths]
        config_file = "config.json"
        for p in paths:
            with SafetensorsCheckpoint(p) as ck:
                infos = sorted(ck.tensors.values(), key=lambda t: (t.file.name, t.start))
                metas.append({t.name: (t.shape, t.dtype) for t in infos})
                where.append({t.name: str(t.file) for t in infos})
    first = metas[0]
    for i in range(1, len(paths)):
        for key, (shape, dt) in first.items():
            if key not in metas[i]:
                raise ConversionError(f"tensor {_show(key)} is in {where[0][key]} but not in {paths[i]}")
            shape_i, dt_i = metas[i][key]
            if tuple(shape_i) != tuple(shape):
                raise ConversionError(f"tensor {_show(key)}: shape {list(shape)} in {where[0][key]} but "
                                      f"{list(shape_i)} in {where[i][key]}")
            if _family(dt_i) != _family(dt):
                raise ConversionError(f"tensor {_show(key)}: dtype {dt} in {where[0][key]} but {dt_i} in "
                                      f"{where[i][key]} (a different dtype family)")
        extra = [k for k in metas[i] if k not in first]
        if extra:
            raise ConversionError(f"tensor {_show(extra[0])} is in {where[i][extra[0]]} but not in {paths[0]}")
    _check_configs(paths, configs, config_file)  # after the tensors: a tensor that differs is the clearer message
    tensors = {k: (tuple(shape), [m[k][1] for m in metas]) for k, (shape, _) in first.items()}
    return Ingredients(kinds[0], paths, tensors, where, frozen, manifest)


def _out_dtype(ing: Ingredients, key: Any, dtype: str) -> np.dtype:
    stored = ing.tensors[key][1]
    if _family(stored[0]) != "float":
        return stored[0]
    if dtype != "keep":
        return np.dtype(dtype)
    for i, dt in enumerate(stored):
        if dt != stored[0]:
            raise ConversionError(f"tensor {_show(key)} is {stored[0]} in {ing.where[0][key]} but {dt} in "
                                  f"{ing.where[i][key]}: pass --dtype to choose the soup's dtype")
    return stored[0]


# ------------------------------------------------------------------------------------------- the mean
def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical (NaNs included)."""
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8))


def mean_tensor(arrays: Iterator[np.ndarray], n: int, out_dtype: np.dtype, *, name: str, where: Sequence[str],
                must_be_identical: bool = False) -> np.ndarray:
    """The mean of the `n` arrays `arrays` yields (one at a time), accumulated in float32 and rounded once to
    `out_dtype`; bit-identical inputs (and non-float ones, which must be identical) are copied instead."""
    first = acc = None
    identical = True
    for i, x in enumerate(arrays):
        if i == 0:
            first = x
            if _family(x.dtype) == "float" and n > 1:
                acc = x.astype(np.float32)
            continue
        if identical and not _same(x, first):
            identical = False
            if must_be_identical or acc is None:
                why = ("the frozen base of IAA ingredients must be identical (branches of one base)"
                       if must_be_identical else f"non-float ({x.dtype}) tensors cannot be averaged")
                raise ConversionError(f"tensor {name} differs between {where[0]} and {where[i]}: {why}")
            first = None  # only the accumulator is needed from here on: one copy less in memory
        if acc is not None:
            acc += x.astype(np.float32, copy=False)
        del x
    if identical:
        return first if first.dtype == out_dtype else first.astype(out_dtype)
    np.divide(acc, np.float32(n), out=acc)  # in place: the same float32 quotient as `acc / n`, no second buffer
    return acc.astype(out_dtype, copy=False)


# ------------------------------------------------------------------------------------------ writing
def write_soup(ing: Ingredients, members: Sequence[int], out: Path, *, dtype: str = "keep",
               source: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """The mean of ingredients `members` written into the empty (or new) directory `out`, streaming."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {DTYPES}")
    members = list(members)
    if not members:
        raise ConfigError("a soup needs at least one member")
    out.mkdir(parents=True, exist_ok=True)
    labels = ing.labels or [str(p.absolute()) for p in ing.paths]
    out_dtypes = {k: _out_dtype(ing, k, dtype) for k in ing.tensors}
    source = {"format": "mm-soup", "ingredients": [labels[i] for i in members], **(source or {})}
    if ing.kind == "mm":
        _write_mm(ing, members, out, out_dtypes, dtype, source)
    else:
        _write_hf(ing, members, out, out_dtypes, dtype, max_shard_bytes)
    return out


def _set_param_dtype(d: Any, name: str) -> Any:
    if isinstance(d, dict):
        return {k: (name if k == "param_dtype" else _set_param_dtype(v, name)) for k, v in d.items()}
    return d


def _write_mm(ing: Ingredients, members: list[int], out: Path, out_dtypes: dict[Any, np.dtype], dtype: str,
              source: dict[str, Any]) -> None:
    first = ing.paths[members[0]]
    manifest = {k: v for k, v in ing.manifest.items() if k not in ("format_version", "kind", "source")}
    if dtype != "keep":
        manifest = _set_param_dtype(manifest, dtype)
    mmd.write_mm_config(out, ing.manifest["kind"], manifest, source)
    mmd.copy_files(first / mmd.TOKENIZER_DIR, out / mmd.TOKENIZER_DIR, mmd.TOKENIZER_FILES)
    mmd.copy_files(first, out, mmd.EXTRA_HF_FILES)
    units: dict[Any, list[Any]] = {}
    for k in ing.tensors:
        units.setdefault(save_unit(k), []).append(k)

    def read(i: int, key: Any) -> np.ndarray:
        shape, dts = ing.tensors[key]
        tree = mmd.load_param_paths(ing.paths[i], [key], {key: dts[i]}, {key: shape})
        return np.asarray(traverse_util.flatten_dict(tree)[key])

    with mmd.ParamWriter(out) as writer:
        for keys in units.values():
            writer.reserve(sum(int(np.prod(ing.tensors[k][0])) * out_dtypes[k].itemsize for k in keys))
            unit: dict[Any, Any] = {}
            for k in keys:
                arrays = (read(i, k) for i in members)
                unit[k] = mean_tensor(arrays, len(members), out_dtypes[k], name=_show(k),
                                      where=[ing.where[i][k] for i in members], must_be_identical=k in ing.frozen)
            writer.add(traverse_util.unflatten_dict(unit))
            del unit
        writer.finalize()


def _write_hf(ing: Ingredients, members: list[int], out: Path, out_dtypes: dict[Any, np.dtype], dtype: str,
              max_shard_bytes: int) -> None:
    first = ing.paths[members[0]]
    for f in sorted(first.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_FILE, REPORT_JSON, REPORT_PNG):
            shutil.copy2(f, out / f.name)
        elif f.is_dir():
            shutil.copytree(f, out / f.name)
    if dtype != "keep":
        config = read_json(out / "config.json")
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = list(ing.tensors)
    plan = [PlannedTensor(n, ing.tensors[n][0], out_dtypes[n]) for n in names]
    writer = ShardedSafetensorsWriter(out, plan, max_shard_bytes)
    with contextlib.ExitStack() as stack:
        cks = [stack.enter_context(SafetensorsCheckpoint(ing.paths[i])) for i in members]
        # read_ahead_bytes=0: a stream reads its next tensor only when asked, so one ingredient copy is live at once.
        streams = [stack.enter_context(contextlib.closing(ck.iter_tensors(names, read_ahead_bytes=0))) for ck in cks]
        for n in names:
            arrays = (next(s)[1] for s in streams)
            writer.write(n, mean_tensor(arrays, len(members), out_dtypes[n], name=n,
                                        where=[ing.where[i][n] for i in members]))
    writer.close()


# --------------------------------------------------------------------------------------------- soup
def soup(inputs: Sequence[str | Path], dst: str | Path, *, method: str, scorer: Scorer | str | None = None,
         top_p: int | None = None, accept: str | None = None, dtype: str = "keep", overwrite: bool = False,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, plot: bool = True) -> Selection:
    """Soups `inputs` into `dst` by `method` (see the module doc); returns what was chosen and scored.

    `scorer` is a function `path -> float` or a `"module:function"` string. Options are checked before any
    checkpoint is read."""
    inputs = [Path(p) for p in inputs]
    if isinstance(scorer, str):
        scorer = load_scorer(scorer)
    check_options(method, len(inputs), top_p, accept, have_scorer=scorer is not None)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {DTYPES}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
    for p in inputs:
        if not p.is_dir():
            raise ConversionError(f"{p}: not a directory")
    with staged_output(dst, overwrite) as stage:
        work = stage / ".soup-work"
        ing = open_ingredients(exported_inputs(inputs, work / "exports"))
        ing.labels = [str(p.absolute()) for p in inputs]
        info = {"method": method, **({"top_p": top_p} if top_p else {}), **({"accept": accept} if accept else {})}
        candidates: dict[tuple[int, ...], Path] = {}

        def soup_score(members: list[int]) -> float:
            keep = tuple(members[:-1])
            for m in [m for m in candidates if m != keep]:
                shutil.rmtree(candidates.pop(m))
            d = work / ("soup-" + "-".join(map(str, members)))
            write_soup(ing, members, d, dtype=dtype, source=info, max_shard_bytes=max_shard_bytes)
            candidates[tuple(members)] = d
            return _checked_score(scorer, d)

        if method == "greedy":
            sel = select(method, len(inputs), lambda i: _checked_score(scorer, ing.paths[i]), soup_score,
                         accept=accept)
            final = candidates.get(tuple(sel.members))
            if final is None:
                write_soup(ing, sel.members, stage, dtype=dtype, source=info, max_shard_bytes=max_shard_bytes)
            else:
                for f in final.iterdir():
                    f.rename(stage / f.name)
        else:
            score = None if scorer is None else lambda i: _checked_score(scorer, ing.paths[i])
            sel = select(method, len(inputs), score, None, top_p=top_p)
            write_soup(ing, sel.members, stage, dtype=dtype, source=info, max_shard_bytes=max_shard_bytes)
            if scorer is not None:
                sel.score = (sel.ingredient_scores[sel.members[0]] if len(sel.members) == 1
                             else _checked_score(scorer, stage))
                sel.soups.append({"members": list(sel.members), "score": sel.score, "accepted": None})
        shutil.rmtree(work, ignore_errors=True)
        write_report(sel, inputs, stage, dtype=dtype, plot=plot)
    return sel


def exported_inputs(inputs: Sequence[Path], work: Path, log: Callable[[str], None] = print) -> list[Path]:
    """`inputs` with each mm-train workdir replaced by its export under `work` (made one at a time)."""
    out = []
    for i, p in enumerate(inputs):
        if input_kind(p) != "run":
            out.append(p)
            continue
        from mm.train.export import export_run

        dst = work / f"{i:03d}-{p.name}"
        log(f"mm-soup: exporting run {p} ({i + 1}/{len(inputs)}) -> {dst}")
        out.append(export_run(p, dst))
    return out


# ------------------------------------------------------------------------------------------- report
def report_dict(sel: Selection, inputs: Sequence[Path], dtype: str) -> dict[str, Any]:
    name = lambda i: str(Path(inputs[i]).absolute())  # noqa: E731
    scores = sel.ingredient_scores
    return {
        "method": sel.method,
        "dtype": dtype,
        "ingredients": [{"path": name(i), "score": None if scores is None else scores[i]} for i in range(len(inputs))],
        "order": None if sel.order is None else [name(i) for i in sel.order],
        "soups": [{"members": [name(i) for i in s["members"]], "score": s["score"],
                   **({} if s["accepted"] is None else {"accepted": s["accepted"]})} for s in sel.soups],
        "final": {"members": [name(i) for i in sel.members], "score": sel.score},
    }


def write_report(sel: Selection, inputs: Sequence[Path], out: Path, *, dtype: str, plot: bool = True) -> None:
    (out / REPORT_JSON).write_text(json.dumps(report_dict(sel, inputs, dtype), indent=2) + "\n")
    if plot and sel.ingredient_scores is not None:
        plot_report(sel, inputs, out / REPORT_PNG)


def plot_report(sel: Selection, inputs: Sequence[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"#{i} {Path(p).name}" for i, p in enumerate(inputs)]
    values = list(sel.ingredient_scores)
    colors = ["tab:blue"] * len(values)
    for s in sel.soups:
        labels.append("soup " + "+".join(f"#{i}" for i in s["members"]))
        values.append(s["score"])
        colors.append({True: "tab:green", False: "tab:red", None: "tab:orange"}[s["accepted"]])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(values) + 2), 4.5))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("score (higher is better)")
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.2 or abs(hi) * 0.05 or 1.0
    ax.set_ylim(lo - pad, hi + pad)
    title = {"greedy": "greedy soup (green: accepted, red: rejected)", "maximum": "maximum soup",
             "average": "average soup"}[sel.method]
    ax.set_title(f"{title}; final score {sel.score:.4g}" if sel.score is not None else title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
