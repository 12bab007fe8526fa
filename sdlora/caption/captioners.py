"""The captioners transformers runs (`AutoModelForImageTextToText` + `AutoProcessor`): BLIP (optionally
conditioned on a text start), Florence-2 (a task prompt such as <DETAILED_CAPTION>) and chat VLMs such as
Qwen2-VL / Qwen2.5-VL (an instruction, through the processor's chat template). One caption per image, one line."""
from __future__ import annotations

import re

from ..errors import UserError

# The prompt each family is given when --prompt names none (BLIP: none, plain captioning).
PROMPTS = {"florence2": "<DETAILED_CAPTION>",
           "vlm": "Describe this image in one or two sentences as a caption for training an image model: the "
                  "subject, what it does, the setting and the style. Answer with the caption only."}
# New tokens per caption when --max_length names none: kohya's BLIP default; SD's text encoders read 77 tokens.
MAX_LENGTHS = {"blip": 75, "florence2": 128, "vlm": 128}


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class Captioner:
    """`captioner(images) -> [caption]` for a batch of RGB PIL images."""
    tags = False

    def __init__(self, source: str, family: str, device: str, dtype: str, prompt: str | None = None,
                 max_length: int | None = None, token: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ..logs import no_progress_bars
        from ..models import torch_dtype

        self.family, self.device, self.dtype = family, torch.device(device), torch_dtype(dtype)
        self.prompt = PROMPTS.get(family) if prompt is None else prompt
        self.max_length = max_length or MAX_LENGTHS[family]
        try:
            with no_progress_bars():
                self.processor = AutoProcessor.from_pretrained(source, token=token)
                self.model = AutoModelForImageTextToText.from_pretrained(
                    source, dtype=self.dtype, use_safetensors=True, token=token).to(self.device).eval()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--model {source}: transformers can't load it as a {family} captioner "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.chat = family == "vlm" and getattr(self.processor, "chat_template", None) is not None
        if self.chat and getattr(self.processor, "tokenizer", None) is not None:
            self.processor.tokenizer.padding_side = "left"  # batched generation continues each prompt at its end

    def texts(self, n: int) -> list[str] | None:
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            return [self.processor.apply_chat_template(messages, add_generation_prompt=True)] * n
        return [self.prompt] * n if self.prompt else None

    def __call__(self, images) -> list[str]:
        import torch

        texts = self.texts(len(images))
        kw = dict(padding=True) if self.chat else {}
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt", **kw).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_length)
        if not self.model.config.is_encoder_decoder and self.family != "blip":
            out = out[:, inputs["input_ids"].shape[1]:]  # a decoder-only VLM repeats its prompt: keep the answer
        return [one_line(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
