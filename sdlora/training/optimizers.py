"""The optimizers a run trains with: diffusers' and kohya's names -> the maintained library's class, their arguments
(--optimizer_args, the --adam_* and --prodigy_* flags), their parameter groups (LoRA+ through peft's builder), their
LR schedule, the checks made before any model loads, and schedule-free's train/eval modes.

Each optimizer comes from the library that maintains it: torch (AdamW, SGD), bitsandbytes (8-bit), prodigyopt
(Prodigy, its authors'), schedulefree (its authors', Meta), transformers (Adafactor), lion-pytorch (Lion, as kohya
uses), pytorch-optimizer (CAME: the authors' came-pytorch has had no release since 2024); any other by module.Class.
"""
from __future__ import annotations

import ast
import inspect
import logging
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import UserError

log = logging.getLogger("sdlora")
EXTRA = 'pip install "sdlora[optimizers]"'


@dataclass(frozen=True)
class Kind:
    name: str  # kohya's spelling
    target: str  # "module:Class"
    package: str  # the pip package ("" where the base install has it)
    adam: bool  # takes --adam_beta1/--adam_beta2/--adam_epsilon/--adam_weight_decay


KINDS = {k.name.lower(): k for k in (
    Kind("AdamW", "torch.optim:AdamW", "", True),
    Kind("AdamW8bit", "bitsandbytes.optim:AdamW8bit", "bitsandbytes", True),
    Kind("PagedAdamW8bit", "bitsandbytes.optim:PagedAdamW8bit", "bitsandbytes", True),
    Kind("Lion", "lion_pytorch:Lion", "lion-pytorch", False),
    Kind("Lion8bit", "bitsandbytes.optim:Lion8bit", "bitsandbytes", False),
    Kind("Prodigy", "prodigyopt:Prodigy", "prodigyopt", True),
    Kind("Adafactor", "transformers.optimization:Adafactor", "", False),
    Kind("AdamWScheduleFree", "schedulefree:AdamWScheduleFree", "schedulefree", True),
    Kind("RAdamScheduleFree", "schedulefree:RAdamScheduleFree", "schedulefree", True),
    Kind("CAME", "pytorch_optimizer:CAME", "pytorch-optimizer", False),
    Kind("SGDNesterov", "torch.optim:SGD", "", False),
)}


def kind_of(name: str | None, use_8bit_adam: bool = False) -> Kind:
    """The optimizer --optimizer/--optimizer_type names (case as either script spells it; None: AdamW), or
    module.Class."""
    name = name or "AdamW"
    if use_8bit_adam:
        if name.lower() not in ("adamw", "adamw8bit"):
            raise UserError(f"--use_8bit_adam and --optimizer {name} contradict each other; use --optimizer AdamW8bit")
        return KINDS["adamw8bit"]
    if name.lower() in KINDS:
        return KINDS[name.lower()]
    if "." not in name.strip(".") or " " in name:
        raise UserError(f"--optimizer {name}: unknown; use one of {', '.join(k.name for k in KINDS.values())} "
                        "(diffusers' adamw/prodigy too), or module.Class for any other")
    module, _, cls = name.rpartition(".")
    return Kind(name, f"{module}:{cls}", module.split(".")[0], False)


def optimizer_class(kind: Kind):
    """The class `kind` names; a missing package is one line naming what to install."""
    try:
        cls = pkgutil.resolve_name(kind.target)
    except (ImportError, AttributeError) as e:
        install = EXTRA if kind.name.lower() in KINDS else f"pip install {kind.package}"
        raise UserError(f"--optimizer {kind.name}: {kind.target.replace(':', '.')} can't be imported "
                        f"({str(e).splitlines()[0][:100]}); {install}") from None
    if not callable(cls):
        raise UserError(f"--optimizer {kind.name}: {kind.target.replace(':', '.')} is not an optimizer class")
    return cls


def parse_args(items) -> dict:
    """--optimizer_args key=value … as {key: Python literal}; a bad item is one line."""
    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        try:
            if not (eq and key.strip().isidentifier()):
                raise ValueError
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"--optimizer_args {item!r}: not key=VALUE with VALUE a Python literal (e.g. "
                            "weight_decay=0.01 betas=(0.9,0.99) decouple=True d_coef=2)") from None
    return out


def check(config) -> dict:
    """The checked optimizer settings, before any model loads: {"optimizer": its canonical name, "optimizer_args":
    the items as given}. Imports the optimizer's class (a missing package is one line) and checks its arguments."""
    kind = kind_of(config.optimizer, config.use_8bit_adam)
    cls = optimizer_class(kind)
    given = parse_args(config.optimizer_args)
    taken = inspect.signature(cls).parameters
    for key in given:
        if key == "lr" or key == "params":
            raise UserError(f"--optimizer_args {key}=…: set the learning rate with --learning_rate (and --unet_lr, "
                            "--text_encoder_lr)")
        if key not in taken and not any(p.kind == p.VAR_KEYWORD for p in taken.values()):
            raise UserError(f"--optimizer_args {key}=…: {kind.name} takes no argument {key!r}; it takes "
                            f"{', '.join(k for k in taken if k not in ('self', 'params', 'lr'))}")
    if kind.name == "Prodigy" and not 0.1 < config.learning_rate <= 10:
        log.warning("--optimizer Prodigy with --learning_rate %g: Prodigy estimates the step size itself and expects "
                    "a learning rate around 1.0 (as diffusers and kohya advise)", config.learning_rate)
    for flag in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        value = getattr(config, flag)
        if value is not None and (value <= 0 or config.lora_type not in ("lora", "dora")):
            raise UserError(f"--{flag} {value}: LoRA+ takes a ratio > 0 (e.g. 16), with --lora_type lora or dora")
    if _relative_step(kind, given) and config.lr_scheduler != "constant":
        log.warning("--optimizer Adafactor (relative_step): its own step size replaces --lr_scheduler %s; "
                    "pass --optimizer_args relative_step=False to use --learning_rate and the schedule",
                    config.lr_scheduler)
    name = kind_of(config.optimizer).name
    items = tuple(str(i) for i in config.optimizer_args or ())
    return {"optimizer": None if name == "AdamW" else name, "optimizer_args": items or None}


