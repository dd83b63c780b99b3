"""The BPO run (`mm-train --config=configs/bpo.py --workdir=/tmp/mm-bpo`): DESIGN.md section 5's bootstrapped
preference optimisation in the demo's world, end to end on a CPU.

    data -> base LLM -> IAA (the demo's stages; or `start_workdir`, a finished demo run, is reused)
    -> BPO negatives of the IAA model (`mm.bpo`: answers from DDPM-weakened images, and its frozen base LLM's
       error-injected rewrites) on new training images and on held-out images
    -> DPO of the IAA branch on the training pairs (`data.kind=preference`, the base frozen)
    -> held-out preference metrics before / after (`mm.preference_eval`, by negative method), the text
       workflow checked unchanged bit for bit, QA accuracy before / after on the demo's test questions
    -> WORKDIR/bpo.md, WORKDIR/results.json, WORKDIR/plots/bpo.png

Splits: `data/bpo/train.json` (negatives -> DPO training pairs) and `data/bpo/eval.json` (negatives -> the
held-out pairs, also the DPO run's eval set) are scenes no SFT row shows, from the config's seed. Re-running
into the same workdir resumes: trained stages train no further, finished negatives are kept (`mm.bpo` chunks).
Each training stage is an ordinary run: `mm-train --config=configs/bpo.py:STAGE,WORKDIR --workdir=...` with
STAGE base, iaa or dpo.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from demo_app import demo_run
from demo_app import stages

QUICK = dict(negatives=dict(train_images=24, heldout_images=8, max_new_tokens=8), preference=dict(steps=16))
_log = demo_run._log
STAGES = ("base", "iaa", "dpo")


def resolve(c: Any) -> ml_collections.ConfigDict:
    """The effective config (`quick` applied, as the demo's, plus the BPO run's own sections), unlocked copy."""
    c = demo_run.resolve(c)
    if c.quick:
        for section, values in QUICK.items():
            c[section].update(values)
    return c


def sft_workdir(c: Any, workdir: str | Path) -> Path:
    """Where the base and IAA stages are: `start_workdir` (a finished demo run) or this run's own."""
    return Path(c.start_workdir or workdir).absolute()


def paths(workdir: str | Path, c: Any) -> dict[str, Path]:
    w = Path(workdir).absolute()
    s = stages.paths(sft_workdir(c, w))
    return {"sft": sft_workdir(c, w), "base_export": s["base_export"], "iaa": s["iaa"],
            "start": s["iaa_export"], "test_items": s["shapes"] / "eval_items.json", "test_images": s["images"],
            "bpo_data": w / "data" / "bpo", "pairs": w / "bpo" / "pairs.jsonl",
            "heldout_pairs": w / "bpo" / "heldout_pairs.jsonl", "dpo": w / "dpo", "dpo_export": w / "dpo" / "export",
            "plots": w / "plots"}


