"""The measured step next to what the compiler expected (`mm-profile summarize --aot REPORT.json`).

Measured: the mean step wall time over the traced steps (the slowest process's, as a synchronous step ends when
the last process does) and MFU from mm's analytic FLOPs (`WORKDIR/compiled_step.json`, written at start-up).
Expected: an `mm-aot --json` report: XLA's FLOPs, its roofline step time and MFU (TPU cost models give
`optimal_seconds`), per-device memory. The report is compared with the run: the step-shaping config keys that
differ and a device kind or count that differs are listed, so an estimate is never silently set against another
step.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from flax import traverse_util

# config sections / keys that do not change the compiled step
_IGNORED = ("init.", "checkpoint.", "metrics.", "profile.", "distributed.", "data.path", "data.eval",
            "data.tokenizer", "data.image_root", "data.seed", "data.workers", "data.read_threads",
            "data.max_skip_fraction", "data.nan_at_steps", "train.steps", "train.log_every", "train.eval",
            "train.max_consecutive_nonfinite", "name")


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = traverse_util.flatten_dict(a, sep="."), traverse_util.flatten_dict(b, sep=".")
    keys = sorted(k for k in set(fa) | set(fb) if not k.startswith(_IGNORED) and fa.get(k) != fb.get(k))
    return [f"{k}: run {fa.get(k)!r}, report {fb.get(k)!r}" for k in keys]


def compare(summary: dict[str, Any], workdir: Path, aot_report: dict[str, Any] | None) -> dict[str, Any] | None:
    from mm.train import flops as flops_lib

    compiled_path = workdir / "compiled_step.json"
    run = json.loads(compiled_path.read_text()) if compiled_path.exists() else None
    if run is None and aot_report is None:
        return None
    walls = [r["wall_us"] for r in summary["per_step"]] or [summary["overall"].get("wall_us", 0.0)]
    measured = statistics.fmean(walls) / 1e6 if walls and walls[0] else None
    out: dict[str, Any] = {"measured_step_s": measured}
    if run is not None:
        peak = flops_lib.peak_flops(run["device_kind"])
        out.update(device_kind=run["device_kind"], devices=run["devices"],
                   mm_flops_per_device=run["mm_flops_per_device"], xla_flops_per_device=run["xla_flops_per_device"],
                   measured_memory_total=run["memory"]["total"],
                   measured_mfu=run["mm_flops_per_device"] / measured / peak if peak and measured else None)
    if aot_report is not None:
        out["expected"] = {k: aot_report.get(k) for k in ("topology", "devices", "device_kind", "xla_optimal_seconds",
                                                          "expected_mfu", "xla_flops_per_device",
                                                          "mm_flops_per_device")}
        out["expected"]["memory_total"] = aot_report["memory"]["total"]
        notes = []
        if run is not None and (run["device_kind"], run["devices"]) != (aot_report["device_kind"],
                                                                        aot_report["devices"]):
            notes.append(f"the report is for {aot_report['devices']} x {aot_report['device_kind']}, the run ran on "
                         f"{run['devices']} x {run['device_kind']}: compare FLOPs and shapes, not times")
        cfg_path = workdir / "config.json"
        if cfg_path.exists() and "config" in aot_report:
            diff = config_differences(json.loads(cfg_path.read_text()), aot_report["config"])
            if diff:
                notes.append("not the same step: " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else ""))
        out["notes"] = notes
    return out


def format_text(c: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = ["  expected vs measured:"]
    if "device_kind" in c:
        lines.append(f"    measured on {c['devices']} x {c['device_kind']}: step {c['measured_step_s']:.4f} s, MFU "
                     f"{pct(c['measured_mfu'])}, FLOPs/device mm {c['mm_flops_per_device']:.3e} XLA "
                     f"{c['xla_flops_per_device']:.3e}, memory {c['measured_memory_total'] / 2**30:.3f} GiB/device")
    e = c.get("expected")
    if e:
        t = f"{e['xla_optimal_seconds']:.4f} s" if e.get("xla_optimal_seconds") else "n/a (no roofline on this backend)"
        lines.append(f"    compiler ({e.get('topology')}, {e['devices']} x {e['device_kind']}): step {t}, MFU "
                     f"{pct(e.get('expected_mfu'))}, FLOPs/device XLA {e['xla_flops_per_device']:.3e}, memory "
                     f"{e['memory_total'] / 2**30:.3f} GiB/device")
        if e.get("xla_optimal_seconds") and c.get("measured_step_s"):
            lines.append(f"    measured / expected step time: {c['measured_step_s'] / e['xla_optimal_seconds']:.2f}")
        lines += [f"    note: {n}" for n in c.get("notes", [])]
    return "\n".join(lines)
