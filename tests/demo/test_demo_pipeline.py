"""The README's main job, shortened (`--config.quick=True`): `mm-train --config=configs/demo.py` runs data ->
base -> IAA and LLaVA-style -> evaluation -> report; then the same pipeline on tiny random HF checkpoints
(a Llama LLM and a CLIP tower) instead of the generated base, as a user with real weights would run it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.demo.pipeline_runs import mm_train, quick_run as run_quick


def _mm_train(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    return mm_train("configs/demo.py", workdir, *flags)


def _check_report(workdir: Path) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    report = (workdir / "report.md").read_text()
    assert "| model | text-task exact match | multimodal QA accuracy | grounding Acc@0.5 |" in report
    for png in ("training_curves.png", "accuracy.png"):
        assert (workdir / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same = results["iaa_text_identical_to_base"]
    assert same["of"] > 0 and same["identical"] == same["of"], same  # frozen base: the same answers
    em = results["text_exact_match"]
    assert em["iaa_text"] == em["base"]
    for model in ("iaa", "llava"):
        r = results["multimodal"][model]
        assert set(r) >= {"qa", "grounding_acc@0.5", "colour", "count"} and all(0 <= v <= 1 for v in r.values())
    assert f"**{same['identical']} of {same['of']}**" in report
    return results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_quick("configs/demo.py", tmp_path_factory.mktemp("demo") / "run")


def test_quick_demo_runs_end_to_end_and_reports(quick_run):
    w, out = quick_run
    results = _check_report(w)
    for part in ("data", "base", "iaa", "llava", "evaluate", "report"):
        assert f"] {part} (elapsed" in out  # pipeline progress
    assert "ETA" in out and "step     12/12" in out  # per-step progress of the stages
    curve = [json.loads(x) for x in (w / "base" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in curve if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses  # the base LLM learns
    assert results["counts"]["text_items"] == 24 and results["counts"]["mm_items"] > 0


def test_quick_demo_checkpoints_load_with_from_pretrained(quick_run):
    import mm
    from mm.api import LLMHandle, VLMHandle

    w, _ = quick_run
    base = mm.from_pretrained(w / "base" / "export")
    iaa = mm.from_pretrained(w / "iaa" / "export")
    llava = mm.from_pretrained(w / "llava" / "export")
    assert isinstance(base, LLMHandle) and isinstance(iaa, VLMHandle) and isinstance(llava, VLMHandle)
    assert set(iaa.config.workflows) == {"text", "mm"} and llava.config.workflows == ("mm",)
    ids = base.tokenizer("Reverse the words: sun moon tree")["input_ids"]
    # the IAA text workflow is the frozen base LLM, bit for bit; the LLaVA-style LLM was trained
    assert np.array_equal(iaa.logits([ids], workflow="text"), base.logits([ids]))
    assert not np.allclose(llava.logits([ids], workflow="mm"), base.logits([ids]), atol=1e-3)
    rerun = _mm_train(w)  # a second run into the same workdir resumes: nothing retrains, report rewritten
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "step      1/" not in rerun.stdout


def test_demo_config_errors_stop_before_any_work(tmp_path):
    w = tmp_path / "bad"
    for flag, line in [
        ("--config.init.llm_checkpoint=/nonexistent/llm",
         "config key init.llm_checkpoint = '/nonexistent/llm': no such file or directory"),
        ("--config.model.iaa_positions=(0, 7)",  # the demo's LLM has 4 layers
         "stage iaa (configs/demo.py:iaa): config key model.iaa_positions = [0, 7]: [7] not in [0, 4)"),
        ("--config.mm.stepz=3", "unknown config key 'mm.stepz' (did you mean: mm.steps?)"),
    ]:
        proc = _mm_train(w, flag)
        assert (proc.returncode, proc.stderr) == (2, f"mm-train: error: {line}\n"), proc.stderr[-2000:]
    assert not w.exists()  # stopped before generating anything


def test_demo_on_converted_hf_checkpoints(tmp_path):
    """A tiny random HF Llama (with its own tokenizer) and a tiny HF CLIP tower replace the generated base and
    the random ViT: the base stage is skipped, both models load them, and the IAA text workflow still
    answers exactly as the HF LLM does."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import mm
    from mm.convert.registry import load
    from tests.helpers.hf_models import make_llama

    llm = make_llama(tmp_path, "gqa", tokenizer=True, max_position_embeddings=1024)
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()
    clip.save_pretrained(str(tmp_path / "clip"))
    w = tmp_path / "run"
    proc = _mm_train(w, f"--config.init.llm_checkpoint={llm}", f"--config.init.vision_checkpoint={tmp_path / 'clip'}",
                     "--config.mm.seq_len=256", "--config.eval.max_new_tokens=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "] base (elapsed" not in proc.stdout  # the given LLM is the base
    _check_report(w)
    iaa = mm.from_pretrained(w / "iaa" / "export")
    _, hf_params = load(tmp_path / "clip")
    got = iaa.params["vision"]["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"]
    assert np.array_equal(np.asarray(got), hf_params["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"])
    base = mm.from_pretrained(llm)
    ids = base.tokenizer("Reverse the words: sun moon")["input_ids"]
    assert np.array_equal(iaa.logits([ids], workflow="text"), base.logits([ids]))
