"""`python tests/faulty_main.py FLAGS...`: vdm.main with a checkpoint writer that fails, for the
fault tests.

With VDM_TEST_SAVES_BEFORE_ENOSPC=N in its environment, this process's first N checkpoint saves
go through and every later one raises OSError(ENOSPC) the way tensorstore reports a full disk.
Set it for one process of a multi-process run to give that process alone a full disk. Without
it, this is plain `python -m vdm.main`.
"""

import errno
import os
import runpy
import sys

import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

_allowed = int(os.environ.get("VDM_TEST_SAVES_BEFORE_ENOSPC", "-1"))
if _allowed >= 0:
    _save = ocp.CheckpointManager.save
    _calls = []

    def _failing_save(self, step, *args, **kwargs):
        _calls.append(step)
        if len(_calls) > _allowed:
            raise OSError(errno.ENOSPC, "No space left on device")
        return _save(self, step, *args, **kwargs)

    ocp.CheckpointManager.save = _failing_save

if __name__ == "__main__":
    runpy.run_module("vdm.main", run_name="__main__", alter_sys=True)
