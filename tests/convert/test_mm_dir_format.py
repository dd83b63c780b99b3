"""The mm directory's params: one stable-API Orbax PyTree checkpoint per save unit (format 2), and format 1
directories (one checkpoint built by Orbax's experimental partial save, as mm wrote until format 2) still read."""

import json

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from mm.checkpoints.mm_dir import MM_CONFIG_FILE, PARAMS_DIR, load_param_paths, params_metadata
from mm.checkpoints.name_map import save_unit
from mm.convert.registry import hf_to_mm, load
from tests.helpers.hf_models import make_model


def test_params_are_one_orbax_checkpoint_per_save_unit(tmp_path):
    mm = hf_to_mm(make_model(tmp_path, "llama-gqa"), tmp_path / "mm", progress=False)
    assert json.loads((mm / MM_CONFIG_FILE).read_text())["format_version"] == 2
    meta = params_metadata(mm)
    units = sorted({save_unit(p) for p in meta})
    dirs = sorted(d for d in (mm / PARAMS_DIR).iterdir() if d.is_dir())
    assert len(dirs) == len(units) > 2, (dirs, units)
    # each unit directory is an ordinary checkpoint of Orbax's stable API, holding exactly one unit's params
    seen = {}
    for d in dirs:
        tree = ocp.PyTreeCheckpointer().restore(d)
        flat = traverse_util.flatten_dict(tree)
        assert len({save_unit(p) for p in flat}) == 1, (d, sorted(flat))
        seen.update(flat)
    assert sorted(seen) == sorted(meta)
    params = traverse_util.flatten_dict(load(mm)[1])
    for p, v in seen.items():
        np.testing.assert_array_equal(np.asarray(params[p]), v)


def test_format_1_directories_still_read(tmp_path):
    """A params/ written the way format 1 was (Orbax's experimental partial save, unit by unit, finalized)."""
    import orbax.checkpoint.experimental.v1 as ocp_v1

    rng = np.random.RandomState(0)
    units = [{"model": {"layers_0": {"k": rng.randn(4, 6).astype(np.float32)}}},
             {"model": {"layers_1": {"k": rng.randn(6).astype(np.float32)}}},
             {"lm_head": {"kernel": rng.randn(6, 3).astype(np.float32)}}]
    path = tmp_path / "old" / PARAMS_DIR
    for u in units:
        ocp_v1.partial.save(path, u)
    ocp_v1.partial.finalize(path)
    want = {p: v for u in units for p, v in traverse_util.flatten_dict(u).items()}
    meta = params_metadata(tmp_path / "old")
    assert meta == {p: (v.shape, v.dtype) for p, v in want.items()}
    got = traverse_util.flatten_dict(load_param_paths(tmp_path / "old", list(want), {p: np.float32 for p in want},
                                                      {p: v.shape for p, v in want.items()}))
    for p, v in want.items():
        np.testing.assert_array_equal(got[p], v)
