"""--quantize_base: the UNet's frozen Linear weights in bitsandbytes' int8 / NF4 while the LoRA trains in fp32;
the saved LoRA is the same file an unquantized run writes, for the full-precision base."""
from pathlib import Path

import pytest
import torch
from conftest import make_images
from helpers import fast_flags, read_lora, recipe_error

from sdlora.recipes import text_to_image as t2i
from sdlora import quantize
from sdlora.lora import formats
from sdlora.training import loop
from sdlora.training.hooks import Hooks

bnb = pytest.importorskip("bitsandbytes", reason="--quantize_base needs bitsandbytes: pip install -e \".[test,bnb]\" (CI runs these tests in a step of its own)")
if not torch.cuda.is_available() and not quantize.has_avx2():
    pytest.skip("bitsandbytes' CPU backend needs an x86-64 CPU with AVX2", allow_module_level=True)


def _train(tiny_model, out, data, monkeypatch, **over):
    """An in-process run; returns (weights file, the trained UNet as the loop held it, each step's loss)."""
    from sdlora.cli.flags import train_config

    held, losses = {}, []
    hooks = Hooks(on_step=lambda step, logs: losses.append(logs["loss"]),
                  on_trainable=lambda parts: held.update(unet=parts["unet"].bare))
    args = t2i.parse_args(fast_flags(tiny_model, out, train_data_dir=data, **over))
    config = train_config(args)
    path = loop.train(config, t2i.make_recipe(args, config), hooks)
    return path, held["unet"], losses


def _linear_bytes(unet, kind) -> int:
    return sum(m.weight.untyped_storage().nbytes() for m in unet.modules() if isinstance(m, kind))


