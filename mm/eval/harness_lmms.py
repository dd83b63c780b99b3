"""The lmms-eval model `mm` (lmms-eval 0.7, the `eval` extra), registered through the `lmms_eval.models` entry
point (`mm.eval.lmms_plugin`), so once mm is installed beside lmms-eval:

    python -m lmms_eval --model mm --model_args path=DIR,workflow=mm,batch_size=8 --tasks TASKS

model_args: `path` (any VLM `mm.from_pretrained` loads: IAA, LLaVA-style, HF Llava), `workflow` ("mm"; "g" is
IAA's grounding branch; "text" answers without images), `batch_size`, `max_new_tokens` (when the task gives
none; default 128), `dtype`, `mesh` ("fsdp:-1/tensor:2"), `tiling` ("square": pad to square with the
processor's mean colour, the checkpoint's own preprocessing; "catty": POINTS tiles + thumbnail).

Each request's images (`doc_to_visual`) open the first user turn of a prompt rendered with the checkpoint
tokenizer's chat template (`mm.answers.Prompter`, as `mm-eval run` renders it); `generate_until` decodes
greedily in batches (prompts left-padded by the handle), up to the model's stop tokens, `max_new_tokens`, and
cut before the first `until` string. `loglikelihood` answers lmms-eval's convention, not lm-eval's: the first
element is the target's *loss*, the mean negative log-likelihood per target token (what its built-in HF models
return, and what its multiple-choice scoring takes the argmin of), the second whether greedy decoding gives
the target. Sampling arguments are refused rather than ignored. A tqdm bar counts requests.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from lmms_eval.api.model import lmms

from mm.eval.text_model import grouped, parse_mesh


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


class MMLMMs(lmms):
    is_simple = True

    def __init__(self, path: str, workflow: str = "mm", batch_size: int | str = 8, max_new_tokens: int = 128,
                 dtype: str | None = None, mesh: str | None = None, tiling: str = "square", progress: Any = True,
                 **unused: Any) -> None:
        super().__init__()
        import mm
        from mm.answers import Prompter, stop_tokens
        from mm.api import VLMHandle
        from mm.config import ConfigError
        from mm.eval.runner import Images

        self.handle = mm.from_pretrained(str(path), dtype=dtype, mesh=parse_mesh(mesh))
        if not isinstance(self.handle, VLMHandle):
            raise ConfigError(f"{path}: a {type(self.handle).__name__}; lmms-eval's mm model takes VLMs "
                              "(lm-eval's takes LLMs)")
        if workflow not in self.handle.workflows:
            raise ConfigError(f"workflow={workflow!r}: {path} has {self.handle.workflows}")
        if self.handle.tokenizer is None:
            raise ConfigError(f"{path}: no tokenizer beside the checkpoint")
        self.workflow, self.batch_size = workflow, 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_new_tokens, self.progress = int(max_new_tokens), _bool(progress)
        self.tok = self.handle.tokenizer
        self.prompter = Prompter(self.tok, int(self.handle.config.tokens_per_image))
        self.images = Images(self.handle, None, tiling)
        self.stops = stop_tokens(self.handle)
        self.task_dict: dict[str, Any] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MMLMMs":
        """`--model_args` win over lmms-eval's own `--batch_size` (its device settings do not apply: the mesh
        places the model)."""
        from lmms_eval.utils import simple_parse_args_string

        extra = {k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}
        return cls(**{**extra, **simple_parse_args_string(arg_string)})

    # ---------------------------------------------------------------------------------------------- inputs
    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        v = doc_to_visual(self.task_dict[task][split][doc_id])
        flat: list[Any] = []
        for x in v if isinstance(v, (list, tuple)) else [v]:
            flat += list(x) if isinstance(x, (list, tuple)) else [x]
        return [x for x in flat if x is not None]

    def _inputs(self, context: str, visuals: Sequence[Any]) -> tuple[list[int], np.ndarray | None]:
        from mm.eval.runner import prompt_ids

        if visuals and self.workflow == "text":
            visuals = []
        pix = [self.images.decoded(v, f"visual {k}")[0] for k, v in enumerate(visuals)]
        pixels = np.concatenate(pix) if pix else None
        return prompt_ids(self.prompter, context, self.handle.image_token, 0 if pixels is None else len(pixels)), pixels

    def _bar(self, n: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=n, desc=desc, disable=not self.progress or self.rank != 0)

    # ---------------------------------------------------------------------------------------------- requests
    def generate_until(self, requests: list[Any]) -> list[str]:
        out: list[str] = [""] * len(requests)
        bar = self._bar(len(requests), "mm generate_until")
        prepared = []
        for r in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
            prepared.append((self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split)),
                             dict(gen_kwargs or {})))
        groups = grouped(prepared, lambda p: (repr(sorted(p[1].items())), p[0][1] is None))
        for idx in groups.values():
            kw = dict(prepared[idx[0]][1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_new_tokens", None) or kw.pop("max_gen_toks", None) or self.max_new_tokens)
            if _bool(kw.pop("do_sample", False)) or float(kw.pop("temperature", 0) or 0) > 0:
                raise ValueError("mm's lmms-eval model decodes greedily; drop do_sample / temperature")
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                rows = [prepared[i][0][0] for i in part]
                pix = None if prepared[part[0]][0][1] is None else [prepared[i][0][1] for i in part]
                toks = self.handle.generate(rows, pixel_values=pix, workflow=self.workflow, max_new_tokens=max_new,
                                            stop_tokens=self.stops)
                for i, t in zip(part, toks):
                    text = self._decode(t)
                    for u in until:
                        text = text.split(u)[0] if u else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                bar.update(len(part))
        bar.close()
        return out

    def _decode(self, toks: Any) -> str:
        keep = []
        for t in np.asarray(toks).tolist():
            if t in self.stops:
                break
            keep.append(t)
        return self.tok.decode(keep, skip_special_tokens=True).strip()

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        """(mean NLL of the target's tokens, greedy) per request, each wrapped in lmms-eval's `GenerationResult`:
        lmms-eval 0.7.3 turns any other non-string answer into its `str()` before scoring
        (`unwrap_generation_output`), which breaks its own multiple-choice scoring; the wrapper's payload reaches
        the task unchanged."""
        from lmms_eval.api.instance import GenerationResult

        out: list[Any] = []
        bar = self._bar(len(requests), "mm loglikelihood")
        for r in requests:  # one at a time: rows differ in images and length; multiple choice is small
            context, doc_to_target, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            target = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            ids, pix = self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split))
            cont = list(self.tok(str(target), add_special_tokens=False)["input_ids"])
            logits = self.handle.logits([ids + cont], pixel_values=None if pix is None else [pix],
                                        workflow=self.workflow)[0].astype(np.float64)
            sel = logits[len(logits) - len(cont) - 1:len(logits) - 1]
            logp = sel - sel.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            res = (-float(sum(logp[k, t] for k, t in enumerate(cont))) / len(cont),
                   bool(all(int(np.argmax(sel[k])) == t for k, t in enumerate(cont))))
            out.append(GenerationResult(text=res))  # type: ignore[arg-type]
            self.cache_hook.add_partial("loglikelihood", (context, target), res)
            bar.update(1)
        bar.close()
        return out

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("mm's lmms-eval model answers single-round requests")
