"""How each file layout names a layer, and how sdlora names it in memory: ``<component>.<diffusers module path>``,
text encoders in the classic CLIP spelling ``text_model.…`` (`canonical`), mapped onto the installed transformers'
module tree by `live_path`. kohya files of SDXL name UNet layers as kohya's sd-scripts do, by the original (SGM)
UNet (`sgm_pairs`)."""
from __future__ import annotations

import re
from functools import lru_cache

from ...models import TEXT_CLASSES

# kohya's key prefix of each component ("lora_unet_…"); SDXL's first text encoder is lora_te1, other families'
# lora_te. Read back, every one of these names its component.
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
XL_KOHYA_PREFIX = {**KOHYA_PREFIX, "text_encoder": "lora_te1"}
KOHYA_COMPONENT = {p: c for table in (KOHYA_PREFIX, XL_KOHYA_PREFIX) for c, p in table.items()}
KOHYA_KEY = "(" + "|".join(sorted(KOHYA_COMPONENT, key=len, reverse=True)) + ")_"  # a key's prefix, as a regex
# Module-name words that contain "_": kohya flattens every "." to "_", so these are glued back.
COMPOUNDS = sorted("""down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out
    time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2 add_embedding
    text_model self_attn q_proj k_proj v_proj out_proj text_projection input_blocks output_blocks middle_block
    in_layers out_layers emb_layers skip_connection time_embed label_emb""".split(), key=len, reverse=True)
# The header entry naming the all-zero layers a kohya file carries only for diffusers' sake (see the kohya codec)
PADDING_KEY = "sdlora_zero_modules"


def unmangle(name: str) -> str:
    """kohya 'down_blocks_0_attentions_0_proj_in' -> diffusers 'down_blocks.0.attentions.0.proj_in'."""
    s = name.replace("_", ".")
    for word in COMPOUNDS:
        s = s.replace(word.replace("_", "."), word)
    return s


def kohya_name(prefix: str, body: str) -> str:
    """kohya ('lora_te2', 'text_model_encoder_layers_0_mlp_fc1') -> 'text_encoder_2.text_model.encoder.layers.0.mlp.fc1'.
    SDXL UNet layers in kohya's original-UNet names (input_blocks_…) get diffusers' names (down_blocks.…)."""
    comp, path = KOHYA_COMPONENT[prefix], unmangle(body)
    return f"{comp}.{swap_prefix(path, sgm_pairs()) if comp == 'unet' else path}"


