"""``pretrain_mfm.py`` that dies (exit 17) when the checkpoint of iteration ``CRASH_AT`` is written
but not yet published, as a killed job would: the fault comes from the test, not from a hook in
the training code.

    python tests/faults/crash_before_publish.py CRASH_AT [pretrain_mfm.py arguments ...]
"""

from __future__ import annotations

import os
import sys

import pretrain_mfm
from megatron_mfm.checkpoint.training_state import Checkpointer


def crash_before(iteration: int):
    publish = Checkpointer._publish

    def crashing(self, tmp, final, architecture):
        if final.name.endswith(f"{iteration:07d}"):
            os._exit(17)
        publish(self, tmp, final, architecture)

    return crashing


if __name__ == "__main__":
    Checkpointer._publish = crash_before(int(sys.argv[1]))
    pretrain_mfm.main(sys.argv[2:])
