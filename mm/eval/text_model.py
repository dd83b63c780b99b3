"""The text side of any checkpoint `mm.from_pretrained` loads, as evaluation harnesses call it: summed
log-likelihoods of continuations and greedy generation up to stop strings, batched, with few compiled shapes.

An LLM dir runs its LLM; a VLM dir runs `workflow` ("text" for IAA is the frozen base LLM, so an IAA model
scores exactly what its base scores; by default "text" where the model has it, else its "mm" workflow without
images: a LLaVA-style model's trained LLM). Sequences start with the tokenizer's BOS when it has one and the text
does not already begin with it (*choice*: what Llama / Qwen2 checkpoints were trained with; an empty context is
the BOS alone). Longer inputs keep their last `max_length` tokens.

Batches hold `batch_size` rows of a width rounded up to a multiple of `bucket` tokens: rows are left-padded by
the handle, and a filler row of the bucket's width (and filler rows up to the batch size) keep the compiled
shapes to one per bucket; filler rows' outputs are dropped.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mm.config import ConfigError


def parse_mesh(spec: str | None) -> Any:
    """"fsdp:-1/tensor:2" -> a mesh over every device (`mm.sharding.make_mesh`); None / "" -> None."""
    if not spec:
        return None
    from mm import sharding

    axes = {}
    for part in str(spec).split("/"):
        name, _, size = part.partition(":")
        try:
            axes[name.strip()] = int(size)
        except ValueError:
            raise ConfigError(f"mesh={spec!r}: expected axis:size pairs joined by '/', e.g. fsdp:-1/tensor:2") from None
    return sharding.make_mesh(axes)


class TextModel:
    """`path` (or a loaded handle) + the workflow the text runs in. `logits_calls` counts model forwards."""

    def __init__(self, path: Any, *, workflow: str | None = None, batch_size: int = 8, max_length: int | None = None,
                 dtype: str | None = None, mesh: Any = None, bucket: int = 32, progress: bool = False):
        import mm
        from mm.api import VLMHandle

        self.handle = path if hasattr(path, "generate") else mm.from_pretrained(
            path, dtype=dtype, mesh=parse_mesh(mesh) if isinstance(mesh, str) or mesh is None else mesh)
        self.vlm = isinstance(self.handle, VLMHandle)
        if workflow is None:
            workflow = "text" if not self.vlm or "text" in self.handle.workflows else "mm"
        if self.vlm and workflow not in self.handle.workflows:
            raise ConfigError(f"workflow={workflow!r}: {path} has {self.handle.workflows}")
        if not self.vlm and workflow != "text":
            raise ConfigError(f"workflow={workflow!r}: {path} is an LLM (its only workflow is text)")
        self.tokenizer = self.handle.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"{path}: no tokenizer beside the checkpoint")
        self.workflow, self.batch_size, self.bucket = workflow, int(batch_size), int(bucket)
        llm_cfg = self.handle.config.lm.llm if self.vlm else self.handle.config
        self.max_length = int(max_length or getattr(llm_cfg, "max_position_embeddings", 0) or 2048)
        self.stops = sorted({int(self.tokenizer.eos_token_id)} | {int(x) for x in (llm_cfg.eos_token_id or ())})
        bos = self.tokenizer.bos_token_id
        self.bos = None if bos is None else int(bos)
        self.progress = progress
        self.logits_calls = 0

    # ------------------------------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        return ids if self.bos is None or ids[:1] == [self.bos] else [self.bos] + ids

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress)

    def _shaped(self, rows: list[list[int]]) -> list[list[int]]:
        """`rows` + filler rows: `batch_size` rows, the longest of a bucketed width."""
        width = max(len(r) for r in rows)
        width = min(int(math.ceil(width / self.bucket) * self.bucket), max(self.max_length, width))
        filler = [self.bos if self.bos is not None else self.stops[0]] * width
        return rows + [filler] * (max(self.batch_size, len(rows) + 1) - len(rows))

    def _logits(self, rows: list[list[int]]) -> tuple[np.ndarray, int]:
        """Logits of `rows` (left-padded to the returned width)."""
        self.logits_calls += 1
        shaped = self._shaped(rows)
        out = self.handle.logits(shaped, workflow=self.workflow) if self.vlm else self.handle.logits(shaped)
        return out[:len(rows)], max(len(r) for r in shaped)

    # ------------------------------------------------------------------------------------------ scoring
    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                             desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) for each
        (context ids, continuation ids); the context is used as given (no BOS added here)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = self._bar(len(pairs), desc)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = list(pairs[i][0]), list(pairs[i][1])
                if not cont:
                    raise ValueError(f"request {i}: empty continuation")
                rows.append((ctx + cont)[:-1][-self.max_length:])
                conts.append(cont)
            logits, width = self._logits(rows)
            for r, (i, row, cont) in enumerate(zip(idx, rows, conts)):
                n = len(cont)
                sel = logits[r, width - n:width].astype(np.float64)
                logp = sel - sel.max(-1, keepdims=True)
                logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
                total = float(sum(logp[k, t] for k, t in enumerate(cont)))
                out[i] = (total, bool(all(int(np.argmax(sel[k])) == t for k, t in enumerate(cont))))
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Strings (context, continuation): the continuation's tokens are those the joined text adds after the
        context's (so a leading space belongs to the continuation)."""
        enc = []
        for ctx, cont in pairs:
            c = self.encode(ctx) if ctx else []
            whole = self.encode(ctx + cont)
            cont_ids = whole[len(c):] if whole[:len(c)] == c else self.encode(cont)
            enc.append((self.with_bos(c) if self.bos is not None else (c or self.stops[:1]), cont_ids))
        return self.loglikelihood_tokens(enc)

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Disjoint windows covering every token of `text` once, each with as much preceding context as fits
        (the first one after the BOS / first token), so their sums add up to log p(text)."""
        ids = self.encode(text)
        first = [self.bos] if self.bos is not None else []
        if not first:
            ids, first = ids[1:], ids[:1]
        out, k = [], 0
        while k < len(ids):
            n = min(self.max_length, len(ids) - k)
            ctx = (first + ids)[max(0, k + len(first) - (self.max_length + 1 - n)):k + len(first)]
            out.append((ctx, ids[k:k + n]))
            k += n
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        windows = [(i, w) for i, t in enumerate(texts) for w in self.rolling_windows(t)]
        res = self.loglikelihood_tokens([w for _, w in windows], desc="loglikelihood_rolling")
        out = [0.0] * len(texts)
        for (i, _), (lp, _) in zip(windows, res):
            out[i] += lp
        return out

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, contexts: Sequence[str], *, until: Iterable[str] = (), max_new_tokens: int = 256
                 ) -> list[str]:
        """Greedy continuations of `contexts`, stopped at the model's stop tokens and cut before the first of
        the `until` strings."""
        until = [u for u in until if u]
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
        out: list[str | None] = [None] * len(contexts)
        bar = self._bar(len(contexts), "generate_until")
        keep = max(1, self.max_length - max_new_tokens)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = [self.with_bos(self.encode(contexts[i]))[-keep:] for i in idx]
            rows = rows + [rows[-1]] * (self.batch_size - len(rows))
            gen = (self.handle.generate(rows, workflow=self.workflow, max_new_tokens=max_new_tokens,
                                        stop_tokens=self.stops) if self.vlm else
                   self.handle.generate(rows, max_new_tokens=max_new_tokens, stop_tokens=self.stops))
            for i, toks in zip(idx, gen):
                text = self.decode(toks)
                for u in until:
                    text = text.split(u)[0]
                out[i] = text
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def decode(self, toks: Sequence[int]) -> str:
        keep = []
        for t in np.asarray(toks).tolist():
            if t in self.stops:
                break
            keep.append(t)
        return self.tokenizer.decode(keep, skip_special_tokens=True)


def grouped(items: Sequence[Any], key: Callable[[Any], Any]) -> dict[Any, list[int]]:
    """Indices of `items` by `key`, groups in first-seen order."""
    out: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        out.setdefault(key(it), []).append(i)
    return out
