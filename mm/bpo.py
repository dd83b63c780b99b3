"""BPO's self-made negatives (DESIGN.md section 5): each dataset answer paired with wrong answers the model
itself produces, for DPO (`data.kind=preference`).

For every answer turn of every row (the row's earlier turns, with their reference answers, are the prompt):
  noise   image weakening: DDPM forward noise on the normalised pixels, T = 1000,
          beta_t = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5, x~ = sqrt(abar_t) x + sqrt(1 - abar_t) eps
          at step `t` (default 900, sqrt(abar) = 0.365), eps from a seed per row; the model answers the question
          from the weakened image (sampling settings from the caller);
  inject  error injection: the model's own LLM (an IAA model's text workflow - the frozen base; a LLaVA-style
          model's LLM, i.e. its mm workflow with no image) rewrites the answer following `INSTRUCTION`,
          temperature 0.8, top-p 0.95 by default.
A pair is `{id, image, conversations (the prompt, ending with the question), chosen (the dataset answer),
rejected (a negative), bpo: {method, source_id, turn, seed, t?}}`: the rows `data.kind=preference` trains on.
Dropped and counted: pairs whose chosen or rejected response is over `max_words` (350) words, negatives
equal to the answer (compared by `mm.answers.normalise`), empty negatives. Rows that cannot be used (more than
one image, a missing image, no answer turn) are skipped and counted by reason.

Generation is batched through the model handle; process p of P takes rows p::P; the work directory holds
resumable chunks (`mm.row_chunks`, prefix "pairs"), so a restarted run continues where it stopped and writes no
row twice; seeds depend on row indices and the chunk layout only, so an interrupted-and-resumed run writes
the pairs an uninterrupted one would. When every row is done, process 0 writes the pairs (input order) to the
output JSONL and `summary.json` (kept / dropped / skipped counts) next to the chunks.
The decoding-time contrast form of the released code (2 l(clean) - l(noisy)) is not implemented.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mm.config import ConfigError
from mm.paths import write_atomic
from mm.row_chunks import RowChunks, barrier, my_rows

T_STEPS = 1000
INSTRUCTION = ("Modify the following answer by adding or deleting objects or changing attributes (colour, shape, "
               "size, location). Keep it common and logical. Reply with the modified answer only.\n\nAnswer: ")
METHODS = ("noise", "inject")
PREFIX = "pairs"
META_KEYS = ("rows", "data", "model", "methods", "t", "seed", "temperature", "top_p", "inject_temperature",
             "inject_top_p", "max_new_tokens", "max_words", "chunk_rows")


def alphas_bar(steps: int = T_STEPS) -> np.ndarray:
    """Cumulative products of 1 - beta_t for BPO's sigmoid schedule, float64 `[steps]`."""
    betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, steps))) * (5e-3 - 1e-5) + 1e-5
    return np.cumprod(1.0 - betas)


def weaken(pixels: np.ndarray, t: int, seed: int) -> np.ndarray:
    """`sqrt(abar_t) x + sqrt(1 - abar_t) eps` on normalised pixels (any shape), eps ~ N(0, 1) from `seed`."""
    if not 0 <= t < T_STEPS:
        raise ConfigError(f"--t {t}: the diffusion step must be in [0, {T_STEPS})")
    a = alphas_bar()[t]
    eps = np.random.default_rng(seed).standard_normal(pixels.shape)
    return (np.sqrt(a) * pixels + np.sqrt(1.0 - a) * eps).astype(np.float32)


def verdict(chosen: str, rejected: str, max_words: int = 350) -> str | None:
    """None to keep the pair, else why it is dropped."""
    from mm.answers import normalise

    if not rejected.strip():
        return "empty_negative"
    if normalise(rejected) == normalise(chosen):
        return "negative_equals_answer"
    if len(chosen.split()) > max_words or len(rejected.split()) > max_words:
        return "over_max_words"
    return None


