"""`mm-aot` and `mm.train.aot` on the real XLA TPU compiler (libtpu, the `tpu` extra) for abstract TPU devices on
this CPU host: the train step `mm-train` would run compiles for a v5p slice, mm's Pallas TPU flash kernels are in
the compiled module as Mosaic custom calls (forward and both backward kernels, once per layer: compiled for real,
not interpreted), the report's FLOPs agree with mm's analytic count, FSDP inserts all-gathers and
gradient reductions, the cost model gives a roofline step time, and a step that
does not fit exits 3. CI runs these as their own step (`-m tpu`, after `pip install -e '.[tpu]'`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tpu
ROOT = Path(__file__).resolve().parents[1]


def _tiny(layers=2):
    from tests.train.helpers_train import tiny

    c = tiny("full")
    c.data.kind = "synthetic_text"
    c.model.llm.update(dict(vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=128,
                            intermediate_size=512, num_layers=layers, attention_impl="pallas_tpu"))
    c.train.update(dict(batch_size=8, seq_len=256))
    c.mesh.update(dict(data=1, fsdp=4, tensor=1))
    return c


def test_train_step_compiles_for_v5p_with_mms_mosaic_kernels():
    from mm.train import aot

    devices, hbm = aot.tpu_devices("v5p-8")
    assert len(devices) == 4 and devices[0].platform == "tpu" and hbm == 95 * 1024 ** 3
    b, compiled = aot.compile_step(_tiny(layers=3), devices)
    hlo = compiled.as_text()
    kernels = re.findall(r"\b(mm_flash_(?:fwd|dkdv|dq)_tpu)\b", hlo)
    calls = hlo.count('custom_call_target="tpu_custom_call"')
    assert {k: kernels.count(k) > 0 for k in ("mm_flash_fwd_tpu", "mm_flash_dkdv_tpu", "mm_flash_dq_tpu")} == \
        {"mm_flash_fwd_tpu": True, "mm_flash_dkdv_tpu": True, "mm_flash_dq_tpu": True}, kernels
    assert calls == 3 * 3, calls  # three layers x (forward, dk/dv, dq)
    from mm.profiling.compiled import report

    r = report(b, compiled, len(devices), hbm)
    assert r["fits"] and 0 < r["memory"]["total"] < hbm
    assert 0.8 < r["xla_flops_per_device"] / r["mm_flops_per_device"] < 1.25, r
    assert r["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the sharded weights
    print({k: v["count"] for k, v in r["collectives"].items()})
    assert any(r["collectives"].get(k, {}).get("count", 0) > 0 for k in ("reduce-scatter", "all-reduce"))  # grads
    assert r["xla_optimal_seconds"] > 0 and 0 < r["expected_mfu"] < 1  # the TPU cost model's roofline


def _mm_aot(tmp_path, *args):
    cmd = [sys.executable, "-m", "launch.aot", "--config=configs/tiny_llm.py:full", "--topology=v5p-8",
           "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.batch_size=8",
           f"--json={tmp_path / 'r.json'}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_reports_saves_and_exits_3_when_the_step_does_not_fit(tmp_path):
    r = _mm_aot(tmp_path, f"--save={tmp_path / 'step.bin'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mm-aot: v5p-8 (4 x TPU v5)" in r.stdout and "of 95 GiB HBM: fits" in r.stdout
    assert "FLOPs per device per step: XLA" in r.stdout and "all-gather" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["devices"] == 4 and rep["fits"] is True and rep["memory"]["total"] > 0
    assert (tmp_path / "step.bin").stat().st_size > 1000

    r = _mm_aot(tmp_path, "--hbm_gib=0.0001")
    assert r.returncode == 3 and "more than 0.00 GiB of HBM" in r.stderr, (r.returncode, r.stderr[-2000:])
    r = _mm_aot(tmp_path, "--config.model.llm.num_heads=5")
    assert r.returncode == 2 and "mm-aot: error: model.llm: num_heads=5" in r.stderr, r.stderr[-2000:]


def test_two_slices_get_a_hybrid_mesh_with_data_parallel_over_dcn():
    """Multi-slice: the `data` axis spans the slices (DCN), fsdp stays inside each slice (ICI); the step
    compiles for both slices and its all-gathers (FSDP) stay within a slice."""
    from mm.sharding import make_mesh
    from mm.train import aot

    devices, _ = aot.tpu_devices("v5p-8", num_slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = make_mesh(dict(data=2, fsdp=4, tensor=1), devices)
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].ravel()} == {i}
    with pytest.raises(ValueError, match="2 slices, but the 'data' axis"):
        make_mesh(dict(data=1, fsdp=8, tensor=1), devices)
    c = _tiny()
    c.mesh.update(dict(data=2, fsdp=4, tensor=1))
    b, compiled = aot.compile_step(c, devices)
    assert b.mesh.devices.shape == (2, 4, 1)
    groups = [g for line in compiled.as_text().splitlines() if " all-gather(" in line or "all-gather-start(" in line
              for g in re.findall(r"replica_groups=\{((?:\{[\d,]*\},?)+)\}", line)]
    sizes = {len(grp.split(",")) for gs in groups for grp in re.findall(r"\{([\d,]*)\}", "{" + gs + "}")}
    assert groups and sizes == {4}, (sizes, groups[:3])  # FSDP gathers over the 4 chips of one slice

    # `mesh.dcn_axis = fsdp`: FSDP spans the slices instead, data parallel stays inside each
    c.mesh.update(dict(data=4, fsdp=2, tensor=1, dcn_axis="fsdp"))
    b, _ = aot.compile_step(c, devices)
    for j in range(2):
        assert {d.slice_index for d in b.mesh.devices[:, j].ravel()} == {j}
