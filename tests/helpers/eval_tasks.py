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
