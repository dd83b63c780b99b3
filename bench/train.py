"""Train-step throughput: mm (JAX) versus PyTorch + transformers on the same architecture and batch, same run.

    python bench/train.py [--sizes tiny,100m] [--steps 3] [--no-compile]

Both sides train a LLaVA-style model (precomputed vision features -> mlp2x_gelu projector -> spliced into a
Llama decoder), everything trainable, AdamW, float32, on this machine's CPU. Prints tokens/s per side and the
ratio mm / torch (eager, and torch.compile when it works here). Timings exclude the first (compiling) step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_timing import LLM_100M, TINY  # noqa: E402

# name: llm shape, vision width, image tokens, batch, seq
SIZES = {"tiny": (TINY, 32, 4, 8, 64), "100m": (LLM_100M, 1024, 64, 4, 256)}


def mm_tokens_per_s(size: str, steps: int) -> tuple[float, int]:
    import jax

    from bench.step_timing import mean_step_seconds, synthetic_batches
    from mm.train import loop
    from mm.train.schema import base_config

    llm, vw, n_img, batch, seq = SIZES[size]
    c = base_config()
    c.model.kind = "llava"
    c.model.llm.update(llm)
    c.model.vision_width = vw
    c.data.kind = "synthetic_mm"
    c.data.num_image_tokens = n_img
    c.train.update(dict(batch_size=batch, seq_len=seq, steps=1000))
    c.init.prng_impl = "unsafe_rbg"
    c.optim.weight_decay = 0.01
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    n_params = sum(x.size for x in jax.tree.leaves(b.state["params"]))
    return batch * seq / mean_step_seconds(b, synthetic_batches(c, steps + 1)), n_params


def torch_tokens_per_s(size: str, steps: int, compile_: bool) -> float:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm.train.synthetic_source import example

    llm, vw, n_img, batch, seq = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
                      intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_layers"],
                      num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
                      head_dim=llm["head_dim"], max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    proj = torch.nn.Sequential(torch.nn.Linear(vw, llm["hidden_size"]), torch.nn.GELU(),
                               torch.nn.Linear(llm["hidden_size"], llm["hidden_size"]))
    params = list(model.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def step(ids, labels, mask, feats, img_mask):
        emb = model.get_input_embeddings()(ids.clamp(min=0))
        emb = torch.where(img_mask[..., None], torch.zeros_like(emb), emb)
        emb = emb.masked_scatter(img_mask[..., None].expand_as(emb), proj(feats).reshape(-1, emb.shape[-1]))
        logits = model(inputs_embeds=emb).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        loss = (loss * mask.flatten()).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    fn = torch.compile(step) if compile_ else step
    times = []
    for i in range(steps + 1):
        exs = [example(1234, i * batch + r, seq, llm["vocab_size"], n_img, vw) for r in range(batch)]
        t = {k: torch.from_numpy(np.stack([e[k] for e in exs])) for k in
             ("input_ids", "labels", "loss_mask", "image_features", "image_mask")}
        t0 = time.perf_counter()
        fn(t["input_ids"].long(), t["labels"].long(), t["loss_mask"], t["image_features"], t["image_mask"])
        times.append(time.perf_counter() - t0)
    return batch * seq / (sum(times[1:]) / steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,100m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    import torch

    print(f"CPU threads: torch {torch.get_num_threads()}, os {os.cpu_count()}")
    print(f"{'size':<6} {'params':>12} {'mm tok/s':>10} {'torch eager':>12} {'ratio':>7} {'torch.compile':>14} "
          f"{'ratio':>7}")
    for size in a.sizes.split(","):
        mm, n = mm_tokens_per_s(size, a.steps)
        eager = torch_tokens_per_s(size, a.steps, False)
        comp = None
        if not a.no_compile:
            try:
                comp = torch_tokens_per_s(size, a.steps, True)
            except Exception as e:  # noqa: BLE001 - report, don't fail the benchmark
                print(f"  torch.compile failed on this machine: {type(e).__name__}: {str(e)[:120]}")
        comp_s = "n/a" if comp is None else f"{comp:14,.0f}"
        ratio_c = "n/a" if comp is None else f"{mm / comp:6.2f}x"
        print(f"{size:<6} {n:>12,} {mm:>10,.0f} {eager:>12,.0f} {mm / eager:6.2f}x {comp_s:>14} {ratio_c:>7}",
              flush=True)


if __name__ == "__main__":
    main()
