"""The demo pipeline `mm-train --config=configs/demo.py` runs: data -> base -> IAA and LLaVA-style -> evaluation
-> report, each stage an ordinary training run (`mm.train.loop.train`) in its own subdirectory of the workdir.

Re-running into the same workdir resumes: the data is regenerated identically, finished stages find their
final checkpoint and train no further steps, exports are rewritten atomically.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from mm.answers import stop_tokens, until_stop
from demo_app import evaluate as ev
from demo_app import stages, text_task

QUICK = dict(data=dict(text_train=400, text_eval=24, mm_train_images=120, mm_eval_images=6),
             base=dict(steps=12, batch_size=8, seq_len=96), mm=dict(steps=8, batch_size=8, seq_len=96),
             eval=dict(max_new_tokens=12, batch_size=32))


def _log(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class Progress:
    """Pipeline-level progress: which of the N parts runs, elapsed time, and an ETA from the parts' weights."""

    def __init__(self, parts: list[tuple[str, float]], name: str = "demo"):
        self.parts, self.name = parts, name
        self.total = sum(w for _, w in parts)
        self.done = 0.0
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}

    def start(self, name: str) -> None:
        k = [n for n, _ in self.parts].index(name)
        elapsed = time.perf_counter() - self.t0
        eta = f", ETA {elapsed / self.done * (self.total - self.done):.0f} s" if self.done else ""
        _log(f"\n=== {self.name} [{k + 1}/{len(self.parts)}] {name} (elapsed {elapsed:.0f} s{eta}) ===")

    def finish(self, name: str) -> None:
        self.done += dict(self.parts)[name]

    def run(self, name: str, fn: Any) -> Any:
        """`fn()` as part `name`: announced with the ETA, timed into `timings` (seconds)."""
        self.start(name)
        t = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t, 1)
        self.finish(name)
        return out


def resolve(demo: Any) -> ml_collections.ConfigDict:
    """The effective demo config (`quick` applied), unlocked copy."""
    c = ml_collections.ConfigDict(demo.to_dict())
    if c.quick:
        for section, values in QUICK.items():
            c[section].update(values)
    return c


def check(demo: Any, workdir: str | Path) -> None:
    """Raises ConfigError (naming the key) for anything wrong in the demo config, before any work: the given
    checkpoint paths, and every stage's training config (paths the pipeline will create are not checked)."""
    from mm.config import ConfigError
    from mm.train import schema as tcfg

    demo = resolve(demo)
    for key in ("llm_checkpoint", "vision_checkpoint", "tokenizer"):
        path = demo.init[key]
        if path and not Path(path).exists():
            raise ConfigError(f"config key init.{key} = {path!r}: no such file or directory")
    workdir = Path(workdir).absolute()
    made = {str(p) for p in stages.paths(workdir).values()}  # the pipeline writes these before they are read
    for stage in ([] if demo.init.llm_checkpoint else ["base"]) + ["iaa", "llava"]:
        try:
            tcfg.validate(stages.stage_config(demo, stage, workdir), pending_paths=made)
        except ConfigError as e:
            raise ConfigError(f"stage {stage} (configs/demo.py:{stage}): {e}") from e


def train_stage(stage: str, cfg: Any, stage_dir: Path, config_file: str, workdir: Path, devices: Any) -> None:
    """Trains one stage of a pipeline (an ordinary `mm-train` run in `stage_dir`; a finished one trains no
    further) and exports it to `stage_dir/export`; logs the command that reruns it by hand."""
    from mm.train.export import export_run
    from mm.train.loop import train  # validates the config before anything heavy

    _log(f"stage {stage}: the same run by hand: mm-train --config={config_file}:{stage},{workdir} "
         f"--workdir={stage_dir}")
    res = train(cfg, stage_dir, devices=devices)
    _log(f"stage {stage}: finished at step {res.last_step}; exporting to {stage_dir / 'export'}")
    export_run(stage_dir, stage_dir / "export", overwrite=True)


def begin(c: Any, workdir: str | Path, devices: Any, name: str) -> tuple[Path, list[Any]]:
    """(the absolute workdir, made; the devices: one by default) of a pipeline run whose effective config `c`
    is saved as `WORKDIR/{name}_config.json`."""
    import jax

    w = Path(workdir).absolute()
    w.mkdir(parents=True, exist_ok=True)
    (w / f"{name}_config.json").write_text(json.dumps(c.to_dict(), indent=2, sort_keys=True))
    return w, list(jax.devices()[:1] if devices is None else devices)


