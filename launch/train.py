"""`mm-train`: the training entry point.

Training (staged configs, parameter groups, sharded train step, Orbax checkpoints) is not built yet; it is
the subject of the training issue. Until it lands this command says so and exits with status 2 rather than
pretending to train.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    sys.stderr.write(
        "mm-train: training is not implemented yet in this version of mm (it lands with the training issue).\n"
        "What works today: `mm-convert hf-to-mm|mm-to-hf`, `mm.from_pretrained(...).logits/generate`,\n"
        "and the quickstart `python -m launch.quickstart` (see README.md).\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
