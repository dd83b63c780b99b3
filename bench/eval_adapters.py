"""What the harness adapters add per item against calling the handle directly, on the same requests.

    VENV/bin/python bench/eval_adapters.py [--llm LLM_DIR --vlm VLM_DIR] [--items 64] [--batch-size 8]

(the `eval` extra's virtualenv, docs/evaluation.md; without dirs, the tests' tiny LLM and IAA VLM are built in a
temporary directory). lm-eval: a local multiple-choice task of `--items` questions x 4 choices through
`lm_eval.simple_evaluate(model="mm")` against the same (context, continuation) pairs batched through
`LLMHandle.logits` by hand; lmms-eval: a local short-answer task of `--items` images through
`lmms_eval.evaluator.simple_evaluate(model="mm")` against `VLMHandle.generate` on the same prompts and pixels in
the same batches. Each side runs twice and the second (compiled) run is timed; the harness side includes the
harness's own task building and scoring, as a user waits for it; "adapter" times the adapter's request method
alone on the same requests (tokenising, batching, decoding: what mm adds). Prints milliseconds per item.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = "the quick brown fox jumps over lazy dog a picture of cat sitting on red mat there are two people".split()


def _timed(fn, repeats: int = 2) -> float:
    for _ in range(repeats - 1):
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def lm_eval_side(llm: str, items: int, batch: int, root: Path) -> tuple[float, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import mm
    import mm.eval.harness_lm  # noqa: F401

    rs = np.random.RandomState(0)
    docs = [{"question": " ".join(rs.choice(WORDS, 8)), "choices": [" ".join(rs.choice(WORDS, 3)) for _ in range(4)],
             "answer": int(rs.randint(4))} for _ in range(items)]
    (root / "mc.json").write_text(json.dumps(docs))
    (root / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.json'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    tm = TaskManager(include_path=str(root))
    harness = _timed(lambda: lm_eval.simple_evaluate(model="mm", model_args=f"path={llm},batch_size={batch}",
                                                     tasks=["bench_mc"], task_manager=tm))
    h = mm.from_pretrained(llm)
    tok = h.tokenizer
    rows = []
    for d in docs:
        c = tok(d["question"], add_special_tokens=False)["input_ids"]
        for ch in d["choices"]:
            rows.append([tok.bos_token_id] + c + tok(" " + ch, add_special_tokens=False)["input_ids"][:])

    def direct() -> None:
        for k in range(0, len(rows), batch):
            part = rows[k:k + batch]
            width = -(-max(len(r) for r in part) // 32) * 32
            np.asarray(h.logits(part + [[tok.bos_token_id] * width] * (batch + 1 - len(part))))

    from types import SimpleNamespace

    from mm.eval.harness_lm import MMLM

    lm = MMLM(llm, batch_size=batch, progress=False)
    reqs = [SimpleNamespace(args=(d["question"], " " + ch)) for d in docs for ch in d["choices"]]
    adapter = _timed(lambda: lm.loglikelihood(reqs))
    return harness / items, adapter / items, _timed(direct) / items


def lmms_side(vlm: str, items: int, batch: int, root: Path) -> tuple[float, float]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from PIL import Image

    import mm
    from mm.answers import Prompter, stop_tokens
    from mm.eval.runner import Images, prompt_ids

    rs = np.random.RandomState(1)
    (root / "img").mkdir(exist_ok=True)
    docs = []
    for k in range(items):
        p = root / "img" / f"{k}.png"
        Image.fromarray(rs.randint(0, 255, (28 + k % 13, 28 + k % 7, 3), np.uint8)).save(p)
        docs.append({"image": str(p), "question": " ".join(rs.choice(WORDS, 6)), "answer": "x"})
    (root / "vqa.json").write_text(json.dumps(docs))
    (root / "utils.py").write_text("from PIL import Image\n\n\ndef doc_to_visual(doc):\n"
                                   "    return [Image.open(doc['image']).convert('RGB')]\n")
    (root / "bench_vqa.yaml").write_text(
        f"task: bench_vqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'vqa.json'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_target: \"answer\"\ngeneration_kwargs:\n  max_new_tokens: 8\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    tm = TaskManager(include_path=str(root))
    harness = _timed(lambda: simple_evaluate(model="mm", model_args=f"path={vlm},batch_size={batch},progress=0",
                                             tasks=["bench_vqa"], task_manager=tm))
    h = mm.from_pretrained(vlm)
    images, stops = Images(h, None, "square"), stop_tokens(h)
    prompter = Prompter(h.tokenizer, h.config.tokens_per_image)

    def direct() -> None:
        pix = [images.decoded(Image.open(d["image"]).convert("RGB"), d["image"])[0] for d in docs]
        ids = [prompt_ids(prompter, d["question"], h.image_token, 1) for d in docs]
        for k in range(0, items, batch):
            h.generate(ids[k:k + batch], pixel_values=pix[k:k + batch], max_new_tokens=8, stop_tokens=stops)

    from types import SimpleNamespace

    from mm.eval.harness_lmms import MMLMMs

    lmm = MMLMMs(vlm, batch_size=batch, progress=False)
    lmm.task_dict = {"t": {"test": docs}}

    def visual(doc: dict) -> list:
        return [Image.open(doc["image"]).convert("RGB")]

    reqs = [SimpleNamespace(args=(d["question"], {"max_new_tokens": 8}, visual, k, "t", "test"))
            for k, d in enumerate(docs)]
    adapter = _timed(lambda: lmm.generate_until(reqs))
    return harness / items, adapter / items, _timed(direct) / items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm")
    ap.add_argument("--vlm")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llm, vlm = args.llm, args.vlm
        if llm is None or vlm is None:
            from tests.helpers.vlm_dirs import tiny_llm_and_iaa

            llm, vlm = (str(p) for p in tiny_llm_and_iaa(root / "models"))
        (root / "lm").mkdir()
        (root / "lmms").mkdir()
        lm = lm_eval_side(llm, args.items, args.batch_size, root / "lm")
        lmms = lmms_side(vlm, args.items, args.batch_size, root / "lmms")
    print(f"CPUs: {os.cpu_count()}; {args.items} items, batch {args.batch_size}; ms per item")
    for name, (harness, adapter, direct) in (("lm-eval multiple choice (4 loglikelihood requests an item)", lm),
                                             ("lmms-eval short answer (1 image, 8 new tokens an item)", lmms)):
        print(f"{name}: whole harness run {harness * 1e3:.1f}, adapter method {adapter * 1e3:.1f}, handle "
              f"{direct * 1e3:.1f}; the adapter adds {(adapter - direct) * 1e3:.1f}, the harness around it "
              f"{(harness - adapter) * 1e3:.1f}")


if __name__ == "__main__":
    main()
