"""What every reader refuses, each as a one-line UserError naming the file and the layer: entries that are no named
tensors, damaged JSON, alphas that are no positive number, and weights that would crash later or silently ruin
images (a missing half, wrong dims or dtype, NaN/Inf, a change that overflows float32)."""
from __future__ import annotations

import json
import math

from ...errors import UserError
from ..lycoris import NAMES


def show(value, limit: int = 100) -> str:
    """User data inside a one-line message: quoted, escaped (no raw newline), cut short."""
    s = repr(value)
    return s if len(s) <= limit else s[:limit] + "…"


def check_tensors(tensors: dict, source) -> None:
    """A state dict at all: some entries, each a named tensor."""
    import torch

    if not tensors:
        raise UserError(f"{source}: the file holds no tensors; expected a LoRA .safetensors file")
    for k, t in tensors.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise UserError(f"{source}: entry {show(k)} is not a named tensor; expected a LoRA state dict")


def json_value(text, what: str, source):
    """Parse JSON from a header entry or config file; damage is a one-line error (deep nesting included)."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as e:
        reason = getattr(e, "msg", type(e).__name__)
        raise UserError(f"{source}: its {what} is not valid JSON ({reason}); the file is damaged (re-export it)") from None


def positive(value, what: str, source) -> float:
    """A finite number > 0 (a JSON number, not a bool or string), else a one-line error."""
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < float(value) < math.inf
    except OverflowError:  # a huge JSON integer
        ok = False
    if not ok:
        raise UserError(f"{source}: {what} is {show(value)}; expected a positive number")
    return float(value)


def alpha_value(key: str, t, source) -> float:
    """An alpha tensor's number: one positive real value."""
    import torch

    if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
        raise UserError(f"{source}: alpha {show(key)} has shape {list(t.shape)} and dtype "
                        f"{str(t.dtype).replace('torch.', '')}; expected one number")
    return positive(t.float().item(), f"alpha {show(key)}", source)


def check_weights(source, name, down, up):
    """Refuse what would crash later or silently ruin images: a missing half, wrong dims or dtype, NaN/Inf."""
    import torch

    where = f"{source}: layer {show(name)}"
    if down is None and up is None:
        raise UserError(f"{where} has only a DoRA magnitude (no down/up weights); expected both")
    if down is None or up is None:
        have, miss = ("down", "up") if up is None else ("up", "down")
        raise UserError(f"{where} has only its {have} weight (no {miss} weight); expected both")
    for t in (down, up):
        if not t.is_floating_point():
            raise UserError(f"{where} has {str(t.dtype).replace('torch.', '')} weights; expected floating point (fp32/fp16/bf16)")
    if (down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or 0 in down.shape
            or 0 in up.shape or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1))):
        shapes = [list(down.shape), list(up.shape)]
        raise UserError(f"{where} has mismatched down/up weights {shapes}; expected [r, in] and [out, r] "
                        "(conv: [r, in, kh, kw] and [out, r, 1, 1])")
    for t in (down, up):  # isfinite has no 1-byte float kernels: widen those
        if not torch.isfinite(t if t.element_size() > 1 else t.float()).all():
            raise UserError(f"{where} has NaN/Inf weights; the file is damaged (retrain or re-export it)")


def check_magnitude(source, name, mag, out: int, old_lycoris_dora: bool):
    """A DoRA magnitude as [out]: peft's [out] (conv [1, out, 1, 1]), LyCORIS's output-axis dora_scale [out, 1(, 1, 1)].
    `old_lycoris_dora`: a [1, in] magnitude is LyCORIS < 3.2's input-axis dora_scale (kohya files), refused."""
    import torch

    where = f"{source}: layer {show(name)}"
    if old_lycoris_dora and mag.dim() >= 2 and mag.shape[0] == 1 and mag.shape[1] != 1 and out != 1:
        raise UserError(f"{where} has an input-axis dora_scale {list(mag.shape)} (LyCORIS before 3.2, wd_on_out=False); "
                        f"sdlora applies DoRA per output channel (peft, LyCORIS >= 3.2): expected [{out}, 1]")
    if not mag.is_floating_point():
        raise UserError(f"{where} has a {str(mag.dtype).replace('torch.', '')} DoRA magnitude; expected floating point")
    if mag.numel() != out or max(mag.shape, default=1) != out:
        raise UserError(f"{where} has a DoRA magnitude of shape {list(mag.shape)}; expected {out} values, one per "
                        f"output channel")
    if not torch.isfinite(mag.float()).all():
        raise UserError(f"{where} has NaN/Inf weights; the file is damaged (retrain or re-export it)")
    return mag.reshape(out)


def check_scale(source, name, m):
    """Finite but absurd weights (a flipped exponent bit) make up @ down overflow. Bound every entry of the
    product by |row of up| * |column of down| (Cauchy-Schwarz), in float64 so the bound cannot overflow."""
    bound = m.up.double().flatten(1).norm(dim=1).max() * m.down.double().flatten(1).norm(dim=0).max()
    if bound * m.alpha / m.rank > 1e38:
        raise UserError(f"{source}: layer {show(name)} has weights so large that its weight change overflows "
                        "float32; the file is damaged (retrain or re-export it)")
    return m


def check_factors(source, name, kind: str, factors: dict):
    """A LoHa/LoKr layer's factors: every one it needs, floating point, in LyCORIS's dims."""
    where = f"{source}: layer {show(name)}"
    need = (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if kind == "loha" else
            ("lokr_w1" if "lokr_w1" in factors else "lokr_w1_a", "lokr_w1_b" if "lokr_w1" not in factors else "lokr_w1",
             "lokr_w2" if "lokr_w2" in factors else "lokr_w2_a", "lokr_w2_b" if "lokr_w2" not in factors else "lokr_w2"))
    missing = [k for k in need if k not in factors]
    if missing:
        raise UserError(f"{where} is a {NAMES[kind]} layer without {', '.join(missing)}; the file is damaged "
                        "(re-export it)")
    for k, t in factors.items():
        if not t.is_floating_point():
            raise UserError(f"{where} has {str(t.dtype).replace('torch.', '')} weights; expected floating point "
                            "(fp32/fp16/bf16)")
        dims = (4,) if k in ("hada_t1", "hada_t2", "lokr_t2") else (2, 4) if k == "lokr_w2" else (2,)
        if t.dim() not in dims or 0 in t.shape:
            raise UserError(f"{where} has a {k} of shape {list(t.shape)}; expected a {' or '.join(map(str, dims))}-D "
                            "tensor (LyCORIS' layout); the file is damaged (re-export it)")
