"""What a recipe's `main` does on the command line: check, claim the output folder, read data, train, share; a
problem the user can fix is one `error:` line on stderr and exit status 2."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..errors import UserError
from .flags import train_config


class RedactToken(logging.Filter):
    """Replace the token in any log record (ours or a library's) that happens to contain it."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def filter(self, record):
        if self.token and self.token in record.getMessage():
            record.msg, record.args = record.getMessage().replace(self.token, "***"), ()
        return True


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's own last-resort handler does), not the
    stream of the moment it was made: a recipe run in-process twice (a notebook, the tests) after stderr was
    swapped would otherwise write to a closed stream and print a logging traceback."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(token: str | None = None):
    """Plain INFO logs on stderr (the main process only), with any token redacted, without known noise."""
    from ..logs import silence_noise

    silence_noise()
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if token:
        handler.addFilter(RedactToken(token))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Only the main process speaks, so a skipped file is named once, not once per process.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.getLogger("sdlora").setLevel(logging.INFO if rank == 0 else logging.ERROR)



def run(args, make_recipe, on_start=None, settings: str | None = None, **hooks) -> int:
    """What both recipes do after parsing: check, claim the output folder, read data, train, share.

    Every problem the user can fix surfaces before any model is loaded, as one line on stderr, and leaves no
    output folder behind that this run made. `on_start(config, recipe)` is called once the folder is held and the
    data read (`recipe`: what `make_recipe` made), before any model loads; `hooks` go to the training loop
    (`on_step`, `should_stop`; the UI uses them). `settings`: the run's resolved flags as TOML, written into the
    folder (training/runconfig.py) once any checkpoint it resumes is checked.
    Ctrl+C / SIGTERM (training/interrupt.py): once training runs, the run stops after its step with a checkpoint,
    before that at once; one line says so, and the exit status is 130 / 143 (128 + the signal's number, as a shell
    reports a process those signals ended).
    """
    from ..output import hub
    from ..training import interrupt, outdir
    from ..training.hooks import Hooks
    from ..training.loop import train

    token = hub.resolve_token(args.hub_token)
    setup_logging(token)
    made = _first_missing(Path(args.output_dir)) if args.output_dir else None
    signals = interrupt.Interrupts().install()
    try:
        config = train_config(args, token)
        # One process per run holds the folder: the one that writes (rank 0 under `accelerate launch`).
        with outdir.claim(config, holder=_is_main()):
            recipe = make_recipe(args, config)
            if on_start:
                on_start(config, recipe)
            hooks = dict(hooks, should_stop=signals.polled(hooks.get("should_stop")))
            if settings is not None:
                hooks["on_trainable"] = _writes_settings(config, settings, hooks.get("on_trainable"))
            path = train(config, recipe, Hooks(**hooks))
            if signals.signum:
                return _interrupted(signals, config)
            if path is not None and config.push_to_hub:
                interrupt.entered("push")
                hub.push(config.output_dir, config.hub_model_id, token)
    except UserError as e:
        if made is not None:
            _remove_empty(Path(args.output_dir), made)
        print(f"error: {hub.redact(str(e), token)}", file=sys.stderr)
        return 2
    except interrupt.Stopped as e:  # before training started, while uploading, or a second signal
        if made is not None:
            _remove_empty(Path(args.output_dir), made)
        if _is_main():
            print(interrupt.describe(e, Path(args.output_dir) if args.output_dir else None), file=sys.stderr)
        return e.exit_code
    finally:
        signals.restore()
    return 0


def _writes_settings(config, settings: str, then=None):
    """An on_trainable hook that writes the run's settings into its folder (the main process), then calls `then`."""
    from ..training import runconfig

    def on_trainable(parts):
        if _is_main():
            runconfig.write(config.output_dir, settings)
        if then:
            then(parts)
    return on_trainable


def _interrupted(signals, config) -> int:
    """The exit status of a run a signal came to once training ran: the loop stopped it at a step (and said so),
    or it came after the last step, so the run finished (only the upload is skipped)."""
    if signals.stopped:
        return signals.exit_code
    main = _is_main()
    if main:
        print(f"interrupted ({signals.name}) as the run ended: its LoRA is saved in {config.output_dir}"
              f"{'; not uploaded to the hub' if config.push_to_hub else ''}", file=sys.stderr)
    return signals.exit_code if config.push_to_hub and main else 0


def _is_main() -> bool:
    """Whether this is the process that holds the folder and speaks (rank 0 under `accelerate launch`)."""
    return int(os.environ.get("RANK", "0")) == 0


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (what this run would create), or None."""
    folder = folder.expanduser().absolute()
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            return missing
        missing = p
    return missing


def _remove_empty(folder: Path, up_to: Path):
    """Remove `folder` and its parents up to `up_to`, each only while empty (a failed run made them)."""
    from ..training.manifest import remove_if_alone
    from ..training.runconfig import NAME

    folder = folder.expanduser().absolute()
    remove_if_alone(folder, also=(NAME,))  # the record (and settings) of a run that wrote nothing else
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == up_to:
            return
