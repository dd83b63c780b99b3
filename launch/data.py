"""`mm-data`: data tools.

    mm-data pack --json data.json --image-root images/ --out shards/ [--shards 8] [--no-verify] [--preference]
        LLaVA JSON / JSONL (+ images) -> ArrayRecord shards (images as encoded bytes), with a progress bar and
        a summary of skipped rows by reason.
    mm-data stats --json data.json|--array-record shards/ --tokenizer DIR [--image-root R] [--max-len N] ...
        runs the training pipeline once over the data and prints batches, tokens and skips by reason.

An input path that is not there, or a data file mm.data rejects (it raises ValueError / DataError naming the
file), is one line on stderr and exit status 2 (`launch.cli`), as are argparse's usage errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _pack(a: argparse.Namespace) -> int:
    from launch.cli import require_paths
    from mm.data.pack import pack_llava, summary

    require_paths(json=a.json, image_root=a.image_root)

    paths, counter = pack_llava(a.json, a.image_root, a.out, a.shards, verify_images=not a.no_verify,
                                preference=a.preference, progress=not a.quiet, prefix=a.prefix)
    print(summary(counter))
    print(f"shards: {len(paths)} in {a.out}")
    return 0 if counter.used else 1


def _stats(a: argparse.Namespace) -> int:
    from launch.cli import require_paths

    require_paths(json=a.json, array_record=a.array_record, tokenizer=a.tokenizer, image_root=a.image_root)
    from transformers import AutoTokenizer

    from mm.data.pipeline import DataConfig, DataPipeline, ExampleMaker
    from mm.data.sources import ArrayRecordRows, read_llava

    rows = ArrayRecordRows(a.array_record) if a.array_record else read_llava(a.json)
    cfg = DataConfig(kind=a.kind, template=a.template, max_len=a.max_len, batch_size=a.batch_size, tiling=a.tiling,
                     tile=a.tile, tokens_per_tile=a.tokens_per_tile, max_tiles_per_row=a.max_tiles_per_row,
                     shuffle=False, worker_count=a.workers, max_skip_fraction=1.0)
    maker = ExampleMaker(cfg, AutoTokenizer.from_pretrained(a.tokenizer), a.image_root)
    pipe = DataPipeline(rows, cfg, maker, shard_index=0, shard_count=1)
    batches = tokens = supervised = 0
    pre = "chosen/" if a.kind == "preference" else ""
    for b in pipe:
        batches += 1
        tokens += int((b[pre + "segment_ids"] > 0).sum())
        supervised += int(b[pre + "loss_mask"].sum())
    m = pipe.metrics()
    print(f"batches {batches}, tokens {tokens}, supervised {supervised}, examples {int(m['data/used'])}, "
          f"skipped {int(m['data/skipped'])}")
    for k, v in m.items():
        if k.startswith("data/skipped/") and v:
            print(f"  {k[len('data/skipped/'):]}: {int(v)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mm-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="LLaVA JSON -> ArrayRecord shards")
    pk.add_argument("--json", required=True)
    pk.add_argument("--image-root", default=None)
    pk.add_argument("--out", required=True)
    pk.add_argument("--shards", type=int, default=1)
    pk.add_argument("--prefix", default="data")
    pk.add_argument("--no-verify", action="store_true", help="do not decode images while packing")
    pk.add_argument("--preference", action="store_true", help="rows are preference pairs (chosen/rejected)")
    pk.add_argument("--quiet", action="store_true")
    st = sub.add_parser("stats", help="run the pipeline over a dataset and count what it keeps and skips")
    src = st.add_mutually_exclusive_group(required=True)
    src.add_argument("--json")
    src.add_argument("--array-record")
    st.add_argument("--tokenizer", required=True, help="directory with the model's HF tokenizer")
    st.add_argument("--image-root", default=None)
    st.add_argument("--kind", default="sft", choices=("sft", "preference"))
    st.add_argument("--template", default="chat", choices=("chat", "plain"))
    st.add_argument("--max-len", type=int, default=2048)
    st.add_argument("--batch-size", type=int, default=8)
    st.add_argument("--tiling", default="catty", choices=("catty", "square", "none"))
    st.add_argument("--tile", type=int, default=336)
    st.add_argument("--tokens-per-tile", type=int, default=144)
    st.add_argument("--max-tiles-per-row", type=int, default=18)
    st.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    from launch import cli
    from mm.data.skips import DataError

    return cli.run(f"mm-data {a.cmd}", _pack if a.cmd == "pack" else _stats, a, bad_input=(ValueError, DataError))


if __name__ == "__main__":
    sys.exit(main())
