"""Local lm-evaluation-harness tasks (YAML over generated JSON files; nothing from a hub) for the adapter tests:
`mm_tiny_mc` (multiple choice: loglikelihood), `mm_tiny_gen` (generate_until with stop strings) and
`mm_tiny_ppl` (loglikelihood_rolling: word / byte perplexity), all in the group `mm_tiny`."""

from __future__ import annotations

import json
from pathlib import Path

MC = [{"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "red mat", "river"], "answer": 0},
      {"question": "a picture of a cat sitting on a", "choices": ["park", "red mat"], "answer": 1},
      {"question": "describe the scene in one", "choices": ["sentence please", "dog", "bicycle near"], "answer": 0},
      {"question": "there are two people and a", "choices": ["bicycle", "box"], "answer": 0}]
GEN = [{"question": "the quick brown", "answer": "fox"}, {"question": "user: what is in the image?", "answer": "a dog"},
       {"question": "the answer is", "answer": "42"}]
PPL = [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "there are two people and a bicycle near the "
                                                                          "river, describe the scene in one sentence"}]

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
{body}"""

_BODIES = {
    "mm_tiny_mc": ("multiple_choice", 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                   'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
    "mm_tiny_gen": ("generate_until", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                    'generation_kwargs:\n  until: [".", "\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
                    'metric_list:\n  - metric: exact_match\n'),
    "mm_tiny_ppl": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                    '  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n'),
}
TASKS = tuple(_BODIES)


def write_lm_eval_tasks(root: Path) -> Path:
    """The three task YAMLs and their JSON data under `root`; returns the directory to pass as include_path."""
    root.mkdir(parents=True, exist_ok=True)
    for task, rows in zip(TASKS, (MC, GEN, PPL)):
        data = root / f"{task}.json"
        data.write_text(json.dumps(rows))
        output_type, body = _BODIES[task]
        (root / f"{task}.yaml").write_text(_YAML.format(task=task, data=data, output_type=output_type, body=body))
    return root


# ------------------------------------------------------------------------------------------------ lmms-eval
_LMMS_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]
'''
# lmms-eval's tasks: the same YAML with the image and the prompt fields first (literal braces: Jinja's)
_LMMS_HEAD = 'doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: "{{question}}"\n'
_LMMS_BODIES = {
    "mm_tiny_vqa": ("generate_until", 'doc_to_target: "answer"\ngeneration_kwargs:\n  until: ["."]\n'
                    '  max_new_tokens: 5\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n'),
    "mm_tiny_vmc": ("multiple_choice", 'doc_to_choice: "{{choices}}"\ndoc_to_target: "answer"\n'
                    'metric_list:\n  - metric: acc\n'),
}
LMMS_TASKS = tuple(_LMMS_BODIES)


def write_lmms_eval_tasks(root: Path, sizes=((28, 28), (40, 28), (28, 50))) -> Path:
    """Two lmms-eval tasks over generated images (`root/img/*.png`, absolute paths in the JSON rows): a short
    answer (generate_until) and a multiple choice (loglikelihood); returns the include_path."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    rs = np.random.RandomState(3)
    rows = []
    for k, (w, h) in enumerate(sizes):
        path = root / "img" / f"v{k}.png"
        Image.fromarray(rs.randint(0, 255, (h, w, 3), np.uint8)).save(path)
        rows.append({"image": str(path), "question": f"what is in the image {k}?", "answer": "a dog",
                     "choices": ["a dog", "a red mat", "the river"], "label": k % 3})
    (root / "utils.py").write_text(_LMMS_UTILS)
    for task, (output_type, body) in _LMMS_BODIES.items():
        data = root / f"{task}.json"
        data.write_text(json.dumps([{**r, "answer": r["label"]} if task == "mm_tiny_vmc" else r for r in rows]))
        (root / f"{task}.yaml").write_text(_YAML.format(task=task, data=data, output_type=output_type,
                                                        body=_LMMS_HEAD + body))
    return root