def _turns(row: dict[str, Any], rid: str) -> list[tuple[list[tuple[str, str]], str, str]]:
    """(history, question, answer) of every answer turn; SampleSkip for rows BPO cannot use."""
    from mm.answers import answer_turns
    from mm.data.skips import SampleSkip
    from mm.data.sources import image_paths

    if len(image_paths(row)) != 1:
        raise SampleSkip("bad_row", rid, f"BPO negatives need rows of one image, this one has {len(image_paths(row))}")
    return answer_turns(row, rid)


def _prompt_turns(history: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    conv = []
    for k, (q, a) in enumerate([*history, (question, None)]):
        conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
        if a is not None:
            conv.append({"from": "gpt", "value": a})
    return conv


def negatives(model: Any, data: str | os.PathLike, *, image_root: str, out: str | os.PathLike,
              methods: Sequence[str] = METHODS, t: int = 900, seed: int = 0, temperature: float = 0.8,
              top_p: float = 0.95, inject_temperature: float = 0.8, inject_top_p: float = 0.95,
              max_new_tokens: int = 64, max_words: int = 350, batch_size: int = 8, chunk_rows: int = 64,
              stop_after_chunks: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes BPO pairs for `data` (a LLaVA JSON / JSONL file) under `model` (an mm VLM dir) to the JSONL file
    `out` (work files in `out + ".parts/"`); returns the summary (counts). See the module docstring."""
    import jax

    from mm.answers import Prompter, decode, generate_all, stop_tokens
    from mm.api import VLMHandle
    from mm.data import images as img_lib
    from mm.data.pipeline import DataConfig, ImageTiler
    from mm.data.skips import SampleSkip
    from mm.data.sources import image_paths, read_image, read_llava, row_id
    from mm.heldout import Loader
    from mm.ppl import processor_for

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods {','.join(methods)}: choose from {METHODS}")
    weaken(np.zeros(1), t, 0)  # checks t
    rows = read_llava(data)
    h = Loader()(model)
    if not isinstance(h, VLMHandle):
        raise ConfigError(f"{model}: a {type(h).__name__} checkpoint, not a vision-language model")
    tok = h.tokenizer
    if tok is None:
        raise ConfigError(f"{model}: no tokenizer beside the checkpoint")
    llm_workflow = "text" if "text" in h.workflows else "mm"  # IAA: the frozen base; LLaVA-style: its LLM
    stops = stop_tokens(h)
    prompter = Prompter(tok, h.config.tokens_per_image)
    tiler = ImageTiler(DataConfig(tiling="square", tile=int(h.config.vision.image_size)), processor_for(h))

    proc, nproc = jax.process_index(), jax.process_count()
    out = Path(out)
    meta = {"rows": len(rows), "data": str(Path(data).resolve()), "model": str(Path(model).resolve()),
            "methods": list(methods), "t": t, "seed": seed, "temperature": temperature, "top_p": top_p,
            "inject_temperature": inject_temperature, "inject_top_p": inject_top_p,
            "max_new_tokens": max_new_tokens, "max_words": max_words, "chunk_rows": chunk_rows}
    chunks = RowChunks(out.with_name(out.name + ".parts"), PREFIX, meta, META_KEYS)
    done = chunks.records()
    mine = list(my_rows(len(rows), proc, nproc))
    todo = [i for i in mine if i not in done]
    log(f"mm-bpo p{proc}/{nproc}: {len(mine)} rows in this shard, {len(mine) - len(todo)} already done")
    t0, written = time.time(), 0
    # chunk k of this shard is its rows [k * chunk_rows, (k + 1) * chunk_rows): the layout (and so every seed)
    # does not depend on where an earlier run stopped
    for start in range(0, len(mine), chunk_rows):
        block = [i for i in mine[start:start + chunk_rows] if i not in done]
        if not block:
            continue
        recs: list[dict[str, Any]] = []
        jobs = []  # (row, turn, history, question, answer, pixels)
        for i in block:
            rid = row_id(rows[i], i)
            try:
                turns = _turns(rows[i], rid)
                rel = image_paths(rows[i])[0]
                px = tiler(img_lib.load_image(read_image(image_root, rel, rid), name=rel))[0]
            except (SampleSkip, OSError, ValueError) as e:
                reason = e.reason if isinstance(e, SampleSkip) else "corrupt_image"
                recs.append({"index": i, "id": rid, "skip": reason, "message": str(e)[:200]})
                continue
            jobs += [(i, k, hist, q, a, px) for k, (hist, q, a) in enumerate(turns)]
        made: dict[str, list[str]] = {}
        batch_seed = seed * 1_000_003 + 7919 * block[0]
        if "noise" in methods and jobs:
            prompts = [prompter(q, True, h.image_token, hist) for _, _, hist, q, _, _ in jobs]
            pixels = [weaken(px, t, seed + 1_000_003 * i + k) for i, k, _, _, _, px in jobs]
            toks = generate_all(lambda r, **kw: h.generate(r, workflow="mm", **kw), prompts, batch=batch_size,
                                max_new=max_new_tokens, stops=stops, pixels=pixels, temperature=temperature,
                                top_p=top_p, seed=batch_seed, log=lambda _: None)
            made["noise"] = decode(tok, toks, stops)
        if "inject" in methods and jobs:
            prompts = [prompter(INSTRUCTION + a, False, h.image_token) for *_, a, _ in jobs]
            toks = generate_all(lambda r, **kw: h.generate(r, workflow=llm_workflow, **kw), prompts,
                                batch=batch_size, max_new=max_new_tokens, stops=stops, temperature=inject_temperature,
                                top_p=inject_top_p, seed=batch_seed + 1, log=lambda _: None)
            made["inject"] = decode(tok, toks, stops)
        for j, (i, k, hist, q, a, _) in enumerate(jobs):
            rid = row_id(rows[i], i)
            for m in methods:
                neg = made[m][j]
                prov = {"method": m, "source_id": rid, "turn": k,
                        "seed": batch_seed if m == "noise" else batch_seed + 1,
                        **({"t": t, "noise_seed": seed + 1_000_003 * i + k} if m == "noise" else {})}
                why = verdict(a, neg, max_words)
                if why:
                    recs.append({"index": i, "id": rid, "dropped": why, "bpo": prov})
                else:
                    recs.append({"index": i, "id": rid, "pair": {
                        "id": f"{rid}:{k}:{m}", "image": image_paths(rows[i])[0],
                        "conversations": _prompt_turns(hist, q), "chosen": a, "rejected": neg, "bpo": prov}})
        chunks.write(proc, recs)
        written += 1
        n = sum(1 for i in mine[:start + chunk_rows] if i not in done)
        rate = n / max(time.time() - t0, 1e-9)
        log(f"mm-bpo p{proc}/{nproc}: {len(mine) - len(todo) + n}/{len(mine)} rows, {rate:.2f} rows/s, "
            f"ETA {(len(todo) - n) / rate:.0f}s")
        if stop_after_chunks is not None and written >= stop_after_chunks:
            return _summary(chunks.records(), len(rows))
    barrier("mm-bpo: shards done")
    summary = _summary(chunks.records(), len(rows))
    if proc == 0 and summary["complete"]:
        recs = chunks.records()
        pairs = [r["pair"] for i in sorted(recs) for r in recs[i] if "pair" in r]
        write_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        write_atomic(out.with_name(out.name + ".parts") / "summary.json", json.dumps(summary, indent=1) + "\n")
        log(f"mm-bpo: {summary['kept']} pairs kept, dropped {summary['dropped']}, skipped rows {summary['skipped']}"
            f" -> {out}")
    barrier("mm-bpo: written")
    return summary


def _summary(recs: dict[int, list[dict[str, Any]]], total: int) -> dict[str, Any]:
    flat = [r for i in sorted(recs) for r in recs[i]]
    count = lambda key: {k: sum(1 for r in flat if r.get(key) == k)  # noqa: E731
                         for k in sorted({r[key] for r in flat if key in r})}
    by_method: dict[str, int] = {}
    for r in flat:
        if "pair" in r:
            by_method[r["pair"]["bpo"]["method"]] = by_method.get(r["pair"]["bpo"]["method"], 0) + 1
    return {"rows": total, "done": len(recs), "complete": len(recs) == total,
            "kept": sum("pair" in r for r in flat), "kept_by_method": by_method,
            "dropped": count("dropped"), "skipped": count("skip")}
