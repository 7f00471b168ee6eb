"""Stopping cleanly when the machine is taken away: SIGTERM / Ctrl-C -> checkpoint -> exit 143.

A Cloud TPU preemption notice, SLURM's pre-emption (and `scancel --signal=TERM`) and Ctrl-C
all arrive as a signal. Training loops run inside `StopSignal()`; after every step they ask
`stop.requested(step)`, and when it says so they save a checkpoint at that step, wait until it
is on disk and raise `Preempted`. main.py turns that into exit status `PREEMPTED_STATUS` (143,
the shell's status for SIGTERM; launch/tpu.sh and launch/gpu.sh restart or requeue on it), and
re-running the same command resumes from that checkpoint.

One process: the signal handler only sets a flag (the step in flight finishes; a second signal
changes nothing). Several processes: every host must stop at the same step or the collective
save would hang, so the decision is JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`): jax.distributed's coordination service
catches SIGTERM on any host and agrees with all of them on the step to stop at. No Python
handler is installed then, since it would replace the service's own.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

PREEMPTED_STATUS = int(os.environ.get("RADAR_PREEMPTED_STATUS", "143"))


class Preempted(Exception):
    """Raised by a training loop after it saved a checkpoint because it was asked to stop."""

    def __init__(self, step: int, directory):
        super().__init__(f"stopped at step {step} on a stop signal; checkpoint saved in "
                         f"{directory}; run the same command again to resume")
        self.step, self.directory = step, directory


class StopSignal:
    """Context manager: catches SIGTERM and SIGINT while a training loop runs."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._signals, self._previous, self._received = signals, {}, None

    def __enter__(self) -> StopSignal:
        # Handlers can only be set from the main thread (a notebook's worker thread cannot);
        # there the loop still stops on the multi-host sync point or a KeyboardInterrupt.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        del frame
        if self._received is None:
            logging.warning("Received %s: finishing this step, saving a checkpoint, then "
                            "stopping.", signal.Signals(signum).name)
        self._received = signum

    def requested(self, step: int) -> bool:
        """True when the loop should save and stop after `step` (the same answer on every
        host)."""
        if jax.process_count() > 1:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is off in this jax.distributed
                return False
        return self._received is not None
