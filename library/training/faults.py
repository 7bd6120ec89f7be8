"""Test-only fault injection, read from the environment in this one place. Never set these in a real run.

The fault tests (tests/test_faults_*.py) need a kill or a NaN at an exact point of a real script run:

SDTK_TEST_KILL_AT="<point>:<step>" makes the process SIGKILL itself (no clean-up, no flush: as a power cut or the
kernel's OOM killer) at
  step:<N>    during optimizer step N (1-based), after its backward passes, before the weights change;
  save:<N>    during the save at step N, after the result file is written and half of the resume state;
  sample:<N>  during the sampling at step N, after the images are generated and before they are written.
SDTK_TEST_NAN_AT="<b>,<b>,..." turns the loss of those batches into NaN; b counts the batches the run consumed
(1-based, across epochs and resumes), so a skipped step's retry gets a fresh batch number.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "SDTK_TEST_KILL_AT"
NAN_AT = "SDTK_TEST_NAN_AT"


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process if SDTK_TEST_KILL_AT names this point and step."""
    if os.environ.get(KILL_AT) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def nan_batch(consumed: int) -> bool:
    """Whether SDTK_TEST_NAN_AT asks for a NaN loss on the `consumed`-th batch."""
    wanted = os.environ.get(NAN_AT)
    return bool(wanted) and str(consumed) in wanted.split(",")