def test_quantized_runs_train_lora_in_fp32_and_save_the_unquantized_runs_layout(tiny_model, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import bnb as peft_bnb

    data = make_images(tmp_path / "d", n=2)
    runs = {q: _train(tiny_model, tmp_path / q, data, monkeypatch, quantize_base=q, max_train_steps=3)
            for q in quantize.MODES}
    plain_path, plain_unet, plain_losses = runs["none"]
    n_linear = sum(type(m) is torch.nn.Linear for m in plain_unet.modules() if not hasattr(m, "lora_A")) - \
        sum(len(m.lora_A) + len(m.lora_B) for m in plain_unet.modules() if hasattr(m, "lora_A"))
    plain, _ = read_lora(plain_path)
    layers = set(formats.load_lora(plain_path).modules)  # whatever the keys' spelling (shared_layout)
    for q, layer, kind, ratio in (("int8", peft_bnb.Linear8bitLt, bnb.nn.Linear8bitLt, 4),
                                  ("nf4", peft_bnb.Linear4bit, bnb.nn.Linear4bit, 7)):
        path, unet, losses = runs[q]
        # every frozen Linear of the UNet really is bitsandbytes' (the LoRA's own A/B stay fp32 nn.Linear) ...
        assert quantize.quantized_linears(unet) == n_linear > 0
        assert not any(type(m) is torch.nn.Linear and m.weight.dtype != torch.float32 for m in unet.modules())
        assert all(isinstance(m, layer) for m in unet.modules() if hasattr(m, "lora_A"))
        assert all(m.weight.dtype == torch.float32 for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
        # ... in a quarter (int8) or under a seventh (NF4 + its scales) of the unquantized weights' bytes
        assert _linear_bytes(unet, kind) * ratio <= _linear_bytes(plain_unet, torch.nn.Linear) - \
            sum(p.numel() * 4 for m in plain_unet.modules() if hasattr(m, "lora_A") for p in m.parameters()
                if p.requires_grad)
        assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
        # it trains: finite losses close to the full-precision run's on the same batches and noise
        assert all(torch.isfinite(torch.tensor(losses))) and losses[0] == pytest.approx(plain_losses[0], rel=0.1)
        sd, meta = read_lora(path)
        assert {k: (v.shape, v.dtype) for k, v in sd.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
        assert max(v.abs().max().item() for k, v in sd.items() if ".up." in k) > 0
        assert meta["sdlora_quantize_base"] == q and "sdlora_quantize_base" not in read_lora(plain_path)[1]
        assert f"| quantized base | {q}: trained over the UNet's Linear weights in bitsandbytes'" in \
            (path.parent / "README.md").read_text()
        # the file applies to the full-precision base with diffusers' own loader, every layer
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.load_lora_weights(str(path.parent))
        applied = {f"unet.{n}": m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
        assert applied.keys() == layers
        name = sorted(layers)[0]
        torch.testing.assert_close(applied[name].lora_B["default_0"].weight, formats.load_lora(path).modules[name].up)


def test_quantized_resume_is_exact_and_checked(tiny_model, tmp_path, monkeypatch, capsys):
    """nf4: 4 steps in one run == 2 steps + --resume_from_checkpoint for 2 more; a resume without the flag is refused."""
    data = make_images(tmp_path / "d", n=3)
    common = dict(quantize_base="nf4", gradient_accumulation_steps=2)
    full, _, _ = _train(tiny_model, tmp_path / "full", data, monkeypatch, max_train_steps=4, **common)
    part = tmp_path / "part"
    _train(tiny_model, part, data, monkeypatch, max_train_steps=2, checkpointing_steps=2, **common)
    resumed, _, _ = _train(tiny_model, part, data, monkeypatch, max_train_steps=4, resume_from_checkpoint="latest",
                           **common)
    a, b = read_lora(full)[0], read_lora(resumed)[0]
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, part, train_data_dir=data, max_train_steps=4,
                                               resume_from_checkpoint="latest", gradient_accumulation_steps=2))
    assert "settings differ" in msg and "(quantize_base nf4 -> none)" in msg


def test_sampling_on_an_avx512_bf16_cpu_leaves_the_4bit_weights_as_training_reads_them():
    """bitsandbytes repacks a Linear4bit's weight in place for its bf16 kernel on an eval-mode no-grad forward on
    such CPUs; the trainer turns that off, so sampling mid-run can't change later steps (or a resume)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantize.quantize_linears(model, "nf4", "cpu", torch.float32)
    x = torch.randn(3, 64)
    before = model(x).detach()
    with torch.no_grad():
        model.eval()(x)
    model.train()
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(model(x).detach(), before)


def test_quantize_mistakes_are_one_line_before_loading(tiny_model, tmp_path, capsys, monkeypatch, no_model_loads):
    data = make_images(tmp_path / "d", n=1)

    def error(**over):
        return recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, **over))
    for init in ("pissa", "olora"):
        assert f"--init_lora_weights {init} can't be used with --quantize_base nf4: it rewrites the frozen weights" \
            in error(quantize_base="nf4", init_lora_weights=init)
    for kind in ("loha", "lokr"):  # peft's LyCORIS layers read the packed weights as if they were plain
        assert f"--lora_type {kind} can't be used with --quantize_base nf4" in error(quantize_base="nf4", lora_type=kind)
    if not torch.cuda.is_available():
        assert "--lora_type dora can't be used with --quantize_base int8 on CPU" in \
            error(quantize_base="int8", lora_type="dora", target_modules="to_q")
        with monkeypatch.context() as m:
            m.setattr(quantize, "has_avx2", lambda: False)
            assert "bitsandbytes' CPU backend needs an x86-64 CPU with AVX2" in error(quantize_base="nf4")
        with monkeypatch.context() as m:
            m.setattr(quantize, "bnb_version", lambda: "0.45.5")
            assert "--quantize_base int8 on CPU needs bitsandbytes >= 0.48 (installed: 0.45.5)" in \
                error(quantize_base="int8")
    monkeypatch.setattr(quantize, "bnb_version", lambda: None)
    assert "--quantize_base nf4 needs bitsandbytes: pip install bitsandbytes" in error(quantize_base="nf4")
    with pytest.raises(SystemExit):  # argparse: one of none, int8, nf4
        t2i.parse_args(fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, quantize_base="int4"))


def test_streamed_quantized_load_equals_quantizing_the_loaded_unet(tiny_model, monkeypatch):
    """quantize.load_unet quantizes each Linear as it is read (never the whole full-precision UNet in memory): the
    same layers, bytes and other weights as loading the UNet and then quantizing it."""
    from sdlora import models, streamload

    want = models.load_unet(str(tiny_model))
    n = quantize.quantize_linears(want, "nf4", "cpu", torch.float32)
    with monkeypatch.context() as m:
        m.setattr(models, "load_unet", lambda *a, **k: pytest.fail("took diffusers' loading, not the streamed read"))
        got, count = quantize.load_unet(str(tiny_model), "nf4", "cpu", torch.float32)
    assert count == n and got.is_loaded_in_4bit and quantize.quantized_linears(got) == n
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(streamload, "weights_files", lambda *a, **k: None)  # e.g. .bin weights: diffusers loads them
    fallback, count = quantize.load_unet(str(tiny_model), "int8", "cpu", torch.float32)
    assert count == n and quantize.quantized_linears(fallback) == n and fallback.is_loaded_in_8bit


@pytest.mark.parametrize("name,lr", [("AdamW8bit", 1e-3), ("PagedAdamW8bit", 1e-3), ("Lion8bit", 3e-4)])
def test_8bit_optimizers_lower_the_loss_and_resume_exactly(tmp_path, name, lr):
    """--optimizer's bitsandbytes kinds (here: its CPU backend), as test_optimizers checks the others."""
    from test_optimizers import lowers_and_resumes

    images = make_images(tmp_path / "train", n=2), make_images(tmp_path / "held", n=2)
    lowers_and_resumes(images, tmp_path, name, {"learning_rate": lr})


def test_8bit_lion_memory_row_is_bitsandbytes():
    """benchmarks/gpu_memory.py's 8-bit Lion row allocates what bitsandbytes' Lion8bit does."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_memory as gm

    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 320), (5000, 4), (4, 1280)]]
    opt = bnb.optim.Lion8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    real = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "qmap1")
    assert real + 256 * 4 == gm.optimizer_state_bytes(params, "lion8bit")  # + the one shared quantile map


def test_quantize_base_takes_a_single_file_checkpoint(tiny_model, tmp_path):
    """--quantize_base over an original-layout single file (issue #30) with its configs from --base_config: the
    UNet's Linear layers load quantized, as from the folder."""
    from sdlora import models
    from sdlora.bases import ldm

    folder = models.resolve_base(str(tiny_model))
    path = ldm.write(folder, tmp_path / "tiny.safetensors")[0]
    unet, n = quantize.load_unet(str(path), "int8", "cpu", torch.float32, base_config=folder)
    assert n > 0 and quantize.quantized_linears(unet) == n


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_sd3_transformer_trains_and_saves_the_unquantized_runs_file(tmp_path, monkeypatch, mode):
    """--quantize_base on an SD3 base: the MMDiT's frozen Linear layers in bitsandbytes' layers, each quantized as it
    is read, the LoRA in fp32 over them; the file has the unquantized run's layout and loads in diffusers' SD3
    pipeline."""
    from diffusers import StableDiffusion3Pipeline
    from peft.tuners.lora import bnb as peft_bnb

    from sdlora.tiny_sd3 import make_sd3

    model = make_sd3(tmp_path / "sd3")
    data = make_images(tmp_path / "d", n=2)
    plain_path, _, plain_losses = _train(model, tmp_path / "none", data, monkeypatch, max_train_steps=2)
    from sdlora import sd3models

    with monkeypatch.context() as m:  # streamed: the full-precision transformer is never loaded whole
        m.setattr(sd3models, "load_transformer", lambda *a, **k: pytest.fail("took diffusers' loading"))
        path, transformer, losses = _train(model, tmp_path / mode, data, monkeypatch, max_train_steps=2,
                                           quantize_base=mode)
    layer = peft_bnb.Linear4bit if mode == "nf4" else peft_bnb.Linear8bitLt
    assert quantize.quantized_linears(transformer) > 0
    assert not any(type(m) is torch.nn.Linear and m.weight.dtype != torch.float32 for m in transformer.modules())
    assert all(isinstance(m, layer) for m in transformer.modules() if hasattr(m, "lora_A"))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] == pytest.approx(plain_losses[0], rel=0.1)
    sd, meta = read_lora(path)
    plain, _ = read_lora(plain_path)
    assert {k: (v.shape, v.dtype) for k, v in sd.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    assert meta["sdlora_quantize_base"] == mode
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe.load_lora_weights(str(path.parent))
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert len(loaded) == len({k.rsplit(".lora_", 1)[0] for k in sd}) > 0
