"""Quickstart: the end-to-end path of mm on a tiny generated checkpoint, checked against transformers.

    python -m launch.quickstart --workdir /tmp/mm-quickstart

1. trains a tiny BPE tokenizer offline and builds a random Llama-3.1-shaped HF checkpoint (GQA, llama3 RoPE);
2. `mm-convert hf-to-mm`; 3. `mm.from_pretrained` on the mm checkpoint: logits on a 256-token prompt and greedy
tokens of a left-padded batch compared with transformers; 4. generates text; 5. `mm-convert mm-to-hf` and a
bit-exact comparison with the original tensors. Writes `summary.md` / `summary.json` into the workdir and exits
non-zero if any check fails. Needs the `test` extra (torch builds the reference checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _build_hf_checkpoint(dst: Path, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm import tiny

    tok = tiny.train_tokenizer()
    cfg = tiny.llama_hf_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    cfg.pop("model_type"), cfg.pop("architectures")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # larger-than-default weights so logits are not all near zero
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.ndim > 1 else p.uniform_(0.8, 1.2)
    model.save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))
    return model, tok


def run(workdir: Path, seed: int = 0) -> dict[str, Any]:
    import torch
    from safetensors.numpy import load_file

    import mm
    from launch.convert import main as mm_convert
    from mm.generate import left_pad

    t0 = time.time()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    hf_dir, mm_dir, back_dir = workdir / "hf", workdir / "mm", workdir / "hf_roundtrip"
    print(f"[1/5] building a tiny random Llama-3.1-shaped HF checkpoint in {hf_dir}", flush=True)
    ref, tok = _build_hf_checkpoint(hf_dir, seed)

    print(f"[2/5] mm-convert hf-to-mm --src {hf_dir} --dst {mm_dir}", flush=True)
    if mm_convert(["hf-to-mm", "--src", str(hf_dir), "--dst", str(mm_dir)]) != 0:
        raise SystemExit("quickstart: hf-to-mm failed")

    print("[3/5] mm.from_pretrained + parity with transformers", flush=True)
    model = mm.from_pretrained(mm_dir)
    rs = np.random.RandomState(seed)
    ids = rs.randint(7, len(tok), (2, 256))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.float().numpy()
    logit_err = float(np.abs(model.logits(ids) - expected).max())
    prompts = [tok(t)["input_ids"] for t in ("The red circle is", "What is 3 plus", "There are 4 stars in")]
    ours = model.generate(prompts, max_new_tokens=24, stop_tokens=())
    width = max(map(len, prompts))
    pad, att = left_pad(prompts, width, tok.pad_token_id)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(pad).long(), attention_mask=torch.tensor(att).long(), max_new_tokens=24,
                              do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)[:, width:].numpy()
    same_tokens = bool((ours == theirs).all())

    print("[4/5] generating text (greedy and top-p sampling)", flush=True)
    greedy = model.generate_text(["The red circle is"], max_new_tokens=16)[0]
    sampled = model.generate_text(["The red circle is"], max_new_tokens=16, temperature=0.8, top_p=0.95,
                                  seed=seed)[0]

    print(f"[5/5] mm-convert mm-to-hf --src {mm_dir} --dst {back_dir}", flush=True)
    if mm_convert(["mm-to-hf", "--src", str(mm_dir), "--dst", str(back_dir)]) != 0:
        raise SystemExit("quickstart: mm-to-hf failed")
    orig = load_file(str(hf_dir / "model.safetensors"))
    back: dict[str, np.ndarray] = {}
    for f in sorted(back_dir.glob("*.safetensors")):
        back.update(load_file(str(f)))
    identical = set(orig) == set(back) and all(
        orig[k].dtype == back[k].dtype and np.array_equal(orig[k], back[k]) for k in orig)

    n_params = sum(int(np.prod(v.shape)) for v in orig.values())
    summary = {
        "parameters": n_params,
        "max_abs_logit_diff_vs_transformers_256_tokens": logit_err,
        "greedy_tokens_equal_transformers_generate": same_tokens,
        "round_trip_bit_identical": identical,
        "greedy_text": greedy,
        "sampled_text": sampled,
        "seconds": round(time.time() - t0, 1),
    }
    summary["ok"] = logit_err <= 1e-4 and same_tokens and identical
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [("check", "result"), ("---", "---"),
            ("parameters", f"{n_params:,}"),
            ("max abs logit diff vs transformers (256 tokens, fp32)", f"{logit_err:.2e} (limit 1e-4)"),
            ("greedy tokens equal transformers generate (3 left-padded prompts x 24)", str(same_tokens)),
            ("HF -> mm -> HF round trip bit-identical", str(identical)),
            ("greedy text (random weights)", repr(greedy)),
            ("top-p text (random weights)", repr(sampled)),
            ("wall time", f"{summary['seconds']} s")]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    (workdir / "summary.md").write_text("# mm quickstart\n\n" + table + "\n")
    print("\n" + table + "\n", flush=True)
    print(f"quickstart: {'OK' if summary['ok'] else 'FAILED'}; summary in {workdir}/summary.md", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/mm-quickstart", help="output directory (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return 0 if run(Path(args.workdir), args.seed)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
