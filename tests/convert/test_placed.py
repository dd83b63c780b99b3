"""Reading checkpoint regions straight into sharded arrays (`mm.convert.placed`, `Transform.read_region`).

References: each transform's whole-tensor `to_mm` (itself checked against transformers by the parity tests),
sliced in numpy; and the in-memory HF reader for whole checkpoints.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mm.checkpoints import name_map as nm
from mm.checkpoints.errors import ConversionError
from mm.convert.hf_vision import ConvToHWIO, FusedInProj
from mm.checkpoints.safetensors_io import PlannedTensor, SafetensorsCheckpoint, ShardedSafetensorsWriter

CASES = [  # (transform, HF shape)
    (nm.IDENTITY, (12,)), (nm.IDENTITY, (10, 6)), (nm.IDENTITY, (4, 6, 3)), (nm.TRANSPOSE, (10, 6)),
    (nm.SplitHeadsIn(4), (4 * 3, 10)), (nm.SplitHeadsOut(4), (10, 4 * 3)), (nm.SplitHeadsBias(4), (4 * 3,)),
    (ConvToHWIO(), (6, 3, 2, 2)), (FusedInProj(2), (3 * 2 * 3, 5)),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("regions")
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal(shape).astype(np.float32) for i, (_, shape) in enumerate(CASES)}
    arrays["bf16"] = rng.standard_normal((9, 7)).astype(ml_dtypes.bfloat16)
    w = ShardedSafetensorsWriter(d, [PlannedTensor(k, v.shape, v.dtype) for k, v in arrays.items()],
                                 max_shard_bytes=400)  # several shards: rows are read from the right file
    for k, v in arrays.items():
        w.write(k, v)
    w.close()
    with SafetensorsCheckpoint(d) as c:
        yield c, arrays


def _boxes(shape, rng, n=12):
    for _ in range(n):
        box = []
        for s in shape:
            a = int(rng.integers(0, s))
            box.append(slice(a, int(rng.integers(a + 1, s + 1))))
        yield tuple(box)
    yield tuple(slice(0, s) for s in shape)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_read_region_equals_the_slice_of_the_whole_tensor(ckpt, case):
    c, arrays = ckpt
    t, hf_shape = CASES[case]
    name = f"t{case}"
    whole = t.to_mm(arrays[name])
    rng = np.random.default_rng(case)
    reads = []

    def rows(r0, r1, cols):
        reads.append((r0, r1))
        return c.read_rows(name, r0, r1, cols, stripe_bytes=16)  # tiny stripes: the striped path runs too

    for box in _boxes(whole.shape, rng):
        got = t.read_region(rows, hf_shape, box)
        np.testing.assert_array_equal(got, whole[box])
    if t in (nm.IDENTITY, nm.TRANSPOSE) or isinstance(t, (nm.SplitHeadsIn, nm.SplitHeadsOut)):
        assert any(r1 - r0 < hf_shape[0] for r0, r1 in reads), "a region never read fewer rows than the tensor"


def test_read_rows_bfloat16_and_bounds(ckpt):
    c, arrays = ckpt
    np.testing.assert_array_equal(c.read_rows("bf16", 2, 5), arrays["bf16"][2:5])
    np.testing.assert_array_equal(c.read_rows("bf16", 1, 8, slice(3, 6), stripe_bytes=1), arrays["bf16"][1:8, 3:6])
    with pytest.raises(ConversionError, match="rows 3:99 of bf16"):
        c.read_rows("bf16", 3, 99)


@pytest.mark.parametrize("spec", [P("fsdp", "tensor"), P(None, "tensor"), P("fsdp", None), P()])
def test_hf_onto_matches_the_in_memory_reader_on_any_mesh(tmp_path, spec):
    from mm import sharding as shd
    from mm.convert.llm_family import llm_name_map
    from mm.convert.registry import load
    from tests.helpers.hf_models import make_llama

    hf = make_llama(tmp_path, "gqa", max_shard_size="20KB")
    config, want = load(hf)
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    name_map = llm_name_map(config)

    def sharding(e):
        parts = tuple(spec)[: len(e.mm_shape)]
        ok = all(p is None or e.mm_shape[i] % mesh.shape[p] == 0 for i, p in enumerate(parts))
        return NamedSharding(mesh, P(*parts) if ok else P())

    shardings = {e.mm_path: sharding(e) for e in name_map.entries}
    from flax.traverse_util import flatten_dict as flatten

    got = flatten(load(hf, dtype="float32", shardings=shardings)[1])

    for path, ref in flatten(want).items():
        assert got[path].sharding == shardings[path]
        np.testing.assert_array_equal(np.asarray(got[path]), ref, err_msg="/".join(path))
    assert len(got) == len(flatten(want))
    assert any(not s.is_fully_replicated for s in shardings.values()) or spec == P()
