"""Ctrl-C during training: finish the step, checkpoint, stop (the second Ctrl-C stops at once)."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Ctrl-C during training: the first finishes the current optimizer step and stops there with a checkpoint
    (the state then is exactly a step boundary's, so --resume continues bit for bit, dropout included); a
    second stops at once without one. Outside the main thread (no signal handler possible) Ctrl-C stops at
    once, as before."""

    def __init__(self, log=print):
        self.requested, self.log, self.previous = False, log, None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\nstopping after this step (Ctrl-C again to stop now, without a checkpoint)", flush=True)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
