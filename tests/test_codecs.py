"""Each registered codec on its own (sdlora/lora/formats/registry.py): a tiny LoRA written by the codec, its keys
detected as that layout, read back by the codec with every layer's names, rank, scale and weights; and a hand-made
sample of each layout detected as such. No model is loaded."""
import ast
from pathlib import Path

import pytest
import torch

from sdlora.lora import formats
from sdlora.lora.formats import CODECS, Lora, Module, Product
from sdlora.lora.formats.files import read_config
from sdlora.lora.lycoris import fold_scale

torch.set_num_threads(1)
ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
TE = "text_encoder.text_model.encoder.layers.0"


def _tensor(g, *shape):
    return torch.randn(*shape, generator=g) * 0.2


def tiny_lora(kind: str) -> Lora:
    """A few layers of one kind: LoRA (linear, DoRA, 3x3 conv, text encoder, mixed ranks and alphas), LoHa or LoKr."""
    g = torch.Generator().manual_seed(0)
    t = lambda *s: _tensor(g, *s)  # noqa: E731
    if kind == "lora":
        mods = {f"{ATTN}.attn1.to_q": Module(t(4, 8), t(8, 4), 8.0),
                f"{ATTN}.attn2.to_out.0": Module(t(2, 8), t(8, 2), 2.0, magnitude=t(8).abs() + 1),
                "unet.down_blocks.0.resnets.0.conv1": Module(t(2, 4, 3, 3), t(4, 2, 1, 1), 1.0),
                f"{TE}.self_attn.q_proj": Module(t(2, 8), t(8, 2), 4.0)}
    elif kind == "loha":
        loha = lambda r, alpha: Product("loha", {"hada_w1_a": t(8, r), "hada_w1_b": t(r, 8),  # noqa: E731
                                                  "hada_w2_a": t(8, r), "hada_w2_b": t(r, 8)}, alpha)
        mods = {f"{ATTN}.attn1.to_q": loha(2, 4.0), f"{ATTN}.ff.net.2": loha(4, 4.0), f"{TE}.mlp.fc1": loha(2, 1.0)}
    else:  # LoKr as sdlora keeps it: at scale 1 (fold_scale), factors in the form peft builds for an [8, 8] layer
        lokr = lambda alpha: fold_scale(Product("lokr", {"lokr_w1": t(2, 2), "lokr_w2": t(4, 4)}, alpha))  # noqa: E731
        mods = {f"{ATTN}.attn1.to_q": lokr(None), f"{ATTN}.attn1.to_k": lokr(2.0), f"{TE}.self_attn.out_proj": lokr(1.0)}
    return Lora(mods, {"ss_network_dim": "4"})


def _change(m) -> torch.Tensor:
    """A layer's weight change, flattened; a DoRA layer's over an all-ones base weight."""
    return m.delta(torch.ones(m.out_features, m.in_features) if m.magnitude is not None else None).flatten(1)


def assert_same_layers(want: Lora, got: Lora, atol=1e-6):
    assert sorted(got.modules) == sorted(want.modules)
    for name, m in want.modules.items():
        back = got.modules[name]
        assert back.kind == m.kind and back.rank == m.rank, name
        if m.kind == "lora":  # every codec keeps down as it is; alpha / rank may move into up
            assert torch.allclose(back.down.float(), m.down, atol=atol), name
        else:
            assert back.factors.keys() == m.factors.keys(), name
        assert (back.magnitude is None) == (m.magnitude is None), name
        if m.magnitude is not None:
            assert torch.allclose(back.magnitude.float().reshape(-1), m.magnitude, atol=atol), name
        assert torch.allclose(_change(back), _change(m), atol=atol), name


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_each_codec_writes_detects_and_reads_back_its_own_files(tmp_path, name, kind):
    codec, lora = CODECS[name], tiny_lora(kind)
    first = codec.write(lora, tmp_path / "out", {"format": "pt"}, None)
    written = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert first in written and set(written) <= set(codec.paths(tmp_path / "out"))  # what check_output looks at
    read = {}
    for file in (p for p in written if p.suffix == ".safetensors"):  # peft: one file per component
        tensors, header = formats.read_tensors(file, False)
        assert codec.detect(list(tensors)) and formats.detect_format(tensors) == name
        config = read_config(file.parent / codec.CONFIG_FILE, file) if codec.CONFIG_FILE else None
        back = codec.read(tensors, header, str(file), config)
        assert back.format == name and back.source == str(file)
        read.update(back.modules)
    assert_same_layers(lora, Lora(read))
    assert_same_layers(lora, formats.load_lora(tmp_path / "out"))  # the registry picks the same codec


def test_each_codec_writes_a_single_file_when_asked(tmp_path):
    lora = Lora({n: m for n, m in tiny_lora("lora").modules.items() if n.startswith("unet.")})
    for name, codec in CODECS.items():
        out = tmp_path / name / "my.safetensors"
        assert codec.write(lora, out, {}, torch.float16) == out and formats.output_files(out, name) == [out]
        assert list(out.parent.iterdir()) == [out]  # nothing beside it
        tensors, header = formats.read_tensors(out, False)
        assert formats.detect_format(tensors) == name
        assert {t.dtype for t in tensors.values() if t.dim()} == {torch.float16}
        assert_same_layers(lora, codec.read(tensors, header, str(out)), atol=2e-3)


SAMPLES = {  # (layout, keys): a few files in the wild's spellings
    "kohya": ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
              "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", "lora_te2_text_projection.dora_scale"],
    "diffusers": ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
                  "unet.mid_block.attentions.0.proj_in.lora_A.weight",
                  "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
                  "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.alpha"],
    "peft": ["base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight",
             "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.default.weight",
             "base_model.model.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector",
             "text_model.encoder.layers.0.self_attn.k_proj.lokr_w1"],
}


@pytest.mark.parametrize("layout", sorted(SAMPLES))
def test_a_sample_of_each_layout_is_detected_as_it(layout):
    keys = SAMPLES[layout]
    assert formats.detect_format(keys) == layout and CODECS[layout].detect(keys)
    for other in set(SAMPLES) - {layout}:  # one key of another layout: no longer this one
        assert formats.detect_format(keys + SAMPLES[other][:1]) != layout


def test_what_no_codec_reads_is_unknown():
    assert formats.detect_format([]) == "unknown"
    assert formats.detect_format(["model.diffusion_model.input_blocks.1.1.proj_in.weight"]) == "unknown"


def test_the_registry_lists_codecs_that_share_one_interface_and_import_no_other_codec():
    assert formats.FORMATS == tuple(sorted(CODECS)) == ("diffusers", "kohya", "peft")
    for name, codec in CODECS.items():
        assert codec.NAME == name and (codec.CONFIG_FILE is None or isinstance(codec.CONFIG_FILE, str))
        assert all(callable(getattr(codec, f)) for f in ("detect", "read", "paths", "write"))
        tree = ast.parse(Path(codec.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and not n.module
                     for a in n.names}
        assert not imported & set(CODECS), (name, imported & set(CODECS))
