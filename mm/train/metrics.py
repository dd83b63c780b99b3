"""Metrics sinks: a console progress line, `metrics.jsonl` in the workdir, TensorBoard events (tensorboardX).

Only process 0 writes. JSONL floats are written with `repr` precision, so a loss read back is the exact
float32 value the step produced (the resume test compares them bitwise).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True, jsonl: bool = True,
                 stream: Any = None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.workdir = Path(workdir)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a") if (enabled and jsonl) else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except ImportError:
                self.stream.write("metrics: tensorboardX not installed; TensorBoard events disabled\n")

    def write(self, step: int, scalars: Mapping[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (str, bool)) else v) for k, v in scalars.items() if v is not None}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, "step": step, **clean}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, step: int, total: int, m: Mapping[str, Any], eta_seconds: float) -> None:
        if not self.enabled:
            return
        mfu = m.get("mfu")
        mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        self.stream.write(
            f"step {step:>6}/{total}  loss {m['loss']:.4f}  lr {m['lr']:.3e}  gnorm {m['grad_norm']:.3f}  "
            f"tok/s {m['tokens_per_s']:,.0f} ({m['tokens_per_s_per_device']:,.0f}/dev)  "
            f"TFLOP/s/dev {m['tflops_per_device']:.3f}  MFU {mfu_s}  skipped {m['skipped']}  "
            + (f"data used {int(m['data/used'])} skipped {int(m['data/skipped'])}  " if "data/used" in m else "")
            + f"ETA {_fmt_eta(eta_seconds)}\n")
        self.stream.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(tag, text, step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": "text", "step": step, "tag": tag, "text": text}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Timer:
    """Wall time per step over a sliding window, excluding the first (compiling) step."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.times: list[float] = []

    def tick(self) -> float:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.times.append(dt)
        self.times = self.times[-50:]
        return dt

    def mean(self) -> float:
        t = self.times[1:] if len(self.times) > 1 else self.times
        return sum(t) / max(len(t), 1)
