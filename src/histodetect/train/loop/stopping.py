"""Ctrl-C and SIGTERM while training: save the run at the end of the step, then stop.

A scheduler's time limit or preemption (SLURM, Kubernetes, spot machines) sends SIGTERM
and waits a while before killing; Ctrl-C, or a notebook's "interrupt the kernel", sends
SIGINT. Either, the first time, asks the loop to finish its step, write last.pt and stop
with the command that goes on (`histodetect train --resume RUN`), so that no step is lost.
A second signal stops at once, as Python would have: the steps since the last save are
lost, and the run resumes from that save.

One process only: under DDP every process would have to agree on the step (a collective
each step), so torchrun's own handling applies there, as for the mid-epoch saves.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from tqdm import tqdm

from ...errors import Interrupted, install_handlers, restore_handlers


class StopRequests:
    """While installed, SIGINT and SIGTERM set `signal_number` instead of stopping.

    `at_once` (set where a step has nothing to save, e.g. the final choice of thresholds)
    makes the first signal stop at once too. Signals a parent set to be ignored (`nohup`)
    stay ignored; outside the main thread (where Python delivers no signals) it does nothing.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.signal_number: int | None = None
        self.at_once = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self._previous = install_handlers(self._handle)

    def restore(self) -> None:
        """The handlers from before install(); fit calls it however it ends."""
        restore_handlers(self._previous)
        self._previous = {}

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None or self.at_once:
            raise self.stopped_at_once(number)
        self.signal_number = number
        tqdm.write(f"histodetect: {signal.Signals(number).name}: saving {self.run_dir} at the end of this step, "
                   "then stopping (another Ctrl-C or SIGTERM stops at once, losing the steps since the last save)", file=sys.stderr)

    def stopped_at_once(self, number: int) -> Interrupted:
        last = self.run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            how = f"continue from its last save with: histodetect train --resume {self.run_dir}"
        else:
            how = "no checkpoint had been written yet: start it again with --overwrite"
        return Interrupted(f"{self.run_dir}: stopped at once; {how}", number)

    def saved(self, where: str) -> Interrupted:
        """The error to raise once last.pt holds the run `where` it stopped (e.g. 'after epoch 2')."""
        return Interrupted(f"{self.run_dir}: saved {where}; continue with: histodetect train --resume {self.run_dir}",
                           self.signal_number)
