"""What the UNet is conditioned on: prompt embeddings, and for SDXL pooled text and size/crop time ids.

SD 1.x/2.x: one CLIP text encoder's last hidden states. SDXL, as diffusers' SDXL scripts and pipeline
condition it: both text encoders' penultimate hidden states side by side, the second encoder's pooled
projection, and six `time_ids` per image (original h, w; crop top, left; target h, w) that tell the
model how the training image was sized and cropped (the batch carries them as `geometry`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import models

def text_encoder_names(family: str) -> tuple[str, ...]:
    """The family's text encoders (models.TEXT_ENCODERS): both for SDXL (and SD3's two CLIPs, the ones it trains),
    the first for SD 1.x/2.x."""
    return models.TEXT_ENCODERS if family in ("sdxl", "sd3") else models.TEXT_ENCODERS[:1]


def layers_used(name: str, family: str, num_layers: int) -> int:
    """How many of a text encoder's layers reach the UNet: all but the last of SDXL's first encoder (its
    penultimate hidden states are the conditioning); all of the second (its pooled output is the last layer's)."""
    if family == "sd3":  # both CLIPs condition SD3 with their penultimate hidden states (and the last's pooled output)
        return num_layers
    return num_layers - 1 if family == "sdxl" and name == "text_encoder" else num_layers


@dataclass
class Text:
    """Encoded prompts: `embeds` [B, 77, D] for cross-attention, `pooled` [B, P] (SDXL only)."""
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, idx) -> Text:
        return Text(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    def to(self, device, dtype=None) -> Text:
        return Text(self.embeds.to(device, dtype), None if self.pooled is None else self.pooled.to(device, dtype))

    @staticmethod
    def cat(parts: list[Text]) -> Text:
        pooled = [p.pooled for p in parts]
        return Text(torch.cat([p.embeds for p in parts]), None if pooled[0] is None else torch.cat(pooled))


def encode(encoders: list, tokenizers: list, captions: list[str], max_length: int | None = None,
           use_attention_mask: bool = False, clip_skip: int | None = None) -> Text:
    """The prompt conditioning from one text encoder (SD 1.x/2.x, at --clip_skip) or two (SDXL)."""
    if len(encoders) == 1:
        return Text(models.encode_prompts(encoders[0], tokenizers[0], captions, max_length, use_attention_mask,
                                          clip_skip))
    hidden = []
    for te, tok in zip(encoders, tokenizers):
        ids = models.tokenize(tok, captions, max_length).input_ids.to(next(te.parameters()).device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both
    return Text(torch.cat(hidden, dim=-1), out.text_embeds)  # pooled: the second encoder's projection


def unet_kwargs(text: Text, geometry: torch.Tensor, device, dtype) -> dict:
    """The UNet's extra conditioning: SDXL's pooled text and time ids; nothing for SD 1.x/2.x."""
    if text.pooled is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": text.pooled.to(device, dtype),
                                  "time_ids": geometry.to(device, dtype)}}
