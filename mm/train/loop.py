"""The training loop: build, (re)start, step, log, evaluate, checkpoint, stop cleanly.

`train(cfg, workdir)` is what `mm-train` runs. Order of work: validate the config (cheap, before anything
heavy), write it to the workdir, build mesh and model, assign parameter groups (unmatched parameters stop the
run), load or initialise weights (`mm.train.initial_params`: each param from one source, straight onto its
sharding), resume from the newest finished checkpoint in the workdir if there is one,
then step. A preemption notice (SIGTERM, to any process: `mm.train.preemption`) makes every process save the
same step and return.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mm import paths
from mm import sharding as shd
from mm.config import ConfigError
from mm.train import schema as tcfg
from mm.train import flops as flops_lib
from mm.train import models, param_groups as pg
from mm.profiling.capture import Capture, compiled_step_report
from mm.train.checkpoint import Checkpointer
from mm.train.synthetic_source import SyntheticSource
from mm.train.grain_source import make_source
from mm.train import initial_params as init_lib
from mm.train.initial_params import SOURCES, initial_params
from mm.train.metrics import MetricsWriter, Timer
from mm.train.optimizer import make_optimizer, schedule
from mm.train.preemption import Preemption
from mm.train.step import init_state, make_eval_step, make_train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclasses.dataclass
class Result:
    last_step: int
    losses: dict[int, float]
    preempted: bool
    skipped: int


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


@dataclasses.dataclass
class Built:
    """Everything the loop needs, built from a config (also used by tests and the benchmark)."""

    cfg: Any
    mesh: Any
    rules: Any
    model: models.TrainModel
    assignment: pg.Assignment
    optimizer: Any
    state: dict[str, Any]
    frozen: Any
    batch_sharding: NamedSharding
    step_fn: Any
    flops: dict[str, float]


def _batch_sharding(mesh: Any, rules: Any) -> NamedSharding:
    axis = nn.logical_to_mesh_axes(("act_batch",), list(rules))[0]
    return NamedSharding(mesh, PartitionSpec(None, axis))


def state_shardings(abstract_state: Any, flat_param_sh: dict[str, Any], mesh: Any) -> Any:
    """Shardings of the train state: every leaf that mirrors a param (the params, optax's per-param moments)
    is laid out like that param, so FSDP shards the optimizer state too; scalars and the rest replicate."""
    rep = shd.replicated(mesh)

    def one(path: Any, leaf: Any) -> Any:
        parts = pg.path_str(path).split("/")
        for i in range(len(parts)):  # the longest suffix that names a param: 'opt/1/0/mu/<param path>'
            sh = flat_param_sh.get("/".join(parts[i:]))
            if sh is not None and len(sh.spec) <= len(leaf.shape):
                return sh
        return rep

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def _check_processes(mesh: Any, batch_sharding: Any, axes: dict[str, int]) -> None:
    """Each process reads its own rows of the step's batch (`_batch_sharding`: rows on dim 1): its shards must
    split evenly over the processes."""
    n = jax.process_count()
    spec = batch_sharding.spec[1]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    shards = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if n > 1 and shards % n:
        raise ConfigError(f"config key mesh = {axes}: the batch is split {shards} ways "
                          f"({' x '.join(names) or 'none'}), which does not divide over the {n} processes of this run "
                          "(each reads its own rows); "
                          "make the data-parallel axes (data x fsdp) a multiple of the process count")


def build(cfg: Any, *, log: bool = True, devices: list[Any] | None = None, abstract: bool = False) -> Built:
    """Mesh, model, groups, initial state and the compiled-on-first-call step (over `devices`, default all).
    `abstract=True`: params, reference and state are `jax.ShapeDtypeStruct`s on their shardings (nothing is
    loaded or allocated), for compiling the step ahead of time (`mm.train.aot`)."""
    devices = list(jax.devices() if devices is None else devices)
    tcfg.validate(cfg, len(devices), compile_only=abstract)  # abstract: reads none
    axes = tcfg.mesh_axes(cfg)
    mesh = shd.make_mesh(axes, devices, dcn_axis=tcfg.dcn_axis(cfg))
    rules = shd.rules_from_overrides(dict(cfg.rules) or None)
    bsh = _batch_sharding(mesh, rules)
    _check_processes(mesh, bsh, axes)
    model = models.build(cfg)
    shardings = shd.param_shardings(model.abstract, mesh, rules)
    flat_sh = pg.flatten(shardings)
    flat_abstract = pg.flatten(nn.unbox(model.abstract))
    assignment = pg.assign(list(flat_abstract), cfg.param_groups)
    if log:
        _log(pg.format_report(pg.group_report(flat_abstract, assignment)))

    if abstract:
        flat = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_sh[p]) for p, a in flat_abstract.items()}
        counts = {}
    else:
        flat, counts = initial_params(cfg, model, mesh, flat_sh, flat_abstract)
    if log:
        _log("init params: " + ", ".join(f"{counts[k]} {label}" for k, label in SOURCES.items() if counts.get(k)))
    trainable, frozen = pg.split(pg.unflatten(flat), assignment)
    if not jax.tree.leaves(trainable):
        raise ConfigError("param_groups: every parameter is frozen; nothing to train")
    pairs = cfg.data.kind == "preference"  # two rows (chosen, rejected) a pair
    own_reference = pairs and not cfg.dpo.precompute_reference  # else mm.train.reference_logps, before step 1
    if own_reference:  # rebuilt from the init sources on every start, never checkpointed
        from mm.train import preference

        ref = (init_lib.abstract_reference(trainable) if abstract else
               init_lib.build_reference(cfg, model, trainable, flat_sh, mesh))
        frozen = {**frozen, preference.REFERENCE_KEY: ref}

    optimizer = make_optimizer(cfg, trainable, assignment)
    with jax.set_mesh(mesh):
        fn = lambda p: init_state(p, optimizer, int(cfg.init.seed))  # noqa: E731
        state_sh = state_shardings(jax.eval_shape(fn, trainable), flat_sh, mesh)
        init = jax.jit(fn, out_shardings=state_sh)
        if abstract:
            state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                 jax.eval_shape(init, trainable), state_sh)
        else:
            state = init(trainable)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step = make_train_step(model.loss, optimizer, schedule(cfg))
    step_fn = shd.sharded_jit(step, mesh, rules, in_shardings=(state_sh, frozen_sh, bsh),
                              out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))
    tokens = int(cfg.train.batch_size) * int(cfg.train.seq_len)
    fl = flops_lib.step_flops(model.stages(int(cfg.train.seq_len)), flops_lib.shapes_sizes(flat_abstract),
                              assignment, tokens * (2 if pairs else 1))
    if own_reference:  # and the reference's forward
        fl = {"forward": 2 * fl["forward"], "backward": fl["backward"], "total": 2 * fl["forward"] + fl["backward"]}
    return Built(cfg, mesh, rules, model, assignment, optimizer, state, frozen, bsh, step_fn, fl)


def train(cfg: Any, workdir: str | Path, *, devices: list[Any] | None = None) -> Result:
    devices = list(jax.devices() if devices is None else devices)
    tcfg.validate(cfg, len(devices))
    workdir = paths.as_path(workdir)  # a local path or a URI (gs://, s3://)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(tcfg.to_json(cfg))
        _log(f"config ({workdir / 'config.json'}):\n{tcfg.to_json(cfg)}")
    b = build(cfg, devices=devices)
    t = cfg.train
    n_dev = len(devices)
    kind = jax.devices()[0].device_kind
    _log(f"mesh {dict(zip(b.mesh.axis_names, b.mesh.devices.shape))} on {n_dev} x {kind}; model FLOPs/step "
         f"{b.flops['total']:.3e} (fwd {b.flops['forward']:.3e}, bwd {b.flops['backward']:.3e})")
    _log("peak FLOP/s table (MFU is n/a on devices not listed):\n" + flops_lib.format_peak_table())

    ref_logps = {}
    if cfg.data.kind == "preference" and cfg.dpo.precompute_reference:  # before a checkpoint replaces the start
        from mm.train import reference_logps

        ref_logps = reference_logps.prepare(cfg, b, workdir, log=_log)
    data = make_source(cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                       reference_logps=ref_logps)
    ckpt = Checkpointer(workdir, keep=int(cfg.checkpoint.keep), use_async=bool(cfg.checkpoint.use_async))
    meta = {"trainable_paths": b.assignment.trainable_paths, "frozen_source": {
        "llm_checkpoint": cfg.init.llm_checkpoint, "checkpoint": cfg.init.checkpoint,
        "vision_checkpoint": cfg.init.vision_checkpoint, "seed": int(cfg.init.seed),
        "ocr_vision_checkpoint": cfg.init.get("ocr_vision_checkpoint", ""),
        "checkpoint_renames": [list(p) for p in tcfg.checkpoint_renames(cfg)]},
        "model_kind": cfg.model.kind}
    state = b.state
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, saved_meta = ckpt.restore(latest, state)
        if saved_meta.get("trainable_paths") != meta["trainable_paths"]:
            raise ConfigError(f"{ckpt.directory}/{latest}: trained a different parameter set than param_groups "
                              f"selects now; use a fresh workdir or init.checkpoint")
        data.restore(data_state)
        _log(f"resumed from {ckpt.directory}/{latest} (step {int(state['step'])})")
    start = int(jax.device_get(state["step"]))

    # metrics.jsonl, TensorBoard events and profiles are written locally; on an object store into a mirror that
    # is uploaded at every checkpoint and at the end (appending continues a resumed run's metrics.jsonl)
    mirror = paths.Mirror(workdir, pull=["metrics.jsonl"] if is_main else [])
    writer = MetricsWriter(mirror.local, enabled=is_main, tensorboard=bool(cfg.metrics.tensorboard),
                           jsonl=bool(cfg.metrics.jsonl))
    evaluator = _Evaluator(cfg, b, ref_logps) if t.eval_every else None
    capture = Capture(cfg.profile, mirror.local, _log)
    timer = Timer()
    losses: dict[int, float] = {}
    recent_ids: collections.deque = collections.deque(maxlen=max(int(t.max_consecutive_nonfinite), 1))
    pending: tuple[int, Any, np.ndarray, dict[str, float]] | None = None
    consecutive = 0
    tokens_per_step = int(t.batch_size) * int(t.seq_len)
    preempted = False
    every = int(cfg.checkpoint.every)

    def finish(pend: tuple[int, Any, np.ndarray, dict[str, float]] | None) -> None:
        nonlocal consecutive
        if pend is None:
            return
        s, metrics, ids, data_metrics = pend
        m = jax.device_get(metrics)
        losses[s] = float(m["loss"])
        recent_ids.append((s, ids))
        consecutive = 0 if bool(m["finite"]) else consecutive + 1
        skipped_count[0] += 0 if bool(m["finite"]) else 1
        if consecutive >= int(t.max_consecutive_nonfinite):
            raise NonFiniteError(f"{consecutive} consecutive non-finite steps, last at step {s}; example ids: "
                                 + "; ".join(f"step {st}: {list(map(int, i.ravel()))}" for st, i in recent_ids))
        if s % int(t.log_every) == 0 or s == int(t.steps):
            dt = timer.mean()
            tps = tokens_per_step / dt if dt > 0 else 0.0
            row = dict(data_metrics)  # data-pipeline skip counters as of this step's batch
            row.update({"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                        "tokens_per_s": tps, "tokens_per_s_per_device": tps / n_dev,
                        "tflops_per_device": b.flops["total"] / max(dt, 1e-9) / n_dev / 1e12,
                        "mfu": flops_lib.mfu(b.flops["total"], dt, n_dev, kind), "skipped": skipped_count[0],
                        "step_time_s": dt, "finite": bool(m["finite"])})
            row.update({k: float(v) for k, v in m["extra"].items()})  # e.g. the preference loss's TRL metrics
            writer.write(s, row)
            writer.progress(s, int(t.steps), row, dt * (int(t.steps) - s))

    skipped_count = [int(jax.device_get(state["skipped"]))]
    try:
        with Preemption(ckpt.manager) as pre:
            for s in range(start, int(t.steps)):
                capture.before_step(s)
                with jax.profiler.StepTraceAnnotation("train", step_num=s + 1):
                    with jax.profiler.TraceAnnotation("mm/data"):  # host time waiting for the input pipeline
                        local = next(data)
                        data_metrics = data.metrics() if hasattr(data, "metrics") else {}
                        ids = local.pop("example_id")
                        batch = shd.global_batch(local, b.batch_sharding, jax.process_count())
                    if s == start:  # compiles the step (the call below reuses it) and says what XLA made of it
                        compiled_step_report(b, (state, b.frozen, batch), workdir, write=is_main,
                                             dump_hlo=bool(cfg.profile.dump_hlo), log=_log)
                    with jax.profiler.TraceAnnotation("mm/dispatch"):
                        state, metrics = b.step_fn(state, b.frozen, batch)
                    if capture.tracing:  # inside the annotation, so the step's window covers its device work
                        jax.block_until_ready(state)
                finish(pending)
                pending = (s + 1, metrics, ids, data_metrics)
                capture.after_step(s)
                timer.tick()
                done = s + 1
                if evaluator is not None and done % int(t.eval_every) == 0:
                    finish(pending)
                    pending = None
                    for name, value in evaluator.run(state).items():
                        writer.write(done, {"loss": value}, kind=f"eval_{name}")
                        _log(f"eval step {done}: {name} loss {value:.6f}")
                    for name, text in evaluator.samples(state).items():
                        writer.text(done, f"samples/{name}", text)
                        _log(f"eval step {done}: {name} samples:\n{text}")
                    timer.last = time.perf_counter()  # evaluation time is not step time
                if pre.reached(done):
                    finish(pending)
                    pending = None
                    ckpt.save(done, state, data.state(), meta, force=True)
                    mirror.sync()
                    preempted = True
                    _log(f"preemption notice: saved step {done}, exiting")
                    break
                if every and done % every == 0 and done != int(t.steps):
                    finish(pending)  # a resumed run starts after `done`: its metrics must be out first
                    pending = None
                    ckpt.save(done, state, data.state(), meta)
                    mirror.sync()
            finish(pending)
            capture.stop()
            last = int(jax.device_get(state["step"]))
            if not preempted and (ckpt.latest_step() or 0) < last:
                ckpt.save(last, state, data.state(), meta, force=True)
    finally:
        capture.close()
        ckpt.close()
        writer.close()
        mirror.close()
        if hasattr(data, "close"):  # Grain workers / threads
            data.close()
    skipped = int(jax.device_get(state["skipped"]))
    return Result(last, losses, preempted, skipped)


class _Evaluator:
    """Held-out loss per workflow on fixed batches (text-only batches for the text workflow)."""

    def __init__(self, cfg: Any, b: Built, reference_logps: Any = None):
        self.b = b
        self.batches = {}
        self.fns = {}
        for name, loss in b.model.eval_losses.items():
            src = make_source(cfg, seed=int(cfg.data.eval_seed), process_index=jax.process_index(),
                              process_count=jax.process_count(), multimodal=name != "text",
                              reference_logps=reference_logps)
            if isinstance(src, SyntheticSource):
                src.nan_at_steps = set()
                batches = [src.batch_at(i) for i in range(int(cfg.train.eval_batches))]
            else:  # the Grain pipeline in eval_seed's order: the first eval_batches steps, fixed
                batches = [next(src) for _ in range(int(cfg.train.eval_batches))]
                src.close()
                self.sample_rows = {k: v[0] for k, v in batches[0].items()}  # first micro batch, this process
            for x in batches:
                x.pop("example_id")
            self.batches[name] = [shd.global_batch(x, b.batch_sharding, jax.process_count()) for x in batches]
            self.fns[name] = shd.sharded_jit(make_eval_step(loss), b.mesh, b.rules)

    def samples(self, state: dict[str, Any]) -> dict[str, str]:
        """Greedy continuations of held-out prompts per workflow (`data.kind = llava_json`, one process):
        each row's first conversation up to its first answer token, with its images; text shows the
        prompt's tail, the model's answer and the reference answer."""
        rows = getattr(self, "sample_rows", None)
        m = self.b.model
        if rows is None or not m.decode or jax.process_count() > 1:
            return {}
        from mm.generate import Generator
        from mm.train.step import merge

        params = merge(state["params"], self.b.frozen)
        lm_params = {k: v for k, v in params.items() if k != "vision"}
        if not hasattr(self, "_gens"):
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(paths.local_copy(self.b.cfg.data.tokenizer)))
            self._gens = {w: Generator(fns, pad_id=int(self._tok.pad_token_id or 0)) for w, fns in m.decode.items()}
        cfg, tok = self.b.cfg, self._tok
        n = min(int(cfg.train.eval_samples), rows["input_ids"].shape[0])
        stops = sorted({int(x) for x in (cfg.model.llm.eos_token_id or [])} | {int(tok.eos_token_id or 0)})
        out = {}
        for w, gen in self._gens.items():
            prompts, masks, refs, idx = [], [], [], []
            for r in range(n):
                seg = rows["segment_ids"][r] == 1
                sup = np.flatnonzero(seg & (rows["loss_mask"][r] > 0))
                if not len(sup):
                    continue
                t = end = int(sup[0])
                while end + 1 < len(seg) and seg[end + 1] and rows["loss_mask"][r, end + 1] > 0:
                    end += 1  # the first answer: the run of supervised labels from t
                ans = np.arange(t, end + 1)
                mask = rows["image_mask"][r, :t + 1].astype(bool)
                ids = rows["input_ids"][r, :t + 1]
                if w == "text":  # text workflow: the prompt without its image positions
                    ids, mask = ids[~mask], mask[~mask]
                prompts.append(ids.tolist())
                masks.append(mask)
                refs.append(tok.decode(rows["labels"][r, ans].tolist(), skip_special_tokens=True))
                idx.append(r)
            if not prompts:
                continue
            extra = None
            if w != "text" and m.pixel_features is not None and any(x.any() for x in masks):
                feats = m.pixel_features(params, jax.numpy.asarray(rows["pixel_values"][idx]))
                extra = {"image_features": feats, "image_mask": masks}
            toks, lens = gen(lm_params, prompts, max_new_tokens=int(cfg.train.eval_max_new_tokens),
                             stop_tokens=stops, extra=extra)
            lines = []
            for p, tk, ln, ref in zip(prompts, toks, lens, refs):
                lines.append(f"prompt ...{tok.decode(p[-12:], skip_special_tokens=True)!r} -> "
                             f"{tok.decode(tk[:int(ln)].tolist(), skip_special_tokens=True)!r} "
                             f"(reference {ref!r})")
            out[w] = "\n".join(lines)
        return out

    def run(self, state: dict[str, Any]) -> dict[str, float]:
        out = {}
        for name, fn in self.fns.items():
            s = n = 0.0
            for batch in self.batches[name]:
                bs, bn = fn(state["params"], self.b.frozen, batch)
                s, n = s + float(bs), n + float(bn)
            out[name] = s / max(n, 1.0)
        return out
