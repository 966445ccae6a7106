"""Training runs started from the browser: each is the same `lorakit train` the CLI runs, in a child process, one at a
time (the others wait in a queue). Its output goes to RUN/train.log; its state to RUN/job.json (written whole), so a
restarted server finds the runs that were queued or training when it stopped and shows them as interrupted,
resumable from their checkpoint. Stop sends the child SIGUSR1: lorakit train finishes the step, writes its
checkpoint and exits (stop_request.py; the kernel sends the same signal if the server dies first); Resume runs
`lorakit train RUN/config.yaml --resume`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque

from ..train.checkpoint import CHECKPOINT_NAME
from ..train.stop_request import STOP_SIGNAL
from ..utils import atomic_path
from ..serve.errors import Conflict, NotFound

JOB_FILE, LOG_FILE, REQUEST_FILE = "job.json", "train.log", "request.yaml"
ACTIVE = ("queued", "running", "stopping")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_with_parent() -> None:
    """In the child before exec (Linux): STOP_SIGNAL when the server dies first, so the run checkpoints and stops
    (the kernel sends it again as the dying server's threads exit one by one: it must never escalate)."""
    try:
        import ctypes  # imports inside functions: only the child, between fork and exec, needs it

        ctypes.CDLL(None).prctl(1, STOP_SIGNAL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TrainingJobs:
    """The queue and the one child process. Every public method is safe to call from any thread."""

    def __init__(self, runs_dir: str):
        self.runs_dir = runs_dir
        self.lock = threading.Lock()
        self.queue: deque[str] = deque()
        self.child: subprocess.Popen | None = None
        self.current: str | None = None
        self.orphans: dict[str, int] = {}  # runs a previous server started whose process is still stopping
        os.makedirs(runs_dir, exist_ok=True)
        self._mark_interrupted()
        self.watcher = threading.Thread(target=self._watch, name="lorakit-training-jobs", daemon=True)
        self.watcher.start()

    # --- state files ------------------------------------------------------------------------------
    def directory(self, name: str) -> str:
        return os.path.join(self.runs_dir, name)

    def read_state(self, name: str) -> dict | None:
        try:
            with open(os.path.join(self.directory(name), JOB_FILE)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def _write_state(self, name: str, **changes) -> dict:
        state = {**(self.read_state(name) or {}), **changes, "updated": time.time()}
        with atomic_path(os.path.join(self.directory(name), JOB_FILE)) as tmp, open(tmp, "w") as f:
            json.dump(state, f)
        return state

    def _mark_interrupted(self) -> None:
        """Runs this server's predecessor left queued or training: interrupted (resumable when checkpointed)."""
        for name in sorted(os.listdir(self.runs_dir)):
            state = self.read_state(name)
            if state and state.get("status") in ACTIVE:
                if _alive(state.get("pid")):
                    self.orphans[name] = state["pid"]
                else:
                    self._write_state(name, status="interrupted", pid=None)

    def resumable(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.directory(name), CHECKPOINT_NAME))

    def describe(self, name: str) -> dict:
        state = self.read_state(name)
        if state is None:
            raise NotFound(f"no browser-started run {name!r} under the runs directory", "run_not_found")
        position = list(self.queue).index(name) + 1 if name in self.queue else None
        return {"id": name, **state, "resumable": self.resumable(name) and state.get("status") not in ACTIVE,
                "queue_position": position}

    def names(self) -> list[str]:
        """Browser-started runs, newest first."""
        states = {n: self.read_state(n) for n in os.listdir(self.runs_dir)}
        return sorted((n for n, state in states.items() if state is not None),
                      key=lambda n: -states[n].get("created", 0))

    # --- actions ----------------------------------------------------------------------------------
    def submit(self, name: str, cfg) -> dict:
        """Queue a new run: `cfg` (its TrainConfig, output_dir = the run directory) is written to RUN/request.yaml,
        the config the child starts from."""
        directory = self.directory(name)
        with self.lock:
            if os.path.exists(directory):
                raise Conflict(f"run {name!r} already exists under the runs directory; choose another name",
                               "run_exists")
            os.makedirs(directory)
            cfg.save_yaml(os.path.join(directory, REQUEST_FILE))
            self._write_state(name, status="queued", created=time.time(), resume=False, pid=None,
                              max_steps=cfg.max_steps, returncode=None)
            self.queue.append(name)
        return self.describe(name)

    def resume(self, name: str) -> dict:
        with self.lock:
            state = self.describe(name)
            if state["status"] in ACTIVE:
                raise Conflict(f"run {name!r} is {state['status']}", "run_active")
            if not self.resumable(name):
                raise Conflict(f"run {name!r} has no checkpoint to resume from (status {state['status']})",
                               "not_resumable")
            self._write_state(name, status="queued", resume=True, returncode=None)
            self.queue.append(name)
        return self.describe(name)

    def stop(self, name: str) -> dict:
        """A queued run leaves the queue; the running one is asked to checkpoint and stop (STOP_SIGNAL)."""
        with self.lock:
            state = self.describe(name)
            if name in self.queue:
                self.queue.remove(name)
                self._write_state(name, status="stopped" if self.resumable(name) else "cancelled")
            elif name == self.current and self.child is not None and state["status"] == "running":
                self.child.send_signal(STOP_SIGNAL)
                self._write_state(name, status="stopping")
            else:
                raise Conflict(f"run {name!r} is not queued or training (status {state['status']})", "run_inactive")
        return self.describe(name)

    def shutdown(self, wait_s: float = 60) -> None:
        """Server exit: the running child is asked to checkpoint and stop, and waited for."""
        with self.lock:
            child, name = self.child, self.current
            self.queue.clear()
        if child is not None and child.poll() is None:
            child.send_signal(STOP_SIGNAL)
            try:
                child.wait(wait_s)
            except subprocess.TimeoutExpired:
                child.kill()
            self._write_state(name, status="interrupted", pid=None)

    # --- the child ------------------------------------------------------------------------------------
    def _start(self, name: str) -> None:
        directory = self.directory(name)
        resume = bool((self.read_state(name) or {}).get("resume"))
        config = os.path.join(directory, "config.yaml" if resume else REQUEST_FILE)
        command = [sys.executable, "-m", "lorakit", "train", config, "--quiet"] + (["--resume"] if resume else [])
        log = open(os.path.join(directory, LOG_FILE), "a")
        log.write(f"$ lorakit train {os.path.basename(config)} --quiet{' --resume' if resume else ''}\n")
        log.flush()
        self.child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
                                      start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                      preexec_fn=_stop_with_parent if sys.platform == "linux" else None)
        log.close()
        self.current = name
        self._write_state(name, status="running", pid=self.child.pid, started=time.time())

    def _finish(self) -> None:
        name, code = self.current, self.child.returncode
        stopping = (self.read_state(name) or {}).get("status") == "stopping"
        status = ("finished" if code == 0 else "failed" if not stopping
                  else "stopped" if self.resumable(name) else "cancelled")  # stopped before its first step
        self._write_state(name, status=status, returncode=code, pid=None)
        self.child, self.current = None, None

    def _watch(self) -> None:
        while True:
            with self.lock:
                for name, pid in list(self.orphans.items()):
                    if not _alive(pid):
                        del self.orphans[name]
                        self._write_state(name, status="interrupted", pid=None)
                if self.child is not None and self.child.poll() is not None:
                    self._finish()
                if self.child is None and self.queue:
                    self._start(self.queue.popleft())
            time.sleep(0.2)
