"""LyCORIS's LoHa and LoKr layers: their weight change, and the same change as an exact plain LoRA.

A LoHa layer's change is a Hadamard (elementwise) product of two low-rank matrices,
``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``; a LoKr layer's is a Kronecker product
``kron(w1, w2) * scale``, each factor full or low-rank. Keys and shapes are LyCORIS's, which peft,
ComfyUI, A1111/Forge and kohya's tools share (``hada_w1_a`` … ``hada_t1``, ``lokr_w1`` … ``lokr_t2``).
Conv layers keep their kernel in the flattened input axis (``w1_b``: [r, in*kh*kw]) unless the file
uses LyCORIS's Tucker factors (``hada_t1`` / ``lokr_t2``).

The scale rule is the loaders' (ComfyUI, A1111, LyCORIS): alpha / rank, the rank read from the
low-rank factors; a LoKr layer with both factors full has no rank and scale 1. peft's LoKr divides by
its configured r even then, so sdlora folds each LoKr layer's scale into ``lokr_w1`` when it
reads or trains one (`fold_scale`) and keeps LoKr layers at scale 1: every loader agrees on that.

diffusers' `load_lora_weights` reads neither type; sdlora's loader applies them as the plain LoRA
`as_lora` builds, whose ``up @ down`` equals the change exactly (no SVD: a Hadamard product of rank-r
matrices is a rank-r² product of Khatri-Rao factors, a Kronecker product of factorisations is a
factorisation of the Kronecker product).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KEYS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
KIND_OF = {k: kind for kind, keys in KEYS.items() for k in keys}
NAMES = {"loha": "LoHa", "lokr": "LoKr"}


@dataclass
class Product:
    kind: str  # "loha" | "lokr"
    factors: dict[str, torch.Tensor]  # LyCORIS's key names (without the layer prefix)
    alpha: float | None  # None: scale 1
    magnitude: torch.Tensor | None = None  # DoRA (LyCORIS's dora_wd): [out]

    @property
    def rank(self) -> int | None:
        """The rank loaders divide alpha by: LoHa's r; LoKr's low-rank factor's (w2's before w1's), else None."""
        f = self.factors
        if self.kind == "loha":
            return f["hada_w1_b"].shape[0]
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in f:
                return f[key].shape[0]
        return None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha and self.rank else 1.0

    @property
    def out_features(self) -> int:
        f = self.factors
        if self.kind == "loha":
            return f["hada_w1_a"].shape[1 if "hada_t1" in f else 0]
        return self.factor_side("lokr_w1", 0) * self.factor_side("lokr_w2", 0)

    @property
    def in_features(self) -> int:
        """Inputs × kernel elements (a conv layer's flattened input axis)."""
        f = self.factors
        if self.kind == "loha":
            return f["hada_w1_b"].shape[1] * (math.prod(f["hada_t1"].shape[2:]) if "hada_t1" in f else 1)
        return self.factor_side("lokr_w1", 1) * self.factor_side("lokr_w2", 1)

    def factor_side(self, w: str, axis: int) -> int:
        """A LoKr factor's rows (axis 0) or flattened columns (1), read off whichever form it is stored in."""
        f = self.factors
        if w in f:
            return f[w].shape[0] if axis == 0 else math.prod(f[w].shape[1:])
        tucker = f.get(w.replace("_w", "_t"))
        if axis == 0:
            return f[w + "_a"].shape[1 if tucker is not None else 0]
        return f[w + "_b"].shape[1] * (math.prod(tucker.shape[2:]) if tucker is not None else 1)

    def parameters(self) -> int:
        return sum(t.numel() for t in self.factors.values()) + (0 if self.magnitude is None else self.magnitude.numel())

    # -------------------------------------------------------------- the weight change

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The change at weight 1, fp32, shaped like `weight` when given (else [out, in*kh*kw], or the Tucker
        factors' 4-D shape); a DoRA layer's needs the base `weight`."""
        d = self._raw() * self.scale
        return d if weight is None and self.magnitude is None else dora_change(d, weight, self.magnitude)

    def as_lora(self, shape) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(down, up, alpha) of a plain LoRA with exactly this change for a layer whose weight has `shape`
        (conv: down [R, in, kh, kw], up [out, R, 1, 1]). Where the exact factorisation's rank R would exceed
        the layer's, the dense change with an identity factor (rank min(out, in*kh*kw))."""
        import torch

        f = {k: v.float() for k, v in self.factors.items()}
        up = down = None
        if self.kind == "loha" and "hada_t1" not in f:
            r1, r2 = f["hada_w1_a"].shape[1], f["hada_w2_a"].shape[1]
            up = (f["hada_w1_a"][:, :, None] * f["hada_w2_a"][:, None, :]).reshape(-1, r1 * r2)
            down = (f["hada_w1_b"][:, None, :] * f["hada_w2_b"][None, :, :]).reshape(r1 * r2, -1)
        elif self.kind == "lokr" and "lokr_t2" not in f:
            u1, v1 = _split(f.get("lokr_w1_a"), f.get("lokr_w1_b"), f.get("lokr_w1"))
            u2, v2 = _split(f.get("lokr_w2_a"), f.get("lokr_w2_b"), f.get("lokr_w2"))
            up, down = torch.kron(u1, u2), torch.kron(v1, v2)
        out, inner = shape[0], math.prod(shape[1:])
        if up is None or up.shape[1] > min(out, inner):
            dense = self._raw().reshape(out, inner)
            up, down = (dense, torch.eye(inner)) if inner <= out else (torch.eye(out), dense)
        r = up.shape[1]
        up = up.reshape(out, r, *[1] * (len(shape) - 2))
        return down.reshape(r, *shape[1:]).contiguous(), up.contiguous(), self.scale * r

    # -------------------------------------------------------------- factors

    def _raw(self) -> torch.Tensor:
        """The change at scale 1 (no alpha)."""
        import torch

        if self.kind == "loha":
            return self._full(1) * self._full(2)
        w1, w2 = self._w1(), self._w2()
        return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2)

    def _full(self, i: int) -> torch.Tensor:
        """LoHa's i-th full matrix: w_a @ w_b, or with Tucker t: einsum as LyCORIS rebuilds it."""
        import torch

        f = self.factors
        a, b = f[f"hada_w{i}_a"].float(), f[f"hada_w{i}_b"].float()
        t = f.get(f"hada_t{i}")
        if t is None:
            return a @ b
        return torch.einsum("i j k l, j r, i p -> p r k l", t.float(), b, a)

    def _w1(self) -> torch.Tensor:
        f = self.factors
        return f["lokr_w1"].float() if "lokr_w1" in f else f["lokr_w1_a"].float() @ f["lokr_w1_b"].float()

    def _w2(self) -> torch.Tensor:
        import torch

        f = self.factors
        if "lokr_w2" in f:
            return f["lokr_w2"].float()
        a, b = f["lokr_w2_a"].float(), f["lokr_w2_b"].float()
        if "lokr_t2" in f:
            return torch.einsum("i j k l, i p, j r -> p r k l", f["lokr_t2"].float(), a, b)
        return a @ b


