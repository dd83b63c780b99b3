"""`mm-convert`: HuggingFace <-> mm checkpoint conversion (decoder LLMs, vision towers, VLMs).

`hf-to-mm` recognises the source by its config.json: Llama / Qwen2 causal LMs, CLIP / SigLIP towers (or the
tower of a full CLIP / SigLIP model), HF Llava, and the original IAA release layout. `mm-to-hf` writes the
matching HF form back (an mm "vlm" IAA checkpoint becomes the release layout with its tower beside it).

  mm-convert hf-to-mm --src HF_DIR --dst MM_DIR [--dtype keep|float32|bfloat16|float16] [--overwrite]
  mm-convert mm-to-hf --src MM_DIR --dst HF_DIR [--dtype ...] [--shard-size 5GB] [--overwrite]
  mm-convert export-run --src TRAIN_WORKDIR --dst MM_DIR [--step N] [--overwrite]   # an mm-train run's model
      [--merge-lora | --lora-format peft]                                            # LoRA runs: merged, or adapters

LLMs and towers stream tensor by tensor (peak memory about one decoder layer; VLMs load in memory), checks every name
and shape before
writing anything, and never leaves a partial `--dst`. Bad input exits with status 2 and a message naming
the file / tensor at fault.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_positions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices") from e


def build_parser() -> argparse.ArgumentParser:
    from mm.checkpoints.engine import DTYPES

    p = argparse.ArgumentParser(prog="mm-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("hf-to-mm", "HF safetensors directory -> mm checkpoint directory"),
                        ("mm-to-hf", "mm checkpoint directory -> HF safetensors directory")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--src", required=True, help="input directory")
        s.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
        s.add_argument("--dtype", default="keep", choices=DTYPES,
                       help="dtype of the written tensors; 'keep' keeps each tensor's stored dtype")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "mm-to-hf":
            s.add_argument("--shard-size", type=parse_size, default="5GB",
                           help="largest safetensors shard (default 5GB)")
        else:
            s.add_argument("--positions", type=parse_positions, default=None,
                           help="an IAA release: its insertion positions, e.g. 0,2 (the release does not store "
                                "them; IAA-14's are assumed for 14 condition layers)")
            s.add_argument("--vision", default=None,
                           help="an IAA release: a local HF CLIP / SigLIP directory for its vision tower "
                                "(default: mm_vision_tower when local, else the checkpoint's own tower)")
    s = sub.add_parser("export-run", help="an mm-train workdir's finished checkpoint -> mm checkpoint directory")
    s.add_argument("--src", required=True, help="mm-train workdir (config.json + checkpoints/)")
    s.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest finished)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    s.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run: merge the adapters into the weights (W + alpha/r * B A) and write the whole model")
    s.add_argument("--lora-format", choices=("peft",), default=None,
                   help="a LoRA run: write the adapters alone as an HF PEFT adapter dir (model.kind llm)")
    return p


def _convert(args: argparse.Namespace) -> int:
    from mm.convert.registry import hf_to_mm, mm_to_hf

    if args.command == "export-run":
        from mm.train.export import export_run

        out = export_run(args.src, args.dst, step=args.step, overwrite=args.overwrite, merge_lora=args.merge_lora,
                         lora_format=args.lora_format)
    elif args.command == "hf-to-mm":
        out = hf_to_mm(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                       positions=args.positions, vision=args.vision)
    else:
        out = mm_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                       progress=not args.no_progress, max_shard_bytes=args.shard_size)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from launch import cli

    return cli.run(f"mm-convert {args.command}", _convert, args)


if __name__ == "__main__":
    sys.exit(main())
