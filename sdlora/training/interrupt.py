"""Ctrl+C (SIGINT) and SIGTERM during a training run: stop at a step that resumes exactly, or at once.

`Interrupts` is what `cli.run.run` wraps a run in: it handles both signals for the run and puts the handlers
before it back afterwards. Until the loop starts training (checking, reading the data, generating class images,
loading models, caching) nothing could be resumed and a model load cannot be polled, so a signal raises `Stopped`
wherever the run is. Once training runs, the first signal only asks to stop: the loop calls `requested()` after
each optimizer step, saves checkpoint-N there and returns. A second signal raises `Stopped` at once; every write
is atomic (sdlora.io), so what it interrupts leaves no half-written file under a final name. Once `Stopped` is
raised the signals' default actions are back, so a further one ends the process even while it unwinds.
A raise can be lost where Python drops exceptions (a __del__ the garbage collector ran): the handler then comes
back right after the __del__, and `check()` (phase marks, each cached batch, each step) raises a due stop again.
"""
from __future__ import annotations

import _thread
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The exit status of a run a signal stopped: what a shell reports for a process that signal ended (128 + its
# number), 130 for SIGINT and 143 for SIGTERM, so scripts and schedulers see the run did not finish.
EXIT_CODES = {s: 128 + s for s in SIGNALS}

# Where a stop raises (the loop's phase marks, and the CLI's own), and how the one-line message names it.
RAISING = {"start": "checking the flags and reading the data", "class images": "generating class images",
           "load text encoders and VAE": "loading the text encoders and VAE",
           "cache": "caching latents and text embeddings", "load UNet": "loading the UNet",
           "push": "uploading to the hub"}

_active: Interrupts | None = None


def entered(phase: str):
    """Where the run is now (the loop's phase marks): from "train" on a signal is a stop request, polled per step."""
    if _active is not None:
        _active.check()
        _active.phase = phase


def check():
    """Raise the stop a signal asked for, if one is due (the caching loops call this per batch)."""
    if _active is not None:
        _active.check()


class Stopped(KeyboardInterrupt):
    """A stop that could not wait for a step: before training started, while uploading, or a second signal."""

    def __init__(self, signum: int, phase: str, again: bool):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.phase, self.again = signum, phase, again

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.signum]


class Interrupts:
    """SIGINT/SIGTERM handlers for one run (main thread only: elsewhere Python cannot have them, and this is inert)."""

    def __init__(self):
        self.signum: int | None = None  # the first signal (with several processes: the one they agreed on)
        self.stopped: str | None = None  # why the loop stopped at a step, once it has
        self.phase = "start"
        self._due: Stopped | None = None  # raised, and raised again at each check until it gets through
        self._previous: dict = {}
        self._world: int | None = None

    def install(self) -> Interrupts:
        global _active
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        self._outer, _active = _active, self
        return self

    def restore(self):
        """Put back the handlers found at `install`."""
        global _active
        _active = self._outer
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __enter__(self) -> Interrupts:
        return self.install()

    def __exit__(self, *exc):
        self.restore()

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES[self.signum] if self.signum else None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def _handle(self, signum, frame):
        if self._due is None:
            again = self.signum is not None
            if not again and self.phase not in RAISING:
                self.signum = signum  # the loop stops after the step it is on
                return
            self.signum = self.signum or signum
            self._due = Stopped(signum, self.phase, again)
        if _in_finaliser(frame):  # Python prints and drops what a __del__ raises (the GC runs them anywhere)
            threading.Timer(0.01, self._again, (signum,)).start()  # so come back here just after it
            return
        self.check()

    def _again(self, signum):
        if _active is self:  # still this run's handler
            _thread.interrupt_main(signum)

    def check(self):
        if self._due is not None:
            for s in self._previous:  # a further signal ends the process, even while this one unwinds
                signal.signal(s, signal.SIG_DFL)
            raise self._due

    def requested(self) -> str | None:
        """Called by every process after each optimizer step: why to stop there ("interrupted (SIGINT)"), or None.
        Several processes agree (the largest signal number of any of them), so they all stop at one step; one
        process pays nothing."""
        self.check()  # a stop before training that something swallowed
        if self._world is None:
            from accelerate import PartialState

            self._world = PartialState().num_processes
        if self._world > 1:
            import torch
            from accelerate import PartialState
            from accelerate.utils import reduce

            agreed = int(reduce(torch.tensor([self.signum or 0], device=PartialState().device), "max").item())
            self.signum = agreed or None
        return f"interrupted ({self.name})" if self.signum else None

    def polled(self, should_stop=None):
        """The loop's `should_stop`: a signal, or the caller's own hook (which reads as "stopped")."""
        def check():
            why = self.requested() or (should_stop is not None and bool(should_stop()) and "stopped")
            self.stopped = why or None
            return why
        return check


def describe(e: Stopped, output_dir: Path | None) -> str:
    """The one line a run that `e` stopped ends with."""
    from .checkpoint import list_checkpoints

    done = list_checkpoints(output_dir) if output_dir else []
    resume = f"--resume_from_checkpoint latest continues from {done[-1].name}" if done else "nothing to resume"
    if e.again:
        return f"interrupted again ({e.name}): stopped at once, without saving the step it was on; {resume}"
    if e.phase == "push":
        return f"interrupted ({e.name}) while uploading to the hub: the local output in {output_dir} is complete; " \
               f"upload it later with `hf upload`"
    return f"stopped ({e.name}) before training started (during {RAISING.get(e.phase, e.phase)}); {resume}"


def _in_finaliser(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False
