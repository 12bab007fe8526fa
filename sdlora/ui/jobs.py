"""Training runs the UI starts, stops and follows: child processes of their own, found again by their output folder.

A run's state lives in its output folder, not in the UI: the lock file names the process holding the folder, and
the worker's `progress.jsonl` and `train.log` hold the steps, losses and the last error. So a page reopened, or a
UI restarted, shows a running job as it is. No Gradio here: the tests drive this module directly.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..recipes import RECIPES
from ..training.interrupt import EXIT_CODES
from ..training.outdir import LOCK_NAME, fcntl
from .worker import LOG, PROGRESS, PROMPTS_ENV, STARTED, logs_dir


@dataclass
class Job:
    """A run this UI process started: its child, and what the child said before it took over its folder."""
    output_dir: Path
    proc: subprocess.Popen
    command: list[str]
    said: list[str] = field(default_factory=list)  # the child's output while on the pipe
    started: bool = False  # the child holds its folder and writes to its log from now on
    ended: threading.Event = field(default_factory=threading.Event)  # the child exited before it started

    def alive(self) -> bool:
        return self.proc.poll() is None


launched: dict[Path, Job] = {}  # the runs this UI process started, by output folder
_lock = threading.Lock()


def folder_key(output_dir) -> Path:
    return Path(output_dir).expanduser().absolute()


def command(recipe: str, flags: list[str]) -> list[str]:
    """The command line a run is, as a user would type it (the scripts' own flags)."""
    return [f"{RECIPES[recipe].SCRIPT}.py", *flags]


def start(recipe: str, flags: list[str], output_dir, sample_prompts: str | None = None) -> Job:
    """Start a run in a child process; a UserError when this folder's run is already going."""
    key = folder_key(output_dir)
    with _lock:
        job = launched.get(key)
        pid = job.proc.pid if job and job.alive() else holder(key)
        if pid:
            raise UserError(f"--output_dir {output_dir} is in use by another sdlora run (pid {pid}); wait for it to "
                            "finish, stop it, or choose another --output_dir")
        env = dict(os.environ, TQDM_MININTERVAL="10", PYTHONUNBUFFERED="1")
        env.pop(PROMPTS_ENV, None)
        if sample_prompts and sample_prompts.strip():
            env[PROMPTS_ENV] = sample_prompts
        proc = subprocess.Popen([sys.executable, "-m", "sdlora.ui.worker", recipe, *flags], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace")
        job = Job(key, proc, command(recipe, flags))
        launched[key] = job
    threading.Thread(target=_read_pipe, args=(job,), daemon=True).start()
    return job


def latest() -> Path | None:
    """The output folder of the run this UI process started last."""
    return next(reversed(launched), None)


def launched_flags(output_dir) -> tuple[str, list[str]] | None:
    """(recipe, flags) of the run this UI process started in `output_dir`, else None."""
    job = launched.get(folder_key(output_dir))
    if job is None:
        return None
    recipe = next(r for r, mod in RECIPES.items() if job.command[0] == f"{mod.SCRIPT}.py")
    return recipe, list(job.command[1:])


def _read_pipe(job: Job):
    for line in job.proc.stdout:
        if line.rstrip() == STARTED:
            job.started = True
        elif line.strip():
            job.said.append(line.rstrip())
    job.proc.stdout.close()
    if not job.started:
        job.proc.wait()
        job.ended.set()
    else:
        threading.Thread(target=job.proc.wait, daemon=True).start()  # reap it: a zombie would look alive


def holder(output_dir) -> int | None:
    """The pid of the sdlora run holding `output_dir` (the UI's or one from a terminal), or None.

    Only a lock that is really held names a run: the kernel drops a flock when its holder exits, so a lock file
    nobody holds (left by a kill -9, or written by hand) names no one, whatever pid it says, and the pid must still
    be an sdlora process, so that Stop never signals another program that got the pid since."""
    path = folder_key(output_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pass  # held: a run has the folder
            else:
                return None  # we got it, so no run holds it (closing the file lets go again)
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid = int(info["pid"])
        if info.get("host", socket.gethostname()) != socket.gethostname():
            return None  # a run on another machine (a shared folder): not one this UI can signal
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)
    return pid if _is_sdlora(pid) else None


_SDLORA_ARGS = {"sdlora", *(m.SCRIPT for m in RECIPES.values())}


def _is_sdlora(pid: int) -> bool:
    """Whether process `pid` runs sdlora (a recipe script, `sdlora train`, the UI's worker): its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (macOS): the held lock is all there is to go on
    except OSError:
        return False
    for a in argv[:4]:  # the interpreter, `-m`, then the module or script (or accelerate's launcher and it)
        name = Path(a).name.removesuffix(".py")
        if name in _SDLORA_ARGS or a.startswith("sdlora."):
            return True
    return False


def stop(output_dir) -> str:
    """Ask the run holding `output_dir` to stop (SIGTERM): training, it saves a checkpoint at its current step and
    exits; still loading or caching, it exits at once."""
    key = folder_key(output_dir)
    job = launched.get(key)
    pid = job.proc.pid if job and job.alive() else holder(key)
    if not pid:
        raise UserError(f"no run is going in {output_dir}")
    os.kill(pid, signal.SIGTERM)
    return f"stopping the run in {output_dir} (pid {pid}): a training run saves a checkpoint at the step it is on " \
           "(Resume continues it); one still loading stops at once"


def one_line_error(lines: list[str]) -> str | None:
    """The scripts' one-line error among a child's output lines (the last `error: …`, argparse's included)."""
    for line in reversed(lines):
        if line.startswith("error: ") or ": error: " in line:
            return line[line.index("error: "):]
    return None


@dataclass
class State:
    running: bool = False
    starting: bool = False  # the child is checking flags and data (still on its pipe)
    step: int = 0
    max_steps: int | None = None
    s_per_step: float | None = None
    lr: float | None = None
    loss: list = field(default_factory=list)  # [(step, loss)]
    val_loss: list = field(default_factory=list)  # [(step, validation loss)]
    samples: list = field(default_factory=list)  # newest first
    error: str | None = None
    finished: bool = False
    stopped: bool = False
    weights: Path | None = None
    command: list | None = None
    planned: dict | None = None  # {"max_steps", "resolution", "images"} once the run has read its data
    phase: str | None = None  # what a running run does now: "training", or between steps "sampling", "saving", …

    @property
    def eta_s(self) -> float | None:
        if self.s_per_step is None or self.max_steps is None:
            return None
        return max(self.max_steps - self.step, 0) * self.s_per_step

    def line(self) -> str:
        """One status line: what the run is doing, or how it ended."""
        if self.error:
            return self.error
        if self.starting:
            return "starting: checking the flags and the data, then loading the models"
        parts = []
        if self.planned and not self.loss and self.running:
            parts.append(f"planned: {self.planned['max_steps']} steps at {self.planned['resolution']} px")
        if self.max_steps:
            parts.append(f"step {self.step}/{self.max_steps}")
        if self.s_per_step is not None:
            parts.append(f"{self.s_per_step:.3f} s/step")
        if self.running and self.eta_s is not None:
            parts.append(f"ETA {clock(self.eta_s)}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        if self.loss:
            parts.append(f"loss {self.loss[-1][1]:.4f}")
        if self.val_loss:
            parts.append(f"val loss {self.val_loss[-1][1]:.4f}")
        head = "running" if self.running else "finished" if self.finished else \
            ("stopped" if self.loss else "stopped before training started") if self.stopped else \
            "interrupted (Resume continues from its last checkpoint)" if self.loss else "no run yet"
        if self.running and self.phase not in (None, "training"):
            head = f"running, {self.phase}…"
        elif self.running and not self.loss:
            head = "running: the first step" if self.phase == "training" else "running: loading the models"
        tail = f" · wrote {self.weights}" if self.finished and self.weights else ""
        return f"{head}" + (": " + " · ".join(parts) if parts else "") + tail


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def state(output_dir, logging_dir: str = "logs", samples: int = 12) -> State:
    """What the run in `output_dir` is doing or did, read from the folder (and from the child, while it checks)."""
    key = folder_key(output_dir)
    st = State()
    job = launched.get(key)
    if job is not None and not job.started:
        st.command = job.command
        if not job.ended.is_set():
            st.starting = True
        elif job.proc.returncode in EXIT_CODES.values():  # Stop while it was checking: nothing was made
            st.stopped = True
        else:
            st.error = one_line_error(job.said) or (job.said[-1] if job.said else f"the run exited ({job.proc.returncode})")
        return st
    st.running = bool(job and job.alive()) or holder(key) is not None
    records, current, last_end, started = _progress(logs_dir(key, logging_dir) / PROGRESS)
    st.planned = next((r for r in current if r.get("event") == "plan"), None)
    if st.running:  # the last step or phase record says what it does now (a step record: training)
        st.phase = next((r.get("phase", "training") for r in reversed(current) if "step" in r or "phase" in r), None)
    by_step = {r["step"]: r for r in records}
    for s in sorted(by_step):
        r = by_step[s]
        if "loss" in r:
            st.loss.append((s, r["loss"]))
        if "val_loss" in r:
            st.val_loss.append((s, r["val_loss"]))
    if by_step:
        last = by_step[max(by_step)]
        st.step, st.max_steps, st.lr = last["step"], last.get("max_steps"), last.get("lr")
        # The optimizer steps' own time; a run's first step (warm-up) only while it is the only one.
        recent = [r["s_per_step"] for r in records if "s_per_step" in r and not r.get("first")][-20:] or \
            [r["s_per_step"] for r in records if "s_per_step" in r][-1:]
        st.s_per_step = sum(recent) / len(recent) if recent else None
    if started:
        st.command = started.get("command")
    if last_end and not st.running:
        st.stopped = bool(last_end.get("stopped"))
        st.finished = last_end.get("rc") == 0 and not st.stopped
        if last_end.get("rc") not in (0, None) and not st.stopped:
            tail = [line for line in _tail(logs_dir(key, logging_dir) / LOG) if line.strip()]
            st.error = one_line_error(tail) or \
                f"error: the run failed ({tail[-1].strip() if tail else 'no output'}); see {logs_dir(key, logging_dir) / LOG}"
    weights = key / "pytorch_lora_weights.safetensors"
    st.weights = weights if weights.exists() else None
    folder = key / "samples"
    if folder.is_dir() and not folder.is_symlink():
        # Only the files the run wrote: a link placed there (to any file of the user's) is never served.
        pngs = [p for p in folder.glob("*.png") if not p.name.endswith("_grid.png") and not p.is_symlink()
                and p.is_file()]
        st.samples = sorted(pngs, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)[:samples]
    return st


def _progress(path: Path):
    """(the step records, the records since the last start, the last end event after it, the last start event).

    The step records are the current run's: a new run in the folder drops the earlier ones when it starts, a resumed
    one those from the step it resumes at on (it writes them again)."""
    records, current, start_event, end_event, resumed = [], [], None, None, False
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return records, current, None, None
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line being written as we read
        if r.get("event") == "start":
            start_event, end_event, current = r, None, []
            resumed = any(str(a).startswith("--resume_from_checkpoint") for a in r.get("command") or [])
            records = records if resumed else []
        elif r.get("event") == "end":
            end_event = r
        else:
            current.append(r)
            if "step" in r:
                if resumed:
                    records, resumed = [x for x in records if x["step"] < r["step"]], False
                records.append(r)
    return records, current, end_event, start_event


def _tail(path: Path, size: int = 16384) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return []


def shown(cmd: list[str] | None) -> str:
    return shlex.join(cmd) if cmd else ""
