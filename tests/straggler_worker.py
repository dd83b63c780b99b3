"""`mm-train` with a planted straggler: the process whose index is in MM_TEST_SLOW_PROCESS sleeps
MM_TEST_DELAY_S seconds in its input pipeline before every batch (for tests/test_profile_multihost.py)."""

import os
import time

from launch import train
from mm.train import loop


def _slow_source(make_source):
    def make(cfg, *, process_index=0, **kw):
        src = make_source(cfg, process_index=process_index, **kw)
        if process_index != int(os.environ["MM_TEST_SLOW_PROCESS"]):
            return src
        nxt = src.__next__

        class Slow(type(src)):
            def __next__(self):
                time.sleep(float(os.environ["MM_TEST_DELAY_S"]))
                return nxt()

        src.__class__ = Slow
        return src

    return make


if __name__ == "__main__":
    loop.make_source = _slow_source(loop.make_source)
    train.main()