def run(demo: Any, workdir: str | Path, *, devices: Any = None) -> dict[str, Any]:
    """Runs the whole demo; returns the results written to `WORKDIR/results.json`."""
    from demo_app.data_dir import write_demo_data
    from demo_app.report import write_report

    demo = resolve(demo)
    workdir, devices = begin(demo, workdir, devices, "demo")
    real_llm = bool(demo.init.llm_checkpoint)
    # weights: seconds each part took on a 2-core CPU per unit of work; the ETA rescales them by the measured pace
    d = demo.data
    parts = [("data", 0.5 + 0.001 * (d.mm_train_images + d.mm_eval_images))]
    parts += [] if real_llm else [("base", 0.2 * demo.base.steps)]
    parts += [("iaa", 0.45 * demo.mm.steps), ("llava", 0.28 * demo.mm.steps),
              ("evaluate", 0.05 * (3 * d.text_eval + 8 * d.mm_eval_images) + 10.0), ("report", 2.0)]
    prog = Progress(parts)
    t0 = time.perf_counter()
    part = prog.run
    p = stages.paths(workdir)
    tok = demo.init.tokenizer or (stages.tokenizer_dir(demo, workdir) if real_llm else "")
    data = part("data", lambda: write_demo_data(p["data"], demo.data, seed=int(demo.seed), tokenizer=tok, log=_log))
    for stage in ([] if real_llm else ["base"]) + ["iaa", "llava"]:
        part(stage, lambda stage=stage: train_stage(stage, stages.stage_config(demo, stage, workdir), p[stage],
                                                    "configs/demo.py", workdir, devices))
    results = part("evaluate", lambda: evaluate_all(demo, workdir, data))
    results["timings_s"] = dict(prog.timings)
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    part("report", lambda: write_report(workdir, demo, results))
    _log(f"\ndemo finished in {results['wall_time_s']:.0f} s; report: {workdir / 'report.md'}")
    return results


def _count(params: Any, keys: tuple[str, ...]) -> int:
    import jax

    return int(sum(x.size for k in keys for x in jax.tree.leaves(params[k])))


def evaluate_all(demo: Any, workdir: Path, data: Any) -> dict[str, Any]:
    """Text-task exact match for base / IAA text workflow / LLaVA-style; multimodal QA and grounding for IAA
    and LLaVA-style; every model loaded from its exported directory with `mm.from_pretrained`."""
    import mm
    from mm.data.pipeline import ImageTiler
    from mm.train.grain_source import data_config

    p = stages.paths(workdir)
    e = demo.eval
    base = mm.from_pretrained(stages.base_llm_path(demo, workdir))
    iaa = mm.from_pretrained(p["iaa_export"])
    llava = mm.from_pretrained(p["llava_export"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data.tokenizer)
    stops = stop_tokens(base, tok)
    prompter = ev.Prompter(tok, iaa.config.tokens_per_image)
    text_prompts = [prompter(it.prompt, False, iaa.image_token) for it in data.text_items]
    kw = dict(batch=int(e.batch_size), max_new=int(e.max_new_tokens), stops=stops, log=_log)

    text_tokens = {
        "base": ev.generate_all(base.generate, text_prompts, desc="text / base", **kw),
        "iaa_text": ev.generate_all(lambda r, **k: iaa.generate(r, workflow="text", **k), text_prompts,
                                    desc="text / IAA text workflow", **kw),
        "llava": ev.generate_all(lambda r, **k: llava.generate(r, workflow="mm", **k), text_prompts,
                                 desc="text / LLaVA-style", **kw),
    }
    text_answers = {k: ev.decode(tok, v, stops) for k, v in text_tokens.items()}
    identical = sum(a == b for a, b in zip(until_stop(text_tokens["base"], stops),
                                           until_stop(text_tokens["iaa_text"], stops)))

    train_cfg = stages.stage_config(demo, "iaa", workdir)
    tiler = ImageTiler(data_config(train_cfg, seed=0, local_rows=1))
    items = data.mm_items
    pixels = ev.load_pixels(items, data.image_root, tiler)
    mm_answers = {}
    for name, h in (("iaa", iaa), ("llava", llava)):
        mm_answers[name] = ev.answer_items(h, items, pixels, prompter, tokenizer=tok, desc=f"multimodal / {name}",
                                           **kw)

    return {
        "text_exact_match": {k: text_task.exact_match(v, data.text_items) for k, v in text_answers.items()},
        "iaa_text_identical_to_base": {"identical": identical, "of": len(text_prompts)},
        "multimodal": {k: ev.score_mm(items, v) for k, v in mm_answers.items()},
        "counts": {"text_items": len(data.text_items), "mm_items": len(items),
                   "mm_by_kind": {k: sum(it.kind == k for it in items) for k in sorted({i.kind for i in items})}},
        "examples": {
            "text": [{"prompt": it.prompt, "reference": it.answer, **{k: v[i] for k, v in text_answers.items()}}
                     for i, it in enumerate(data.text_items[:6])],
            "multimodal": [{"image": it.image, "kind": it.kind, "question": it.question, "reference": it.answer,
                            **{k: v[i] for k, v in mm_answers.items()}} for i, it in enumerate(items[:10])],
        },
        "trainable_params": {"iaa": _count(iaa.params, ("mm",)), "llava": _count(llava.params, ("llm", "projector"))},
        "decoder_layers": {"base": base.config.num_layers, "llava": llava.config.lm.llm.num_layers,
                           "iaa_mm": iaa.config.lm.llm.num_layers + len(iaa.config.lm.branches[0].positions)},
        "sources": {"base": stages.base_llm_path(demo, workdir), "iaa": str(p["iaa_export"]),
                    "llava": str(p["llava_export"])},
    }
