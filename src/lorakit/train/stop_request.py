"""Ctrl-C during training: finish the step, checkpoint, stop (the second Ctrl-C stops at once)."""

from __future__ import annotations

import signal
import threading

STOP_SIGNAL = signal.SIGUSR1  # a stop request that never escalates (Linux's parent-death signal can come twice)


class StopRequest:
    """Ctrl-C during training: the first finishes the current optimizer step and stops there with a checkpoint
    (the state then is exactly a step boundary's, so --resume continues bit for bit, dropout included); a
    second stops at once without one. SIGUSR1 asks for the same graceful stop and never escalates (the server
    that started the run sends it). Outside the main thread (no signal handler possible) Ctrl-C stops at
    once, as before."""

    def __init__(self, log=print):
        self.requested, self.log, self.previous = False, log, None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.previous_usr1 = signal.signal(STOP_SIGNAL, self._handle_stop)
        return self

    def _handle_stop(self, signum, frame) -> None:
        """SIGUSR1 (the playground's Stop, or its server exiting): as a first Ctrl-C, however often it comes."""
        if not self.requested:
            self.requested = True
            self.log("\nstop requested: stopping after this step, with a checkpoint", flush=True)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\nstopping after this step (Ctrl-C again to stop now, without a checkpoint)", flush=True)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            signal.signal(STOP_SIGNAL, self.previous_usr1)
