"""The child process a UI training run lives in: the recipe's own `main` (parse, check, run), nothing else.

`python -m sdlora.ui.worker RECIPE FLAGS…` is started by `jobs.start` in a session of its own, with its output on
a pipe. Until the output folder is held and the data read, what it prints (the scripts' one-line errors) reaches
the UI through that pipe and nothing is left on disk. Then it moves its output to `<logging_dir>/train.log` in the
output folder and lets go of the pipe, so a browser closed or a UI restarted leaves the run going; the UI follows
it through `progress.jsonl` beside the log. SIGTERM (the UI's Stop) is handled as in a terminal
(training/interrupt.py): while training it saves a checkpoint at the current step, before that it stops at once.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

LOG = "train.log"
PROGRESS = "progress.jsonl"
STARTED = "sdlora-ui: started"  # the last line on the pipe: the folder is held, the log file takes over
PROMPTS_ENV = "SDLORA_UI_SAMPLE_PROMPTS"  # prompts typed in the UI: a file the worker writes and deletes
STOPPED_RC = 128 + signal.SIGTERM  # the exit status of a run the UI's Stop ended (as interrupt.EXIT_CODES says)


def logs_dir(output_dir: Path, logging_dir: str = "logs") -> Path:
    return Path(output_dir) / logging_dir


def main(argv=None) -> int:
    # Stop while the recipe's imports load (before the run's own handlers): end as a stopped run, at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(STOPPED_RC))
    from ..recipes import RECIPES
    from ..training.interrupt import EXIT_CODES

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe, flags = argv[0], argv[1:]
    mod = RECIPES[recipe]
    prompts_file = None
    if text := os.environ.pop(PROMPTS_ENV, None):
        fd, prompts_file = tempfile.mkstemp(prefix="sdlora-ui-prompts-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        flags += ["--sample_prompts", prompts_file]
    progress, stepped = [], []

    def on_start(config, made):  # the folder is held and the data read (`made`: the recipe's Recipe)
        from ..training.manifest import Manifest

        folder = logs_dir(config.output_dir, config.logging_dir)
        Manifest(config.output_dir).will_make(folder)  # recorded as sdlora's before it exists
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.write(STARTED + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)  # from here on the pipe is closed: the UI reads the log and the progress file
        os.dup2(fd, 2)
        os.close(fd)
        progress.append(open(folder / PROGRESS, "a", buffering=1))
        _write(progress, event="start", pid=os.getpid(), command=[recipe, *_public(flags, prompts_file)])
        _write(progress, event="plan", max_steps=planned_steps(config, made.data), resolution=config.resolution,
               images=len(made.data.rows))

    def on_step(step, logs):
        record = {k: v if isinstance(v, int) else float(v) for k, v in logs.items() if math.isfinite(float(v))}
        if not stepped:  # this process's first step (warm-up): the UI's s/step leaves it out once there are more
            stepped.append(step)
            record["first"] = True
        _write(progress, step=step, **record)

    def on_phase(name):
        _write(progress, phase=name)

    rc = 1
    try:
        rc = mod.main(flags, on_start=on_start, on_step=on_step, on_phase=on_phase)
    finally:
        if prompts_file:
            os.unlink(prompts_file)
        _write(progress, event="end", rc=rc, stopped=rc in EXIT_CODES.values())
    return rc


def planned_steps(config, data) -> int:
    """The optimizer steps the run will make (`setup.total_steps` over one process's batches, as the UI runs it),
    known before any model loads."""
    from ..data.trainset import StreamSampler
    from ..training.setup import total_steps

    if config.max_train_steps:
        return config.max_train_steps
    sampler = StreamSampler(len(data), config.train_batch_size, 0, keys=[data.key(i) for i in range(len(data))])
    return total_steps(config, sampler.batches_per_epoch)


def _public(flags: list[str], prompts_file: str | None) -> list[str]:
    """The flags as the log records them: no token, and the prompts typed in the UI rather than a temp path."""
    out, hide = [], False
    for f in flags:
        out.append("***" if hide else "<prompts typed in the UI>" if f == prompts_file else f)
        hide = f == "--hub_token"
    return out


def _write(progress: list, **record):
    if progress:
        progress[0].write(json.dumps({"time": time.time(), **record}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
