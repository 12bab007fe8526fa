"""Captioner and tagger folders with random weights, in the layouts the real ones ship in: "tiny" ones for tests
(seconds to build, no download) and "real" ones (the smallest real architecture of each family, from its published
config values) for benchmarks/caption_speed.py. Their captions are noise: they test the plumbing, not the words."""
from __future__ import annotations

import json
from pathlib import Path

# BLIP base (Salesforce/blip-image-captioning-base): ViT-B/16 at 384 px, BERT-base decoder.
BLIP = {"tiny": dict(vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8),
                     text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               max_position_embeddings=64), vocab=0, projection_dim=16),
        "real": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 image_size=384, patch_size=16),
                     text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               max_position_embeddings=512), vocab=30524, projection_dim=512)}
# Florence-2 base (florence-community/Florence-2-base): DaViT at 768 px (577 image tokens), BART-base.
FLORENCE = {"tiny": dict(vision=dict(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2],
                                     num_groups=[1, 1, 2, 2], window_size=2, projection_dim=16),
                         text=dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                   max_position_embeddings=128), image=64, vocab=0),
            "real": dict(vision=dict(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                                     num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768),
                         text=dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                                   decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                                   max_position_embeddings=1024), image=768, vocab=51289)}
# WD14 ViT tagger (SmilingWolf/wd-vit-tagger-v3): ViT-B/16 at 448 px, 10861 tags.
WD14 = {"tiny": dict(vit=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              image_size=32, patch_size=8), tags=0),
        "real": dict(vit=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              image_size=448, patch_size=16), tags=10861)}
WORDS = "a an the photo picture of red blue green yellow square circle on in with background dog cat person".split()
# A few booru tags of each category (selected_tags.csv's: 0 general, 4 character, 9 rating).
TAGS = [("general", 9), ("sensitive", 9), ("1girl", 0), ("solo", 0), ("long_hair", 0), ("smile", 0), ("^_^", 0),
        ("red_background", 0), ("simple_background", 0), ("hatsune_miku", 4), ("kirby", 4)]


def _bpe_vocab(extra: list[str], size: int) -> dict[str, int]:
    """A byte-level vocabulary without merges (every word tokenizes to bytes), padded to `size` tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for c in bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
    for t in ["<mask>"] + [f"tok{i}" for i in range(max(0, size - len(vocab) - len(extra) - 1))] + extra:
        vocab.setdefault(t, len(vocab))
    return vocab


def blip(out, size: str = "tiny", seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, \
        BlipProcessor

    c, out = BLIP[size], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    words += [f"w{i}" for i in range(max(0, c["vocab"] - len(words) - 1))] + ["[DEC]"]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]",
                        model_max_length=c["text"]["max_position_embeddings"])
    text = dict(c["text"], vocab_size=len(words), bos_token_id=tok.bos_token_id, pad_token_id=0,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=c["vision"],
                                                    projection_dim=c["projection_dim"]))
    px = c["vision"]["image_size"]
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": px, "width": px}), tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def florence2(out, size: str = "tiny", seed: int = 0) -> Path:
    import torch
    from transformers import BartTokenizer, CLIPImageProcessorPil, Florence2Config, \
        Florence2ForConditionalGeneration, Florence2Processor

    c, out = FLORENCE[size], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _bpe_vocab(["\u0120" + w for w in WORDS] + ["<image>"], c["vocab"])
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = BartTokenizer(str(out / "vocab.json"), str(out / "merges.txt"),
                        extra_special_tokens={"image_token": "<image>"}, model_max_length=c["text"]["max_position_embeddings"])
    text = dict(c["text"], vocab_size=len(vocab), bos_token_id=0, pad_token_id=1, eos_token_id=2,
                decoder_start_token_id=2, forced_eos_token_id=2)
    torch.manual_seed(seed)
    config = Florence2Config(text_config=text, vision_config=dict(c["vision"], drop_path_rate=0.0),
                             image_token_id=tok.image_token_id)
    model = Florence2ForConditionalGeneration(config)
    if size == "tiny":  # random weights end at once more often than not: make the tiny one say something
        model.generation_config.min_new_tokens = 4
        words = {vocab["\u0120" + w] for w in WORDS} | {2}  # whole words (Ġ: a space before) and </s>
        model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i not in words]
    px, grid = c["image"], c["image"] // 32  # DaViT downsamples 32x: grid² patches + 1 pooled token
    processor = Florence2Processor(CLIPImageProcessorPil(size={"height": px, "width": px}, do_center_crop=False,
                                                         image_seq_length=grid * grid + 1), tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def wd14(out, size: str = "tiny", seed: int = 0) -> Path:
    """A tagger folder as SmilingWolf's repos ship it: model.onnx (input: batch × size × size × 3, BGR 0-255;
    output: each tag's probability) and selected_tags.csv. The network is a transformers ViT exported to ONNX."""
    import io

    import torch
    from transformers import ViTConfig, ViTModel

    c, out = WD14[size], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tags = TAGS + [(f"tag_{i}", 0) for i in range(max(0, c["tags"] - len(TAGS)))]
    lines = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{1000 - i}" for i, (name, cat) in enumerate(tags)]
    (out / "selected_tags.csv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(**c["vit"]), add_pooling_layer=False)
    net = _tag_head(vit, len(tags)).eval()
    px = c["vit"]["image_size"]
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, px, px, 3),), buf, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
    (out / "model.onnx").write_bytes(buf.getvalue())
    return out


def _tag_head(vit, n):
    import torch

    class TagHead(torch.nn.Module):
        """BGR 0-255 channels-last in, sigmoid probabilities out, as the taggers' ONNX files take and give."""

        def __init__(self):
            super().__init__()
            self.vit, self.head = vit, torch.nn.Linear(vit.config.hidden_size, n)

        def forward(self, x):
            x = x.flip(-1).permute(0, 3, 1, 2) / 127.5 - 1.0  # BGR -> RGB, channels first, -1..1
            return torch.sigmoid(self.head(self.vit(pixel_values=x).last_hidden_state.mean(1)) * 4)

    return TagHead()


def vlm(out, seed: int = 0) -> Path:
    """A tiny chat VLM (LLaVA layout: CLIP vision tower, Llama decoder, a chat template), for the chat path that
    Qwen2-VL / Qwen2.5-VL take too (their processors need torchvision, which the tests go without)."""
    import torch
    from transformers import CLIPImageProcessorPil, GPT2Tokenizer, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = ["<|im_start|>", "<|im_end|>", "<image>"]
    vocab = _bpe_vocab(["\u0120" + w for w in WORDS] + special, 0)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = GPT2Tokenizer(str(out / "vocab.json"), str(out / "merges.txt"), eos_token="<|im_end|>", pad_token="<pad>",
                        bos_token="<s>", unk_token="<unk>", additional_special_tokens=special,
                        extra_special_tokens={"image_token": "<image>"})
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tok, patch_size=8, vision_feature_select_strategy="default", chat_template=template,
                               image_token="<image>", num_additional_image_tokens=1)
    text = dict(model_type="llama", vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"])
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                      image_token_id=vocab["<image>"], vision_feature_layer=-1,
                                                      vision_feature_select_strategy="default"))
    words = {vocab["\u0120" + w] for w in WORDS} | {vocab["<|im_end|>"]}
    model.generation_config.min_new_tokens = 2  # random weights: say some words, end when they like
    model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i not in words]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
