"""`mm.profiling.hlo`: collectives read from optimised HLO text - kinds, bytes of what each produces (async
start ops counted once, by their results), and replica groups in each of XLA's printed forms."""

from mm.profiling import hlo

HLO = """
  %ag = bf16[8,4096]{1,0} all-gather(bf16[2,4096]{1,0} %p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ar = (f32[16]{0}, f32[4,4]{1,0}) all-reduce(f32[16]{0} %a, f32[4,4]{1,0} %b), replica_groups=[2,2]<=[4], to_apply=%sum
  %rs-start = f32[2,8]{1,0} reduce-scatter-start(f32[8,8]{1,0} %g), replica_groups={{0,1},{2,3}}, dimensions={0}
  %ags = (bf16[2,64]{1,0}, bf16[8,64]{1,0}) all-gather-start(bf16[2,64]{1,0} %q), replica_groups=[1,4]<=[4]
  %cp = f32[4]{0} collective-permute(f32[4]{0} %x), source_target_pairs={{0,1},{1,0}}
  %mesh = f32[64,128]{1,0} all-gather(%param.13), channel_id=10, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
  %add = f32[2,8]{1,0} add(f32[2,8]{1,0} %x, f32[2,8]{1,0} %y)
  %all-gather-done = bf16[8,64]{1,0} all-gather-done((bf16[2,64]{1,0}, bf16[8,64]{1,0}) %ags)
"""


def test_collective_ops_rows():
    ops = {o["name"]: o for o in hlo.collective_ops(HLO)}
    assert list(ops) == ["ag", "ar", "rs-start", "ags", "cp", "mesh"]  # `-done` ops move nothing new
    assert (ops["ag"]["kind"], ops["ag"]["bytes"], ops["ag"]["groups"], ops["ag"]["group_size"]) == \
        ("all-gather", 8 * 4096 * 2, 1, 4)
    assert (ops["ar"]["bytes"], ops["ar"]["groups"], ops["ar"]["group_size"]) == ((16 + 16) * 4, 2, 2)
    assert ops["ar"]["arrays"] == ["f32[16]", "f32[4,4]"]
    assert (ops["rs-start"]["kind"], ops["rs-start"]["bytes"], ops["rs-start"]["groups"]) == ("reduce-scatter", 64, 2)
    assert (ops["ags"]["bytes"], ops["ags"]["arrays"]) == (8 * 64 * 2, ["bf16[8,64]"])  # the result, not the operand
    assert (ops["cp"]["kind"], ops["cp"]["group_size"]) == ("collective-permute", None)
    assert (ops["mesh"]["groups"], ops["mesh"]["group_size"]) == (2, 4)


def test_totals_by_kind():
    assert hlo.collectives(HLO) == {"all-gather": {"count": 3, "bytes": 8 * 4096 * 2 + 8 * 64 * 2 + 64 * 128 * 4},
                                    "all-reduce": {"count": 1, "bytes": 128},
                                    "reduce-scatter": {"count": 1, "bytes": 64},
                                    "collective-permute": {"count": 1, "bytes": 16}}
    assert "all-gather               3 ops" in hlo.format_ops(hlo.collective_ops(HLO))