@lru_cache(maxsize=1)
def sgm_pairs() -> tuple[tuple[str, str], ...]:
    """(original-UNet prefix, diffusers prefix) for every Linear/Conv2d of SDXL's UNet. kohya's sd-scripts train
    SDXL on the original (SGM) UNet, so its SDXL files name layers `input_blocks.4.1.…` where diffusers says
    `down_blocks.1.attentions.0.…` (sd-scripts' library/sdxl_model_util.make_unet_conversion_map): two
    resnets and attentions then a downsampler per down block, three and an upsampler per up block."""
    resnet = (("in_layers.2.", "conv1."), ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."),
              ("skip_connection.", "conv_shortcut."))
    resnets = [("middle_block.0.", "mid_block.resnets.0."), ("middle_block.2.", "mid_block.resnets.1.")]
    pairs = [("input_blocks.0.0.", "conv_in."), ("out.2.", "conv_out."), ("middle_block.1.", "mid_block.attentions.0."),
             ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    for b in range(3):  # SDXL's three levels (the tiny stand-in uses the first two)
        for j in range(2):
            resnets.append((f"input_blocks.{3 * b + j + 1}.0.", f"down_blocks.{b}.resnets.{j}."))
            pairs.append((f"input_blocks.{3 * b + j + 1}.1.", f"down_blocks.{b}.attentions.{j}."))
        pairs.append((f"input_blocks.{3 * b + 3}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
        for j in range(3):
            resnets.append((f"output_blocks.{3 * b + j}.0.", f"up_blocks.{b}.resnets.{j}."))
            pairs.append((f"output_blocks.{3 * b + j}.1.", f"up_blocks.{b}.attentions.{j}."))
        pairs.append((f"output_blocks.{3 * b + 2}.2.", f"up_blocks.{b}.upsamplers.0."))
    return tuple(pairs + [(s + rs, d + rd) for s, d in resnets for rs, rd in resnet])


def swap_prefix(path: str, pairs, reverse: bool = False) -> str:
    """`path` with the first of `pairs`' (old, new) prefixes it starts with replaced by the other (new, old
    if `reverse`); each prefix names whole modules."""
    for old, new in pairs:
        old, new = (new, old) if reverse else (old, new)
        if (path + ".").startswith(old):
            return (new + (path + ".")[len(old):])[:-1]
    return path


def canonical(comp: str, path: str) -> str:
    """'<comp>.<path>' with the classic CLIP spelling `text_model.…`, which files are written in whatever
    transformers is installed (transformers >= 5 dropped the `text_model` level from the live module tree)."""
    if comp.startswith("text_encoder") and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path  # text_projection sits beside text_model (SDXL's second encoder)
    return f"{comp}.{path}"


def config_path(comp: str, path: str) -> str:
    """A module path for peft configs (target_modules, rank/alpha patterns): without `text_model.`, so
    peft's suffix match finds the layer under either transformers spelling."""
    return path.removeprefix("text_model.") if comp.startswith("text_encoder") else path


@lru_cache(maxsize=None)
def clip_has_text_model(cls_name: str) -> bool:
    """Whether the installed transformers' `cls_name` (a CLIP text model class) has the `text_model` level."""
    import transformers

    tiny = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1,
                                       vocab_size=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=8)
    return hasattr(getattr(transformers, cls_name)(tiny), "text_model")


def live_path(comp: str, path: str, model=None) -> str:
    """The module path in the installed library: transformers>=5's CLIPTextModel has no `text_model` level
    (its CLIPTextModelWithProjection, SDXL's text_encoder_2 and both of SD3's, keeps it). `model`: the live
    encoder, whose own layout decides (SD3's text_encoder is a CLIPTextModelWithProjection)."""
    if model is not None and comp in TEXT_CLASSES and path.startswith("text_model."):
        return path if hasattr(model, "text_model") else path[len("text_model."):]
    if comp in TEXT_CLASSES and path.startswith("text_model.") and not clip_has_text_model(TEXT_CLASSES[comp]):
        return path[len("text_model."):]
    return path


def diffusers_keys(comp: str) -> tuple[str, str]:
    """The down/up key names diffusers' `load_lora_weights` reads for a component: peft's lora_A/lora_B for the
    UNet, its own lora_linear_layer.down/up for text encoders (its text-encoder path cannot infer the type of
    lora_A/lora_B keys when no attention projection is among them, e.g. mlp-only LoRAs)."""
    return ("lora_A", "lora_B") if comp in ("unet", "transformer") else ("lora_linear_layer.down", "lora_linear_layer.up")


def magnitude_key(comp: str) -> str:
    """The DoRA magnitude's key name diffusers' `load_lora_weights` reads: the UNet's as peft saves it, the text
    encoders' with `.weight` (transformers' adapter loader reports the bare name as unexpected and keeps its
    initial magnitude)."""
    return "lora_magnitude_vector" if comp in ("unet", "transformer") else "lora_magnitude_vector.weight"


def unet_stem(path: str) -> str:
    """The name ComfyUI's key map gives a diffusers UNet path (``.to_`` -> ``.processor.to_``, no ``to_out``'s .0)."""
    stem = path.replace(".to_", ".processor.to_")
    return stem[:-2] if stem.endswith(".to_out.0") else stem


def unet_keys(path: str) -> tuple[str, str]:
    """(down, up) key names of a plain UNet LoRA layer that both diffusers and ComfyUI read (diffusers.to_shared)."""
    stem = "unet." + unet_stem(path)
    if re.search(r"\.processor\.to_(q|k|v|out)$", stem):  # diffusers maps these old names, and only these
        return f"{stem}_lora.down.weight", f"{stem}_lora.up.weight"
    return f"{stem}.lora.down.weight", f"{stem}.lora.up.weight"


_OLD_DIFFUSERS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def module_path(path: str) -> str:
    """A UNet path in diffusers' attention-processor spelling (`….processor.to_out`, as `unet_stem` writes LoHa/LoKr
    layers) as the module path."""
    return re.sub(r"\.processor\.to_out$", ".to_out.0", path).replace(".processor.to_", ".to_")


def old_processor_path(path: str) -> str:
    """diffusers' old attention-processor LoRA names (`….processor.to_q_lora`) as the module path."""
    return re.sub(r"processor\.(to_[qkv]_lora|to_out_lora)$", lambda g: _OLD_DIFFUSERS[g.group(1)], path)