def stage_config(c: Any, stage: str, workdir: str | Path) -> ml_collections.ConfigDict:
    """The training config of `stage` (base, iaa: the demo's; dpo: the IAA branch on the BPO pairs)."""
    c = resolve(c)
    if stage not in STAGES:
        raise ValueError(f"configs/bpo.py: unknown stage {stage!r}; choose one of {STAGES}")
    p = paths(workdir, c)
    cfg = stages.stage_config(c, "iaa" if stage == "dpo" else stage, p["sft"])
    if stage != "dpo":
        return cfg
    pr = c.preference
    cfg.name = "bpo_dpo"
    cfg.init.checkpoint = str(p["iaa"])  # the IAA branch and projector the SFT stage trained
    cfg.data.update(dict(kind="preference", path=str(p["pairs"]), eval_path=str(p["heldout_pairs"]),
                         image_root=str(p["bpo_data"] / "images"), pack=False, max_tiles_per_row=1,
                         seed=int(c.seed) + 20, eval_seed=int(c.seed) + 21))
    cfg.dpo.update(dict(loss_type=list(pr.loss_type), loss_weights=[float(w) for w in pr.loss_weights],
                        beta=float(pr.beta),
                        precompute_reference=bool(pr.precompute_reference)))
    steps = int(pr.steps)
    cfg.train.update(dict(steps=steps, batch_size=int(pr.batch_size), seq_len=int(pr.seq_len),
                          log_every=max(1, steps // 10), eval_every=max(1, steps // 4), eval_batches=1))
    cfg.optim.update(dict(lr=float(pr.lr), warmup_frac=0.1, min_lr_ratio=0.1))
    return cfg


def check(c: Any, workdir: str | Path) -> None:
    """ConfigError naming the key for anything wrong, before any work (every stage's config included)."""
    from mm.bpo import METHODS
    from mm.config import ConfigError
    from mm.train import schema as tcfg

    c = resolve(c)
    w = Path(workdir).absolute()
    n = c.negatives
    if not n.methods or any(m not in METHODS for m in n.methods):
        raise ConfigError(f"config key negatives.methods = {tuple(n.methods)}: choose from {METHODS}")
    for key in ("train_images", "heldout_images", "max_new_tokens", "batch_size"):
        if int(n[key]) <= 0:
            raise ConfigError(f"config key negatives.{key} = {n[key]} must be positive")
    if not 0 <= int(n.t) < 1000:
        raise ConfigError(f"config key negatives.t = {n.t}: the diffusion step must be in [0, 1000)")
    if c.start_workdir:
        if c.init.llm_checkpoint:
            raise ConfigError("config keys start_workdir and init.llm_checkpoint: give one (a demo run's "
                              "workdir holds its base)")
        p = paths(w, c)
        for key in ("start", "iaa", "test_items"):
            if not p[key].exists():
                raise ConfigError(f"config key start_workdir = {c.start_workdir!r}: no {p[key]} (a finished "
                                  "`mm-train --config=configs/demo.py` workdir is expected)")
    p = paths(w, c)
    made = {str(x) for x in stages.paths(p["sft"]).values()}
    made |= {str(p[k]) for k in ("pairs", "heldout_pairs", "iaa")} | {str(p["bpo_data"] / "images")}
    for stage in ([] if c.start_workdir else ([] if c.init.llm_checkpoint else ["base"]) + ["iaa"]) + ["dpo"]:
        try:
            tcfg.validate(stage_config(c, stage, w), pending_paths=made)
        except ConfigError as e:
            raise ConfigError(f"stage {stage} (configs/bpo.py:{stage}): {e}") from e


def make_negatives(c: Any, p: dict[str, Path]) -> dict[str, Any]:
    """The BPO splits' scenes, and the IAA start's negatives for both; the `mm.bpo` summaries by split."""
    from mm import bpo
    from demo_app import shapes

    n, d = c.negatives, c.data
    sd = shapes.write(p["bpo_data"], int(n.train_images), int(n.heldout_images), seed=int(c.seed) + 500,
                      min_side=int(d.min_side), max_side=int(d.max_side), max_objects=int(d.max_objects),
                      train_kinds=tuple(d.train_kinds), rounds=tuple(n.rounds), scale=tuple(d.object_scale),
                      max_aspect=float(d.max_aspect), grounding_rate=float(d.grounding_rate))
    out = {}
    for split, rows, dst, seed in (("train", sd.train_json, p["pairs"], int(n.seed)),
                                   ("heldout", sd.eval_json, p["heldout_pairs"], int(n.seed) + 1)):
        dst.parent.mkdir(parents=True, exist_ok=True)
        out[split] = bpo.negatives(p["start"], rows, image_root=sd.image_root, out=dst, methods=tuple(n.methods),
                                   t=int(n.t), seed=seed, temperature=float(n.temperature), top_p=float(n.top_p),
                                   inject_temperature=float(n.inject_temperature), inject_top_p=float(n.inject_top_p),
                                   max_new_tokens=int(n.max_new_tokens), batch_size=int(n.batch_size), log=_log)
    return out


def _subset(lp: dict[str, Any], keep: list[bool]) -> dict[str, Any]:
    return {k: ([x for x, y in zip(v, keep) if y] if k == "ids" else v if k == "skipped" else v[np.array(keep)])
            for k, v in lp.items()}


def preference_results(c: Any, p: dict[str, Path], load: Any) -> dict[str, Any]:
    """Held-out preference metrics of the start (against itself) and of the DPO export (against the start),
    on all held-out pairs and by negative method."""
    from mm import preference_eval as pe

    image_root = str(p["bpo_data"] / "images")
    pairs = [json.loads(x) for x in p["heldout_pairs"].read_text().splitlines()]
    kw = dict(image_root=image_root, batch_size=int(c.negatives.batch_size), max_len=int(c.preference.seq_len))
    start = pe.pair_logps(load(p["start"]), pairs, **kw)
    after = pe.pair_logps(load(p["dpo_export"]), pairs, **kw)
    method = {r["id"]: r["bpo"]["method"] for r in pairs}
    out: dict[str, Any] = {}
    for name in ["all", *c.negatives.methods]:
        keep = [name == "all" or method[i] == name for i in start["ids"]]
        if not any(keep):
            continue
        s, a = _subset(start, keep), _subset(after, keep)
        out[name] = {"before": pe.metrics(s, s, float(c.preference.beta)),
                     "after": pe.metrics(a, s, float(c.preference.beta))}
    return out


def text_unchanged(p: dict[str, Path], load: Any, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """The DPO export's frozen base params against the start's (bitwise), and its text-workflow logits on
    `texts` against the start's (max |difference|)."""
    import jax

    from mm.train import param_groups as pg

    def text_side(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
        h = load(path)
        base = {k: np.asarray(v) for k, v in pg.flatten(jax.device_get(h.params["base"])).items()}
        ids = [tokenizer(t)["input_ids"] for t in texts]
        n = max(len(x) for x in ids)
        batch = np.array([x + [x[-1]] * (n - len(x)) for x in ids], np.int32)
        return base, np.asarray(h.logits(batch, workflow="text"), np.float32)

    b0, l0 = text_side(p["start"])
    b1, l1 = text_side(p["dpo_export"])
    same = sorted(b0) == sorted(b1) and all(np.array_equal(b0[k], b1[k]) for k in b0)
    return {"base_params_identical": bool(same), "base_tensors": len(b0),
            "text_logits_max_abs_diff": float(np.max(np.abs(l0 - l1))), "text_prompts": len(texts),
            "text_tokens": int(l0.shape[0] * l0.shape[1])}


def run(c: Any, workdir: str | Path, *, devices: Any = None) -> dict[str, Any]:
    """Runs the whole BPO pipeline; returns what it writes to `WORKDIR/results.json`."""
    from transformers import AutoTokenizer

    from mm.data.pipeline import ImageTiler
    from demo_app import shapes
    from demo_app.data_dir import write_demo_data
    from demo_app.soups_run import SplitAccuracy
    from mm.heldout import Loader
    from mm.train.grain_source import data_config

    c = resolve(c)
    w, devices = demo_run.begin(c, workdir, devices, "bpo")
    p = paths(w, c)
    own = not c.start_workdir
    n, pr = c.negatives, c.preference
    gen = 0.02 * (n.train_images + n.heldout_images) * len(n.methods) * n.max_new_tokens
    parts = ([("data", 1.0 + 0.001 * c.data.mm_train_images), ("base", 0.2 * c.base.steps),
              ("iaa", 0.45 * c.mm.steps)] if own else []) + [
        ("negatives", gen), ("dpo", 1.2 * pr.steps), ("evaluate", 30.0), ("report", 2.0)]
    prog = demo_run.Progress(parts, "bpo")
    part = prog.run

    def stage(name: str, stage_dir: Path) -> None:
        demo_run.train_stage(name, stage_config(c, name, w), stage_dir, "configs/bpo.py", w, devices)

    if own:
        sp = stages.paths(w)
        part("data", lambda: write_demo_data(sp["data"], c.data, seed=int(c.seed), tokenizer=c.init.tokenizer,
                                             log=_log))
        if not c.init.llm_checkpoint:
            part("base", lambda: stage("base", sp["base"]))
        part("iaa", lambda: stage("iaa", sp["iaa"]))
    made = part("negatives", lambda: make_negatives(c, p))
    part("dpo", lambda: stage("dpo", p["dpo"]))

    def evaluate() -> dict[str, Any]:
        load = Loader()  # one handle: start and DPO export share its compiled functions
        tok = AutoTokenizer.from_pretrained(stages.tokenizer_dir(c, p["sft"]))
        pref = preference_results(c, p, load)
        from demo_app import text_task

        texts = [it.prompt for it in text_task.splits(8, 8, seed=int(c.seed) + 7)[1]]
        text = text_unchanged(p, load, tok, texts)
        tiler = ImageTiler(data_config(stage_config(c, "iaa", w), seed=0, local_rows=1))
        test = SplitAccuracy("test", shapes.read_eval_items(p["test_items"]), str(p["test_images"]), tiler, tok,
                             c, load)
        qa = {"before": test.details(p["start"]), "after": test.details(p["dpo_export"])}
        return {"preference": pref, "text_workflow": text, "test_accuracy": qa, "test_questions": len(test.items)}

    ev = part("evaluate", evaluate)
    train_rows = [json.loads(x) for x in (p["dpo"] / "metrics.jsonl").read_text().splitlines()]
    results = {"negatives": made, **ev,
               "dpo_curve": [{k: r[k] for k in ("step", "loss", "rewards/accuracies", "rewards/margins") if k in r}
                             for r in train_rows if r.get("kind") == "train"],
               "dpo_eval": [{"step": r["step"], "loss": r["loss"]} for r in train_rows if r.get("kind") == "eval_dpo"],
               "timings_s": dict(prog.timings), "wall_time_s": round(time.perf_counter() - prog.t0, 1)}
    part("report", lambda: write_report(w, c, results))
    _log(f"\nBPO run finished in {results['wall_time_s']:.0f} s; report: {w / 'bpo.md'}")
    return results


def _f(x: float, pct: bool = False) -> str:
    return f"{100 * x:.1f}%" if pct else f"{x:+.3f}"


def plot(results: dict[str, Any], out: Path, loss_types: tuple[str, ...] = ("sigmoid",)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pref = results["preference"]
    names = list(pref)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label, pct in ((axes[0], "preference/accuracy", "log p(chosen) > log p(rejected) (%)", True),
                                (axes[1], "preference/margin", "mean log-prob margin (nats)", False)):
        x = np.arange(len(names))
        for off, when in ((-0.2, "before"), (0.2, "after")):
            vals = [pref[n][when][key] * (100 if pct else 1) for n in names]
            ax.bar(x + off, vals, 0.4, label=f"{when} DPO")
        ax.set_xticks(x, [f"{n} ({pref[n]['after']['pairs']})" for n in names])
        ax.set_ylabel(label)
        ax.set_title("held-out BPO pairs", fontsize=9)
        ax.legend(fontsize=8)
    curve = results["dpo_curve"]
    axes[2].plot([r["step"] for r in curve], [r["loss"] for r in curve], label="train loss")
    ev = results["dpo_eval"]
    axes[2].plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="held-out loss")
    if tuple(loss_types) == ("sigmoid",):  # the value at policy == reference
        axes[2].axhline(np.log(2), color="grey", lw=0.8, ls="--", label="ln 2 (policy = reference)")
    axes[2].set_xlabel("DPO step")
    axes[2].set_ylabel(f"loss ({' + '.join(loss_types)})")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(workdir: Path, c: Any, results: dict[str, Any]) -> Path:
    p = paths(workdir, c)
    p["plots"].mkdir(exist_ok=True)
    plot(results, p["plots"] / "bpo.png", tuple(c.preference.loss_type))
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    rows = ["| held-out pairs | n | log-prob accuracy before -> after | margin (nats) before -> after | "
            "rewards/accuracies after | rewards/margins after |", "|" + " --- |" * 6]
    for name, r in results["preference"].items():
        b, a = r["before"], r["after"]
        rows.append(f"| {name} | {a['pairs']} | {_f(b['preference/accuracy'], True)} -> "
                    f"{_f(a['preference/accuracy'], True)} | {_f(b['preference/margin'])} -> "
                    f"{_f(a['preference/margin'])} | {_f(a['rewards/accuracies'], True)} | "
                    f"{_f(a['rewards/margins'])} |")
    neg = ["| split | rows | pairs kept | kept by method | dropped | skipped rows |", "|" + " --- |" * 6]
    for split, s in results["negatives"].items():
        neg.append(f"| {split} | {s['rows']} | {s['kept']} | "
                   + ", ".join(f"{m} {k}" for m, k in s["kept_by_method"].items()) + " | "
                   + (", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "none") + " | "
                   + (", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none") + " |")
    t = results["text_workflow"]
    qa = results["test_accuracy"]
    pr = c.preference
    weights = list(pr.loss_weights) or [1.0] * len(pr.loss_type)
    losses = " + ".join(f"{w:g} {t}" for t, w in zip(pr.loss_type, weights))
    lines = [
        "# mm BPO: self-made negatives and DPO on the IAA branch",
        "",
        f"Start: the IAA model of `{p['sft']}` (its base LLM frozen throughout). Negatives (`mm.bpo`): its answers "
        f"from images weakened by DDPM noise at t = {c.negatives.t} of 1000, and error-injected rewrites of the "
        "dataset answers by its own frozen LLM (the text workflow); the dataset answer is chosen, each negative "
        f"rejected. DPO ({losses}, beta {pr.beta}, {pr.steps} steps of {pr.batch_size} pairs, "
        f"lr {pr.lr}, reference = the start{', log-probs precomputed' if pr.precompute_reference else ''}) trains "
        "the IAA `mm` branch only.",
        "",
        "## Negatives",
        "",
        *neg,
        "",
        "## Held-out preference (scenes no training row shows)",
        "",
        "Before = the start; after = the DPO export, its rewards measured against the start.",
        "",
        *rows,
        "",
        "## What else changed",
        "",
        f"- Text workflow: the frozen base params of the DPO export are "
        f"{'bitwise identical to' if t['base_params_identical'] else 'DIFFERENT from'} the start's "
        f"({t['base_tensors']} tensors); text-workflow logits on {t['text_prompts']} prompts ({t['text_tokens']} "
        f"positions) differ by at most {t['text_logits_max_abs_diff']:.1e}.",
        f"- QA on the demo's {results['test_questions']} test questions (exact match, grounding IoU >= 0.5): "
        f"{_f(qa['before']['all'], True)} before, {_f(qa['after']['all'], True)} after.",
        "",
        "![bpo](plots/bpo.png)",
        "",
        f"Wall time {results['wall_time_s']:.0f} s; per part (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()) + ".",
        "",
    ]
    out = workdir / "bpo.md"
    out.write_text("\n".join(lines))
    return out
