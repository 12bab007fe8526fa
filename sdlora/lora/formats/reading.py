"""What every codec's reader shares: a file's keys gathered into per-layer slots (`add`), then each slot checked and
built into a layer (`assemble`), a plain `Module` or a LoHa/LoKr `lycoris.Product`."""
from __future__ import annotations

import re

from ...errors import UserError
from ..lycoris import KIND_OF, NAMES as LYCORIS_NAMES, Product, fold_scale
from .checks import alpha_value, check_factors, check_magnitude, check_scale, check_weights, json_value, show
from .layers import Lora, Module
from .names import PADDING_KEY

FACTORS = "|".join(KIND_OF)  # LyCORIS's factor names, as a regex


def add(slots: dict, name: str, which: str, t, key: str, source):
    """Put tensor `t` (the file's `key`) in layer `name`'s slot `which`: "down", "up", "magnitude", or a LoHa/LoKr
    factor's name."""
    slot = slots.setdefault(name, {})
    if which in slot:  # two spellings of one weight: which one is meant is unknowable
        raise UserError(f"{source}: layer {show(name)} has two {which} weights (one is "
                        f"{show(key)}); expected one key per weight")
    slot[which] = t


def alpha_table(tensors: dict, key: str, name_of, source) -> dict[str, float]:
    """{layer: alpha} of a file's alpha tensors: those whose key fully matches the regex `key`, each layer named by
    `name_of(*groups)`."""
    table = {}
    for k, t in tensors.items():
        m = re.fullmatch(key, k)
        if m:
            value = alpha_value(k, t, source)
            table[name_of(*m.groups())] = value
    return table


def assemble(fmt: str, slots: dict, alphas, metadata: dict, source, lokr_config_scale: bool = False,
             old_lycoris_dora: bool = False) -> Lora:
    """The Lora of a file whose keys are gathered in `slots` ({layer: {which: tensor}}), each layer checked.
    `alphas` (peftconfig.Alphas) gives each layer's alpha; `lokr_config_scale`: LoKr layers scale by alpha / the
    configured r (peft's rule); `old_lycoris_dora`: see checks.check_magnitude."""
    padding = json_value(metadata.get(PADDING_KEY, "[]"), f"{PADDING_KEY} header", source)
    if not isinstance(padding, list) or not all(isinstance(n, str) for n in padding):
        raise UserError(f"{source}: its {PADDING_KEY} header is not a list of layer names; the file is damaged (re-export it)")
    modules = {}
    for name, slot in slots.items():
        if any(k in KIND_OF for k in slot):
            modules[name] = product(source, name, slot, alphas, lokr_config_scale, old_lycoris_dora)
            continue
        down, up, mag = slot.get("down"), slot.get("up"), slot.get("magnitude")
        check_weights(source, name, down, up)
        magnitude = check_magnitude(source, name, mag, up.shape[0], old_lycoris_dora) if mag is not None else None
        alphas.check_rank(name, "lora", down.shape[0])
        modules[name] = check_scale(source, name, Module(down, up, alphas(name, down.shape[0]), magnitude))
    for name in padding:  # zero padding the kohya codec writes for diffusers
        if name in modules and not modules[name].up.any() and not modules[name].down.any():
            del modules[name]
    if not modules:
        raise UserError(f"{source}: no LoRA layer has both down and up weights; expected a LoRA file")
    metadata = {k: v for k, v in metadata.items() if k != PADDING_KEY}
    return Lora(modules, metadata, fmt, source)


def product(source, name, slot, alphas, lokr_config_scale: bool, old_lycoris_dora: bool) -> Product:
    """A LoHa/LoKr layer from its factors, checked: one kind, every factor it needs, shapes that multiply, finite."""
    import torch

    where = f"{source}: layer {show(name)}"
    kinds = {KIND_OF.get(k, "lora") for k in slot if k != "magnitude"}
    if len(kinds) > 1:
        raise UserError(f"{where} mixes {' and '.join(sorted(LYCORIS_NAMES.get(k, 'LoRA') for k in kinds))} weights; "
                        "expected one kind of layer")
    kind = kinds.pop()
    factors = {k: v for k, v in slot.items() if k != "magnitude"}
    check_factors(source, name, kind, factors)
    p = Product(kind, factors, None)
    try:
        change = p.delta()
        rank = p.rank
    except (RuntimeError, IndexError, KeyError, ValueError):
        shapes = {k: list(v.shape) for k, v in factors.items()}
        raise UserError(f"{where} has {LYCORIS_NAMES[kind]} factors whose shapes do not multiply {shapes}; the file "
                        "is damaged (re-export it)") from None
    if not torch.isfinite(change).all():
        raise UserError(f"{where} has NaN/Inf weights or a weight change that overflows float32; the file is damaged "
                        "(retrain or re-export it)")
    alphas.check_rank(name, kind, rank)
    alpha, scale = alphas(name, rank), None
    if kind == "lokr" and lokr_config_scale and alpha is not None and alphas.rank(name):
        scale = alpha / alphas.rank(name)  # peft's rule: alpha / its configured r, even with both factors full
    p = fold_scale(Product(kind, factors, alpha), scale)
    if "magnitude" in slot:
        check_magnitude(source, name, slot["magnitude"], p.out_features, old_lycoris_dora)
        p.magnitude = slot["magnitude"]
    return p
