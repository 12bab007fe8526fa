"""peft's adapter configs as LoRA files carry them (peft's adapter_config.json or header entry, diffusers'
`lora_adapter_metadata`): each layer's alpha and r read from one (`Alphas`), checked, and written."""
from __future__ import annotations

import collections
import math
import re

from ...errors import UserError
from ..lycoris import NAMES as LYCORIS_NAMES
from .checks import positive, show


def pattern_regex(key: str) -> str:
    """peft's rank/alpha_pattern rule: a key matches a module path it ends with."""
    return rf"(.*\.)?({key})$"


def pattern(patterns, path):
    """The value of the first of `patterns` that matches `path` (under either text-encoder spelling), or None."""
    for key, value in (patterns or {}).items():
        if re.match(pattern_regex(key), path) or re.match(pattern_regex(key), path.removeprefix("text_model.")):
            return value
    return None


def check_config(cfg, what, source):
    """The peft config fields sdlora reads: numbers > 0 and pattern tables of valid regexes."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: its {what} is not a JSON object; the file is damaged (re-export it)")
    for key in ("lora_alpha", "alpha", "r"):
        if key in cfg:
            positive(cfg[key], f"{key} in its {what}", source)
    for key in ("alpha_pattern", "rank_pattern"):
        table = cfg.get(key) or {}
        if not isinstance(table, dict):
            raise UserError(f"{source}: {key} in its {what} is not a JSON object; the file is damaged (re-export it)")
        for p, value in table.items():
            positive(value, f"{key}[{show(p)}] in its {what}", source)
            try:
                re.compile(pattern_regex(p))
            except (re.error, TypeError):
                raise UserError(f"{source}: {key} in its {what} has an invalid pattern {show(p)}; "
                                "expected module names") from None


class Alphas:
    """Each layer's alpha by its file's rule: its alpha tensor's (`table`, {layer: alpha}), else its component's
    peft config's (`configs`, {component: config}, with patterns and rsLoRA), else its rank (scale 1). `what`
    names the configs in messages."""

    def __init__(self, table: dict, configs: dict | None = None, what: str = "", source="<memory>"):
        self.table, self.configs, self.what, self.source = table, configs or {}, what, source

    def __call__(self, name: str, r):
        comp, path = name.split(".", 1)
        cfg = self.configs.get(comp)
        key = "alpha" if cfg and str(cfg.get("peft_type")).upper() in ("LOHA", "LOKR") else "lora_alpha"
        if name in self.table:
            return self.table[name]
        if not cfg or key not in cfg:
            return None if r is None else float(r)
        value = float(cfg[key] if (value := pattern(cfg.get("alpha_pattern"), path)) is None else value)
        if cfg.get("use_rslora") and key == "lora_alpha" and r:  # peft scales by alpha/sqrt(r): the same as alpha' / r
            return value * math.sqrt(r)
        return value

    def rank(self, name: str):
        """The configured r (peft's LoKr divides alpha by it even when both factors are full)."""
        comp, path = name.split(".", 1)
        cfg = self.configs.get(comp) or {}
        value = pattern(cfg.get("rank_pattern"), path)
        return cfg.get("r") if value is None else value

    def check_rank(self, name: str, kind: str, r: int):
        """A config whose r (or rank_pattern) contradicts a LoRA/LoHa layer's weights is refused: alpha / r would
        differ by the factor between them (peft, and so diffusers' loader, refuse such a file: its layers are
        built at the configured r, and the weights do not fit them). LoKr's r is no rank of its factors."""
        cfg = self.configs.get(name.split(".", 1)[0])
        if kind == "lokr" or not cfg or str(cfg.get("peft_type") or "LORA").upper() != kind.upper():
            return
        want = self.rank(name)
        if want is not None and float(want) != r:
            raise UserError(f"{self.source}: its {self.what} says r={want:g} for layer "
                            f"{show(name)}, but its weights have rank {r}; the strength alpha/r is ambiguous, so "
                            "the file is refused (re-export it, or fix r / rank_pattern in its config)")


def peft_config_dict(mods: dict) -> dict:
    """peft LoraConfig kwargs that reproduce each module's rank and alpha exactly."""
    r = collections.Counter(m.rank for m in mods.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.alpha for m in mods.values()).most_common(1)[0][0]
    return {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(mods), "init_lora_weights": True,
        "rank_pattern": {p: m.rank for p, m in mods.items() if m.rank != r},
        "alpha_pattern": {p: m.alpha for p, m in mods.items() if m.alpha != alpha},
        "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0,
        "use_dora": any(m.magnitude is not None for m in mods.values()),
    }


def lycoris_config_dict(mods: dict, source) -> dict:
    """peft LoHaConfig / LoKrConfig kwargs under which peft builds these layers' factors and applies their change:
    LoHa's rank and alpha per layer; LoKr's at scale 1 (fold_scale), with an r that gives each factor its form."""
    kinds = {m.kind for m in mods.values()}
    if len(kinds) > 1:
        raise UserError(f"{source}: peft holds one adapter type per model; this LoRA mixes "
                        f"{', '.join(sorted(LYCORIS_NAMES.get(k, 'LoRA') for k in kinds))} — save it as kohya or diffusers")
    kind = kinds.pop()
    if any(m.magnitude is not None for m in mods.values()):
        raise UserError(f"{source}: peft has no DoRA for {LYCORIS_NAMES[kind]} layers; save it as kohya or diffusers")
    if kind == "loha":
        ranks = {p: m.rank for p, m in mods.items()}
        alphas = {p: m.alpha if m.alpha is not None else m.rank for p, m in mods.items()}
        extra = {"use_effective_conv2d": any("hada_t1" in m.factors for m in mods.values())}
    else:
        ranks = {p: _lokr_rank(p, m, source) for p, m in mods.items()}
        alphas = ranks
        extra = {"decompose_both": any("lokr_w1_a" in m.factors for m in mods.values()), "decompose_factor": -1}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"peft_type": kind.upper(), "r": r, "alpha": alpha, "target_modules": sorted(mods),
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, **extra}


def _lokr_rank(path: str, m, source) -> int:
    """The r under which peft builds a LoKr layer's factors in their form; a form peft does not build is refused.
    (A conv layer's w1 splits its input channels, which the flattened factors do not tell apart from the kernel:
    only the output side is checked there.)"""
    from peft.tuners.lokr.layer import factorization

    f, a, c = m.factors, m.factor_side("lokr_w1", 0), m.factor_side("lokr_w1", 1)
    if "lokr_t2" in f or a != factorization(m.out_features)[0] or m.in_features % c:
        raise UserError(f"{source}: layer {show(path)} is a LoKr layer whose factor shapes peft does not build "
                        "(a factor other than -1, or Tucker); save it as kohya or diffusers")
    # peft keeps w2 full when r >= max(w2's sides) / 2: a full w2 gets that r, a low-rank one its own
    return m.rank or max(m.factor_side("lokr_w2", 0), m.factor_side("lokr_w2", 1))
