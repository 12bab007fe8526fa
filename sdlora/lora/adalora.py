"""AdaLoRA (Zhang et al. 2023) through peft: SVD-shaped adapters whose ranks are pruned to a budget while training.

Each adapted layer holds ``B @ (A * E)`` with E a vector of singular values; every step peft's
RankAllocator scores each singular triplet (an EMA of |weight * grad| and its uncertainty) and zeroes
the lowest E entries so the total rank follows a cubic schedule from ``init_r`` per layer down to
``target_r`` per layer on average. peft's `inject_adapter_in_model` discards the tuner that owns the
allocator, so sdlora keeps the `AdaLoraModel` itself and the training loop calls `update` as a hook.

The saved file is plain LoRA: each layer at the rank it ended with (``down = (A*E)[kept]``,
``up = B[:, kept]``, scale ``lora_alpha / init_r`` as peft applies it), so every loader reads it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ADAPTER = "default"
_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def config(rank: int, alpha: float, targets: list[str], dropout: float, init_r: int, total_steps: int,
           tinit: int, tfinal: int, delta_t: int):
    from peft import AdaLoraConfig

    # target_r is the average final rank per layer: --rank, as for the other types
    return AdaLoraConfig(init_r=init_r, target_r=rank, lora_alpha=alpha, lora_dropout=dropout,
                         target_modules=targets, total_step=total_steps, tinit=tinit, tfinal=tfinal, deltaT=delta_t)


def attach(model: torch.nn.Module, cfg):
    """Freeze `model`, add AdaLoRA layers in place; returns (the tuner that allocates ranks, trainable params)."""
    from peft.tuners.adalora import AdaLoraModel

    model.requires_grad_(False)
    tuner = AdaLoraModel(model, cfg, ADAPTER)
    return tuner, [p for p in model.parameters() if p.requires_grad]


def penalty(tuner) -> torch.Tensor:
    """The orthogonality regulariser AdaLoRA adds to the loss (peft adds it only to a `.loss` output, which a UNet
    does not have): mean over layers of |A Aᵀ - I| + |Bᵀ B - I|, times orth_reg_weight."""
    import torch

    terms = []
    for n, p in tuner.model.named_parameters():
        if (f"lora_A.{ADAPTER}" in n or f"lora_B.{ADAPTER}" in n) and p.requires_grad:
            m = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.norm(m - torch.eye(m.shape[0], device=p.device, dtype=p.dtype), p="fro"))
    return tuner.peft_config[ADAPTER].orth_reg_weight * torch.stack(terms).mean()


def update(tuner, step: int) -> int:
    """After the optimizer step, before the gradients are cleared: score, prune to the step's budget; returns the
    number of ranks still active."""
    tuner.update_and_allocate(step)
    return active_ranks(tuner.model)


def active_ranks(model) -> int:
    return sum(int((m.lora_E[ADAPTER] != 0).sum()) for m in layers(model))


def initial_ranks(model) -> int:
    return sum(m.lora_E[ADAPTER].shape[0] for m in layers(model))


def layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_E") and ADAPTER in m.lora_E]


def state(tuner) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold beyond the weights for an exact resume: the allocator's score EMAs and, once
    frozen, the final rank pattern."""
    import torch

    alloc, out = tuner.rankallocator, {}
    for part in _STATE:
        out.update({f"{part}/{n}": t.detach().float().contiguous() for n, t in getattr(alloc, part).items()})
    pattern = tuner.peft_config[ADAPTER].rank_pattern or {}
    out.update({f"rank_pattern/{n}": torch.tensor(list(mask), dtype=torch.uint8) for n, mask in pattern.items()})
    return out


def load_state(tuner, tensors: dict[str, torch.Tensor]):
    alloc = tuner.rankallocator
    for part in _STATE:
        setattr(alloc, part, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(part + "/")})
    pattern = {k.split("/", 1)[1]: [bool(b) for b in v.tolist()] for k, v in tensors.items()
               if k.startswith("rank_pattern/")}
    tuner.peft_config[ADAPTER].rank_pattern = pattern or None


def modules(model, prefix: str, dtype=None) -> dict:
    """The trained layers as plain LoRA at their final ranks ({`unet.…`: formats.Module}); layers pruned to rank 0
    are left out (they change nothing)."""
    from .formats import Module, canonical

    out = {}
    for name, m in model.named_modules():
        if not (hasattr(m, "lora_E") and ADAPTER in m.lora_E):
            continue
        a, e, b = (m.lora_A[ADAPTER].detach().float(), m.lora_E[ADAPTER].detach().float(),
                   m.lora_B[ADAPTER].detach().float())
        keep = (e.flatten() != 0).nonzero().flatten()
        if keep.numel() == 0:
            continue
        scale = m.scaling[ADAPTER] / (m.ranknum[ADAPTER].item() + 1e-5)  # peft's get_delta_weight
        down, up = (a * e)[keep], b[:, keep]
        base = m.get_base_layer().weight
        down = down.reshape(len(keep), *base.shape[1:]) if base.dim() == 4 else down
        up = up.reshape(*up.shape, 1, 1) if base.dim() == 4 else up
        cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)
        out[canonical(prefix, name)] = Module(cast(down).contiguous(), cast(up).contiguous(), scale * len(keep))
    return out
