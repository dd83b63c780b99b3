"""The soup run (`mm-train --config=configs/soups.py --workdir=/tmp/mm-soups`): DESIGN.md section 4's model soups
in the demo's world, end to end on a CPU.

    data -> base LLM -> a shared IAA start (every question kind) -> one IAA branch per mixture, each fine-tuned
    from that start on its own mixture of question kinds -> average / maximum / greedy soups of the branches
    (`mm.soup`, scored on the validation split) -> test accuracy of the start, every ingredient and every soup
    -> WORKDIR/soups.md, WORKDIR/results.json, WORKDIR/plots/soups.png

Splits, each on images no training row shows:
  - validation (`data/val/eval_items.json`): the split soups are scored and chosen on;
  - test (`data/shapes/eval_items.json`, the demo's held-out questions): only for the final table.
Scores are the pooled accuracy over all of a split's questions (QA exact match, grounding IoU >= 0.5), greedy
decoding, every model loaded from disk with `mm.from_pretrained` as a user would.

Layout under WORKDIR: the demo's `data/` and `base/`, `start/`, `ingredients/NAME/` (each with `export/`),
`data/mix/NAME/` (a mixture's training rows), `soups/METHOD/` (each an mm checkpoint plus `soup_report.*`).
Re-running into the same workdir resumes: trained stages train no further, finished soups are kept.
Each training stage is an ordinary run: `mm-train --config=configs/soups.py:STAGE,WORKDIR --workdir=...`, with
STAGE base, start or a mixture's name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections

from mm.answers import stop_tokens
from demo_app import evaluate as ev
from demo_app import demo_run
from demo_app import shapes, stages

QUICK = dict(val_images=4, ingredient=dict(steps=4))
QUICK_MIX_IMAGES = 24
_log = demo_run._log


def resolve(c: Any) -> ml_collections.ConfigDict:
    """The effective config (`quick` applied, as the demo's, plus the soup run's own sections), unlocked copy."""
    c = demo_run.resolve(c)
    if c.quick:
        c.val_images = QUICK["val_images"]
        c.ingredient.update(QUICK["ingredient"])
        for m in c.mixtures.values():
            m.images = QUICK_MIX_IMAGES
    return c


def paths(workdir: str | Path, c: Any) -> dict[str, Any]:
    w = Path(workdir)
    p = stages.paths(w)
    p.update(start=w / "start", start_export=w / "start" / "export", val=w / "data" / "val",
             soups=w / "soups", plots=w / "plots")
    p["mix"] = {name: w / "data" / "mix" / name for name in c.mixtures}
    p["ingredients"] = {name: w / "ingredients" / name for name in c.mixtures}
    return p


def stage_config(c: Any, stage: str, workdir: str | Path) -> ml_collections.ConfigDict:
    """The training config of `stage` (base, start or a mixture's name) of a soup run in `workdir`."""
    c = resolve(c)
    w = Path(workdir)
    if stage == "base":
        return stages.stage_config(c, "base", w)
    cfg = stages.stage_config(c, "iaa", w)  # the demo's IAA stage: every question kind, data/shapes/train_ar
    cfg.name = f"soups_{stage}"
    if stage == "start":
        return cfg
    names = list(c.mixtures)
    if stage not in names:
        raise ValueError(f"configs/soups.py: unknown stage {stage!r}; choose base, start or one of {names}")
    p = paths(w, c)
    cfg.init.checkpoint = str(p["start"])  # the `mm` branch and projector the start trained
    cfg.data.update(dict(path=str(p["mix"][stage] / "train_ar"), image_root=str(p["mix"][stage] / "images"),
                         seed=int(c.seed) + 10 + names.index(stage)))
    cfg.train.update(dict(steps=int(c.ingredient.steps), log_every=max(1, int(c.ingredient.steps) // 10)))
    cfg.optim.update(dict(lr=float(c.ingredient.lr)))
    return cfg


def check(c: Any, workdir: str | Path) -> None:
    """ConfigError naming the key for anything wrong, before any work (every stage's config included)."""
    from mm.config import ConfigError
    from mm.soup import check_options
    from mm.train import schema as tcfg

    c = resolve(c)
    if c.init.llm_checkpoint or c.init.vision_checkpoint:
        raise ConfigError("configs/soups.py: init.llm_checkpoint / init.vision_checkpoint are not supported by the "
                          "soup run (it trains its own base); use mm-soup on your own fine-tuned checkpoints")
    if len(c.mixtures) < 2:
        raise ConfigError(f"config key mixtures: a soup needs at least two ingredients, got {list(c.mixtures)}")
    for name, m in c.mixtures.items():
        bad = [k for k in m.kinds if k not in shapes.KINDS]
        if not m.kinds or bad:
            raise ConfigError(f"config key mixtures.{name}.kinds = {tuple(m.kinds)}: choose from {shapes.KINDS}")
        if int(m.images) <= 0:
            raise ConfigError(f"config key mixtures.{name}.images = {m.images} must be positive")
    if int(c.val_images) <= 0:
        raise ConfigError(f"config key val_images = {c.val_images} must be positive")
    for method in c.soup.methods:
        try:
            check_options(method, len(c.mixtures), int(c.soup.top_p) if method == "maximum" else None,
                          str(c.soup.accept) if method == "greedy" else None, have_scorer=True)
        except ConfigError as e:
            raise ConfigError(f"config key soup ({method}): {e}") from e
    made = {str(x) for x in stages.paths(Path(workdir).absolute()).values()}
    p = paths(Path(workdir).absolute(), c)
    made |= {str(p["start"])} | {str(d / sub) for d in p["mix"].values() for sub in ("train_ar", "images")}
    for stage in ["base", "start", *c.mixtures]:
        try:
            tcfg.validate(stage_config(c, stage, Path(workdir).absolute()), pending_paths=made)
        except ConfigError as e:
            raise ConfigError(f"stage {stage} (configs/soups.py:{stage}): {e}") from e


def write_mixtures(c: Any, p: dict[str, Any]) -> None:
    """Each mixture's training rows (its question kinds only, its own images) packed to ArrayRecord, and the
    validation split's questions, all from the config's seed."""
    from mm.data.pack import pack_llava, summary

    d = c.data
    common = dict(min_side=int(d.min_side), max_side=int(d.max_side), max_objects=int(d.max_objects),
                  scale=tuple(d.object_scale), max_aspect=float(d.max_aspect), rounds=tuple(d.rounds))
    val = shapes.write(p["val"], 0, int(c.val_images), seed=int(c.seed) + 1000, **common)
    _log(f"data: validation split {c.val_images} images, {len(val.eval_items)} questions -> {p['val']}")
    for k, (name, m) in enumerate(c.mixtures.items()):
        sd = shapes.write(p["mix"][name], int(m.images), 0, seed=int(c.seed) + 100 + k, train_kinds=tuple(m.kinds),
                          grounding_rate=float(m.get("grounding_rate", d.grounding_rate)), **common)
        _, counter = pack_llava(sd.train_json, sd.image_root, str(p["mix"][name] / "train_ar"), progress=False,
                                prefix="train")
        _log(f"data: mixture {name} ({', '.join(m.kinds)}): {summary(counter).splitlines()[0]}")
        if counter.skipped:
            raise ValueError(f"{sd.train_json}: {counter.skipped} generated rows failed their checks")


class SplitAccuracy:
    """`scorer(checkpoint_dir) -> float`: pooled accuracy of a VLM checkpoint on one split's questions (what
    `mm.soup` calls); `details(dir)` gives it per question kind too. Results are cached per directory."""

    def __init__(self, name: str, items: list[shapes.MMItem], image_root: str, tiler: Any, tokenizer: Any,
                 c: Any, load: Any):
        self.name, self.items, self.tokenizer, self.c, self.load = name, items, tokenizer, c, load
        self.pixels = ev.load_pixels(items, image_root, tiler)
        self.cache: dict[str, dict[str, float]] = {}

    def details(self, path: str | Path) -> dict[str, float]:
        key = str(Path(path).absolute())
        if key not in self.cache:
            h = self.load(path)
            stops = stop_tokens(h, self.tokenizer)
            prompter = ev.Prompter(self.tokenizer, h.config.tokens_per_image)
            answers = ev.answer_items(h, self.items, self.pixels, prompter,
                                      tokenizer=self.tokenizer, desc=f"{self.name} / {Path(path).name}",
                                      batch=int(self.c.eval.batch_size), max_new=int(self.c.eval.max_new_tokens),
                                      stops=stops, log=lambda _: None)
            correct = [shapes.answer_correct(it, a) for it, a in zip(self.items, answers)]
            out = ev.score_mm(self.items, answers)
            out["all"] = sum(correct) / len(correct)
            self.cache[key] = out
            _log(f"eval {self.name}: {Path(path).parent.name}/{Path(path).name}: {100 * out['all']:.1f}% of "
                 f"{len(correct)} questions")
        return self.cache[key]

    def __call__(self, path: str) -> float:
        return self.details(path)["all"]


def _soup_done(dst: Path, inputs: list[Path]) -> bool:
    from mm.soup import REPORT_JSON

    r = dst / REPORT_JSON
    return r.exists() and [x["path"] for x in json.loads(r.read_text())["ingredients"]] == [
        str(p.absolute()) for p in inputs]


def make_soups(c: Any, p: dict[str, Any], scorer: Callable[[str], float]) -> dict[str, dict[str, Any]]:
    """Every configured soup of the ingredients' exports under `soups/METHOD`; the mm.soup reports by method."""
    from mm.soup import REPORT_JSON, soup

    inputs = [p["ingredients"][n] / "export" for n in c.mixtures]
    out = {}
    for method in c.soup.methods:
        dst = p["soups"] / method
        if not _soup_done(dst, inputs):
            opts = ({"top_p": int(c.soup.top_p)} if method == "maximum" else
                    {"accept": str(c.soup.accept)} if method == "greedy" else {})
            soup(inputs, dst, method=method, scorer=scorer, overwrite=True, **opts)
        out[method] = json.loads((dst / REPORT_JSON).read_text())
        _log(f"soup {method}: {len(out[method]['final']['members'])} of {len(inputs)} ingredients, validation "
             f"score {out[method]['final']['score']:.3f}")
    return out


def run(c: Any, workdir: str | Path, *, devices: Any = None) -> dict[str, Any]:
    """Runs the whole soup pipeline; returns what it writes to `WORKDIR/results.json`."""
    from transformers import AutoTokenizer

    from mm.data.pipeline import ImageTiler
    from demo_app.data_dir import write_demo_data
    from mm.heldout import Loader
    from mm.train.grain_source import data_config

    c = resolve(c)
    w, devices = demo_run.begin(c, workdir, devices, "soups")
    p = paths(w, c)
    n_mix = len(c.mixtures)
    parts = [("data", 1.0 + 0.002 * sum(int(m.images) for m in c.mixtures.values())),
             ("base", 0.2 * c.base.steps), ("start", 0.45 * c.mm.steps),
             *[(f"ingredient {n}", 0.45 * c.ingredient.steps) for n in c.mixtures],
             ("soups", 12.0 * (2 * n_mix)), ("evaluate", 12.0 * (2 * n_mix + 1)), ("report", 2.0)]
    prog = demo_run.Progress(parts, "soups")
    part = prog.run

    def stage(name: str, stage_dir: Path) -> None:
        demo_run.train_stage(name, stage_config(c, name, w), stage_dir, "configs/soups.py", w, devices)

    def data() -> Any:
        d = write_demo_data(p["data"], c.data, seed=int(c.seed), log=_log)
        write_mixtures(c, p)
        return d

    demo_data = part("data", data)
    part("base", lambda: stage("base", p["base"]))
    part("start", lambda: stage("start", p["start"]))
    for name in c.mixtures:
        part(f"ingredient {name}", lambda name=name: stage(name, p["ingredients"][name]))

    tok = AutoTokenizer.from_pretrained(demo_data.tokenizer)
    tiler = ImageTiler(data_config(stage_config(c, "start", w), seed=0, local_rows=1))
    load = Loader()  # one handle: its compiled generation serves every evaluation
    val = SplitAccuracy("validation", shapes.read_eval_items(p["val"] / "eval_items.json"),
                        str(p["val"] / "images"), tiler, tok, c, load)
    test = SplitAccuracy("test", demo_data.mm_items, demo_data.image_root, tiler, tok, c, load)
    reports = part("soups", lambda: make_soups(c, p, val))

    def evaluate() -> dict[str, Any]:
        out = {}
        for name, d in (("start", p["start_export"]),
                        *[(f"ingredient {n}", p["ingredients"][n] / "export") for n in c.mixtures]):
            out[name] = {"path": str(d), "validation": val(str(d)), "test": test.details(d)}
        for m in c.soup.methods:  # its validation score is the one the soup was chosen by (same weights, same dtype)
            out[f"{m} soup"] = {"path": str(p["soups"] / m), "validation": reports[m]["final"]["score"],
                                "test": test.details(p["soups"] / m)}
        return out

    models = part("evaluate", evaluate)
    results = {"models": models, "soups": reports, "mixtures": {n: list(m.kinds) for n, m in c.mixtures.items()},
               "counts": {"validation_questions": len(val.items), "test_questions": len(test.items),
                          "test_by_kind": {k: sum(it.kind == k for it in test.items)
                                           for k in sorted({it.kind for it in test.items})}},
               "timings_s": dict(prog.timings), "wall_time_s": round(time.perf_counter() - prog.t0, 1)}
    part("report", lambda: write_report(w, c, results))
    _log(f"\nsoup run finished in {results['wall_time_s']:.0f} s; report: {w / 'soups.md'}")
    return results


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results["models"])
    val = [100 * results["models"][n]["validation"] for n in names]
    test = [100 * results["models"][n]["test"]["all"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(names)), 4.2))
    for off, vals, label in ((-0.2, val, "validation (soups chosen on it)"), (0.2, test, "test")):
        bars = ax.bar(x + off, vals, 0.4, label=label)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("accuracy over all questions (%)")
    ax.set_ylim(0, 105)
    ax.set_title("IAA branches fine-tuned on different mixtures, and their soups")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(workdir: Path, c: Any, results: dict[str, Any]) -> Path:
    p = paths(workdir, c)
    p["plots"].mkdir(exist_ok=True)
    plot(results, p["plots"] / "soups.png")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    kinds = [k for k in shapes.QA_KINDS if k in results["counts"]["test_by_kind"]]
    head = "| model | validation | test (all) | " + " | ".join(kinds) + " | grounding Acc@0.5 |"
    rows = [head, "|" + " --- |" * (4 + len(kinds))]
    for name, r in results["models"].items():
        t = r["test"]
        rows.append(f"| {name} | {_pct(r['validation'])} | {_pct(t['all'])} | "
                    + " | ".join(_pct(t.get(k)) for k in kinds) + f" | {_pct(t['grounding_acc@0.5'])} |")
    mix = [f"- `{n}`: {', '.join(k)}" for n, k in results["mixtures"].items()]
    greedy = results["soups"].get("greedy")
    decisions = []
    if greedy:
        short = lambda s: Path(s).parent.name  # noqa: E731 - ingredients/NAME/export -> NAME
        decisions = [f"- greedy order (by validation score): {', '.join(short(x) for x in greedy['order'])}",
                     *[f"- + {short(s['members'][-1])}: validation {_pct(s['score'])} -> "
                       f"{'kept' if s['accepted'] else 'rejected'}" for s in greedy["soups"]]]
    best_ing = max((r["test"]["all"] for n, r in results["models"].items() if n.startswith("ingredient")))
    lines = [
        "# mm soups: IAA branches fine-tuned on different mixtures, averaged",
        "",
        f"A base LLM (frozen throughout) and one shared IAA start ({c.mm.steps} steps on every question kind); "
        f"then {len(results['mixtures'])} branches fine-tuned from that start for {c.ingredient.steps} steps "
        "each on their own mixture of question kinds:",
        "",
        *mix,
        "",
        "The branches were souped (`mm.soup`, float32 accumulation, branch tensors only: the frozen base is shared "
        f"and checked identical). `maximum` averages the top {c.soup.top_p}; greedy keeps an ingredient when the "
        f"validation score {'does not drop (>=, POINTS)' if c.soup.accept == 'ge' else 'rises (>, model-soups)'}. "
        f"Soups are chosen on the validation split ({results['counts']['validation_questions']} questions); the test "
        f"split ({results['counts']['test_questions']} questions on other unseen images) is only reported.",
        "",
        *rows,
        "",
        f"Best single ingredient on test: {_pct(best_ing)}; soups: "
        + ", ".join(f"{m} {_pct(results['models'][f'{m} soup']['test']['all'])}" for m in c.soup.methods) + ".",
        "",
        *decisions,
        "",
        "![soups](plots/soups.png)",
        "",
        f"Wall time {results['wall_time_s']:.0f} s; per part (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()) + ".",
        "",
    ]
    out = workdir / "soups.md"
    out.write_text("\n".join(lines))
    return out
