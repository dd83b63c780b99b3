"""The lm-evaluation-harness model `mm` (lm-eval 0.4, the `eval` extra):

    mm-eval lm-eval --model mm --model_args path=DIR,workflow=text,batch_size=8 --tasks TASKS [lm-eval flags]

or, in Python, `import mm.eval.harness_lm` then `lm_eval.simple_evaluate(model="mm", model_args=...)`.
lm-eval 0.4 has no plugin entry point for models, so the name exists in a process that imported this module;
`mm-eval lm-eval` is lm-eval's own command line with it imported first.

model_args: `path` (any dir `mm.from_pretrained` loads: HF / mm LLMs, IAA / LLaVA-style VLMs), `workflow`
(default "text": for IAA the frozen base LLM; "mm" without images for a LLaVA-style model, its trained LLM),
`batch_size`, `max_length`, `dtype`, `mesh` ("fsdp:-1/tensor:2": params sharded over every device), `bucket`
(width rounding of batches). Requests go to
`mm.eval.text_model.TextModel`: `loglikelihood`, `loglikelihood_rolling` and `generate_until` (greedy, stop
strings from `until`, `max_gen_toks`; sampling arguments are refused rather than ignored), each batched with a
progress bar; `apply_chat_template` renders with the checkpoint tokenizer's template (`--apply_chat_template`).
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mm.eval.text_model import TextModel, grouped


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("mm")
class MMLM(LM):
    def __init__(self, path: str, workflow: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 dtype: str | None = None, mesh: str | None = None, bucket: int = 32, progress: Any = True,
                 **unused: Any) -> None:
        super().__init__()
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.model = TextModel(str(path), workflow=workflow, batch_size=bs,
                               max_length=None if max_length is None else int(max_length), dtype=dtype, mesh=mesh,
                               bucket=int(bucket), progress=_bool(progress))
        self.path = str(path)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MMLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "MMLM":
        """`--model_args` win over lm-eval's own `--batch_size` (its other settings, device and
        max_batch_size, do not apply: the mesh places the model)."""
        extra = {k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}
        return cls(**{**extra, **arg_dict})

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = self.model.loglikelihood([tuple(r.args) for r in requests])
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = self.model.loglikelihood_rolling([r.args[0] for r in requests])
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups = grouped([r.args[1] for r in requests], lambda kw: repr(sorted(kw.items())))
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", 256)))
            if _bool(kw.pop("do_sample", False)) or float(kw.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError("mm's lm-eval model decodes greedily; drop do_sample / temperature from gen_kwargs")
            texts = self.model.generate([requests[i].args[0] for i in idx], until=until, max_new_tokens=max_new)
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.model.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)


def cli(argv: list[str]) -> int:
    """lm-eval's command line (`lm-eval [run] --model mm ...`) with this module's model registered."""
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0