def dora_change(d: torch.Tensor, weight: torch.Tensor | None, magnitude: torch.Tensor | None) -> torch.Tensor:
    """A layer's change `d` (shaped like or flattened from `weight`), renormalised by DoRA's `magnitude` when it
    has one: the new weight is m * V / |V| per output channel, V = W + d."""
    if weight is None:
        from ..errors import UserError
        raise UserError("a DoRA layer's weight change depends on the base weight; this operation supports "
                        "layers without DoRA magnitudes only")
    d = d.reshape(weight.shape)
    if magnitude is None:
        return d
    v = weight.float() + d
    norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
    return v * (magnitude.float().reshape(norm.shape) / norm) - weight.float()


def _split(a, b, full):
    """(U, V) with U @ V = the factor: its own low-rank pair, else the full matrix beside an identity (the
    smaller side, so the rank is min(rows, columns))."""
    import torch

    if full is None:
        return a, b
    full = full.flatten(1)
    rows, cols = full.shape
    return (torch.eye(rows), full) if rows <= cols else (full, torch.eye(cols))


def fold_scale(p: Product, scale: float | None = None) -> Product:
    """A LoKr layer at scale 1 with the same change (or with `scale` instead of the loaders' rule, e.g. peft's):
    the scale moves into w1, and every loader then reads it alike. LoHa layers are returned as they are."""
    if p.kind != "lokr":
        return p
    scale = p.scale if scale is None else scale
    f = dict(p.factors)
    if scale != 1.0:
        key = "lokr_w1" if "lokr_w1" in f else "lokr_w1_a"
        f[key] = (f[key].float() * scale).to(f[key].dtype)
    return Product("lokr", f, None, p.magnitude)