def _relative_step(kind: Kind, kw: dict) -> bool:
    """Adafactor's own step size, on unless relative_step=False (kohya's default; warmup_init needs it)."""
    return kind.name == "Adafactor" and bool(kw.get("relative_step", True) or kw.get("warmup_init"))


def keywords(config, kind: Kind) -> dict:
    """The optimizer's keyword arguments: diffusers' --adam_*/--prodigy_* flags for the Adam kinds and Prodigy,
    kohya's defaults (SGD's momentum 0.9, Adafactor's relative step), then --optimizer_args over them."""
    kw = {}
    if kind.adam:
        kw = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if kind.name == "Prodigy":
        kw.update(beta3=config.prodigy_beta3, decouple=config.prodigy_decouple,
                  use_bias_correction=config.prodigy_use_bias_correction,
                  safeguard_warmup=config.prodigy_safeguard_warmup)
    if kind.name == "SGDNesterov":
        kw.update(momentum=0.9, nesterov=True)
    kw.update(parse_args(config.optimizer_args))
    if kind.name == "Adafactor":
        kw["relative_step"] = _relative_step(kind, kw)
    return kw


def build(config, models: dict, params: dict, lr: float, max_steps: int):
    """(the optimizer over the LoRA of `models` {"unet"[, text encoders]}, its LR schedule)."""
    kind = kind_of(config.optimizer, config.use_8bit_adam)
    cls, kw = optimizer_class(kind), keywords(config, kind)
    relative = kw.get("relative_step", False)
    groups = param_groups(config, kind, models, params, lr, kw.get("weight_decay", _default(cls, "weight_decay")))
    if relative:  # Adafactor's own step size: no learning rate (transformers refuses one)
        for g in groups:
            g.pop("lr", None)
    optimizer = cls(groups, **kw) if relative else cls(groups, lr=lr, **kw)
    if relative:
        from transformers.optimization import AdafactorSchedule

        return optimizer, AdafactorSchedule(optimizer, lr)
    from diffusers.optimization import get_scheduler

    return optimizer, get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                    num_training_steps=max_steps, num_cycles=config.lr_num_cycles,
                                    power=config.lr_power)


def param_groups(config, kind: Kind, models: dict, params: dict, lr: float, decay: float) -> list[dict]:
    """The UNet's LoRA at --unet_lr (default: `lr`), each text encoder's at --text_encoder_lr with its weight decay;
    with LoRA+, each split by peft's builder into A and B (the B matrices at the ratio times the rate)."""
    te_decay = config.adam_weight_decay_text_encoder
    if te_decay is None and kind.adam and "weight_decay" not in parse_args(config.optimizer_args):
        te_decay = config.adam_weight_decay
    groups = []
    for name in params:
        unet = name == "unet"
        group_lr = (config.unet_lr or lr) if unet else (config.text_encoder_lr or lr)
        extra = {} if unet or te_decay is None else {"weight_decay": te_decay}
        ratio = (config.loraplus_unet_lr_ratio if unet else config.loraplus_text_encoder_lr_ratio) \
            or config.loraplus_lr_ratio
        if not ratio:
            groups.append({"params": params[name], "lr": group_lr, **extra})
            continue
        from peft.optimizers import create_loraplus_optimizer

        split = create_loraplus_optimizer(models[name], _groups, lr=group_lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=extra.get("weight_decay", decay))
        groups += [g for g in split if g["params"]]
    return groups


def _groups(groups, **_):
    """What peft's LoRA+ builder hands its optimizer class: the parameter groups, kept for the real optimizer."""
    return groups


def _default(cls, name: str, fallback=0.0):
    p = inspect.signature(cls).parameters.get(name)
    return fallback if p is None or p.default is p.empty else p.default


def is_schedule_free(optimizer) -> bool:
    """An optimizer whose weights for sampling and saving differ from those it steps (schedulefree's eval mode)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


def stepping(optimizer):
    """Put a schedule-free optimizer in its train mode (its step refuses to run in any other)."""
    if is_schedule_free(optimizer):
        optimizer.train()


@contextmanager
def evaluating(optimizer):
    """The weights to sample, validate and save with: a schedule-free optimizer's averaged ones (its eval mode), and
    afterwards the ones it steps, restored bit for bit (eval then train rounds them), so sampling never changes what
    a run trains; no change for every other optimizer."""
    if not is_schedule_free(optimizer):
        yield
        return
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    kept = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
