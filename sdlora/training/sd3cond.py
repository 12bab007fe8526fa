"""What an SD3 / 3.5 transformer is conditioned on, as diffusers' SD3 script and StableDiffusion3Pipeline encode it:
both CLIPs' penultimate hidden states side by side (77 tokens), zero-padded to T5's width and followed by T5's
`max_sequence_length` last hidden states; the pooled text is both CLIPs' projections side by side. Without T5
(--drop_t5) its tokens are zeros, as the pipeline makes them with text_encoder_3=None."""
from __future__ import annotations

import torch

from .conditioning import Text


def clip_tokens(encoder, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states [B, 77, D], pooled projection [B, P]) of one CLIP text encoder."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def t5_tokens(encoder, tokenizer, captions: list[str], max_sequence_length: int) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(next(encoder.parameters()).device))[0]


def encode(encoders: list, tokenizers: list, captions: list[str], max_sequence_length: int, joint_dim: int) -> Text:
    """The joint prompt embeddings [B, 77 + max_sequence_length, joint_dim] and pooled text; `encoders[2]` None:
    T5 dropped."""
    clips = [clip_tokens(te, tok, captions) for te, tok in zip(encoders[:2], tokenizers[:2])]
    hidden = torch.cat([h for h, _ in clips], dim=-1)
    pooled = torch.cat([p for _, p in clips], dim=-1)
    if encoders[2] is None:
        t5 = hidden.new_zeros(hidden.shape[0], max_sequence_length, joint_dim)
    else:
        t5 = t5_tokens(encoders[2], tokenizers[2], captions, max_sequence_length).to(hidden.dtype)
    hidden = torch.nn.functional.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1]))
    return Text(torch.cat([hidden, t5], dim=-2), pooled)


def transformer_kwargs(text: Text, device, dtype) -> dict:
    """The transformer's conditioning: the joint prompt embeddings and the pooled projections."""
    return {"encoder_hidden_states": text.embeds.to(device, dtype), "pooled_projections": text.pooled.to(device, dtype)}
