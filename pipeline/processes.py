"""Children of the pipeline (the trainer, the exporters), supervised so none outlives it.

Each child runs in its own process group: SIGINT/SIGTERM to the pipeline are forwarded
to that group, which gets :data:`CHILD_GRACE_S` to exit before it is killed; the group
is killed when the pipeline exits, and on Linux a child also dies with the pipeline when
that is killed by SIGKILL (a parent-death signal), so a stopped pipeline leaves no
orphan training.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds a child gets to exit after a forwarded signal before its group is killed.
CHILD_GRACE_S = 10.0
_children: set[subprocess.Popen] = set()


def kill_group(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` to the process group ``process`` leads (gone already: no-op)."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _kill_children() -> None:
    """On the pipeline's exit, kill the groups of children still running."""
    for process in list(_children):
        kill_group(process)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when the pipeline dies, even by
    SIGKILL, which no handler of the pipeline can catch. Elsewhere: a no-op."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork

    def set_death_signal():
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the pipeline died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


class Interrupted(SystemExit):
    """The pipeline was stopped by a signal (exit code 128 + the signal); the stage it
    was in prints the one line that says so."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum).name


def run_child(command: Sequence[str]) -> None:
    """Run ``command`` like ``subprocess.run(check=True)``, in its own process group.

    A SIGINT/SIGTERM to the pipeline is passed on to the group, which then gets
    CHILD_GRACE_S to exit before it is killed, and Interrupted (exit 128 + the signal)
    is raised; however this returns, nothing of the group is left running.
    """
    process = subprocess.Popen(
        command, start_new_session=True, preexec_fn=_dies_with(os.getpid())
    )
    _children.add(process)
    stopped = []

    def forward(signum, frame):
        kill_group(process, signum)
        stopped.append(signum)
        raise Interrupted(signum)

    handle = threading.current_thread() is threading.main_thread()  # signals: main only
    previous = (
        {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS} if handle else {}
    )
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stopped:
            try:
                process.wait(timeout=CHILD_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        kill_group(process)  # grandchildren too, whatever happened
        process.wait()
        _children.discard(process)
    if code:
        raise subprocess.CalledProcessError(code, list(command))


def run_module(module: str, *args: str) -> None:
    """``python -m <module> <args>`` with this interpreter, through :func:`run_child`:
    how the pipeline runs an exporter's command line."""
    run_child([sys.executable, "-m", module, *args])
