"""A LoRA in memory: `Lora` holds ``{"<component>.<path>": layer}``, each layer a plain `Module` or LyCORIS's
LoHa/LoKr `lycoris.Product`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..lycoris import dora_change

if TYPE_CHECKING:  # torch is imported lazily so `sdlora --help` stays fast
    import torch


@dataclass
class Module:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA: [out]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    kind = "lora"

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        """Inputs × kernel elements (a conv layer's flattened input axis)."""
        return self.down.flatten(1).shape[1]

    def parameters(self) -> int:
        return self.down.numel() + self.up.numel() + (0 if self.magnitude is None else self.magnitude.numel())

    def delta(self, weight: torch.Tensor | None = None) -> "torch.Tensor":
        """The weight change this module adds at weight 1, in fp32, shaped like the layer's weight. A DoRA
        module's depends on the layer's base `weight`."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        d = d.reshape(self.up.shape[0], *self.down.shape[1:]) * (self.alpha / self.rank)
        return d if self.magnitude is None else dora_change(d, weight, self.magnitude)


@dataclass
class Lora:
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"
    source: str = "<memory>"
    base_model: str | None = None

    def components(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.modules})

    def component(self, comp: str) -> dict:
        """{path: layer} of one component's layers."""
        return {n.split(".", 1)[1]: m for n, m in self.modules.items() if n.startswith(comp + ".")}


def with_modules(lora: Lora, modules: dict[str, Module], **changes) -> Lora:
    return replace(lora, modules=modules, **changes)


def peft_magnitude(m: Module) -> "torch.Tensor":
    """A DoRA magnitude in peft's shape: [out] (Linear), [1, out, 1, 1] (Conv2d)."""
    return m.magnitude.reshape(1, -1, 1, 1) if m.down.dim() == 4 else m.magnitude
