"""Hostile and malformed LoRA files (issue #11), generated from a seed: each one either loads as a sound LoRA
(float, finite, well-shaped) or is refused with one UserError line naming the file. Never another
exception, never NaN/Inf weights, never a hang. A failure prints the case, which the seed reproduces."""
import json
import os
import random
import struct
import subprocess
import time

import pytest
import torch
from conftest import PY, ROOT
from safetensors.torch import save_file

from sdlora.errors import UserError
from sdlora.lora import formats
from sdlora.lora.formats import Lora, Module, Product

torch.set_num_threads(1)

LAYERS = {  # linear, LoCon conv, text encoder (kohya output pads it with a zero out_proj: sdlora_zero_modules)
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ((2, 8), (8, 2), 4.0),
    "unet.down_blocks.0.resnets.0.conv1": ((3, 4, 3, 3), (6, 3, 1, 1), 3.0),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ((2, 8), (8, 2), 2.0),
}
DTYPES = [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64, torch.float16, torch.bfloat16,
          torch.float8_e4m3fn, torch.complex64]
GARBAGE = ["", "{", "[", "null", "1", '"x"', "[1, 2]", '["a", 3]', "{}", "[]", "NaN", "bad\nline", "[" * 50000,
           '{"unet.lora_alpha": "8"}', '{"unet.lora_alpha": NaN}', '{"unet.lora_alpha": -1}', '{"unet.lora_alpha": 0}',
           '{"unet.lora_alpha": 1e999}', '{"unet.lora_alpha": ' + "9" * 5000 + "}", '{"unet.lora_alpha": true}',
           '{"unet.lora_alpha": 1e30}', '{"unet.alpha_pattern": {"(": 2}, "unet.lora_alpha": 4}',
           '{"unet.alpha_pattern": [1], "unet.lora_alpha": 4}', '{"unet.r": "four"}', '{"unet": 5}',
           '{"lora_alpha": 8, "alpha_pattern": {"to_q": "x"}}', '{"lora_alpha": [8]}', '{"r": 4, "lora_alpha": 4}',
           '{"unet.lora_alpha": 4, "unet.alpha_pattern": {"\\\\1": 2}}']
META_KEYS = ["lora_adapter_metadata", "sdlora_zero_modules", "adapter_config", "ss_sd_model_name", "base_model"]
SWAPS = [("lora_down", "lora_A"), ("lora.down", "lora_A"), ("lora_A", "lora_B"), ("lora_B", "lora_A"),
         ("lora_up", "lora_down"), ("lora_unet_", "lora_te3_"), ("lora_unet_", "lora_te2_"), ("lora_unet_", "lora_"),
         ("unet.", ""), ("unet.", "base_model.model."), ("base_model.model.", ""), ("base_model.model.", "x"),
         (".weight", ""), (".weight", ".bias"), ("to_q", "processor.to_x_lora"), ("attn1.to_q", "processor.to_q_lora"),
         ("lora_te_", "lora_te1_"), (".alpha", ".lora_mid.weight"), ("text_model.", ""), ("_", "."), (".", "_")]


def seeds(tmp_path):
    """One valid file per format, written by sdlora itself."""
    g = torch.Generator().manual_seed(0)
    mods = {n: Module(torch.randn(*d, generator=g) * 0.3, torch.randn(*u, generator=g) * 0.3, a)
            for n, (d, u, a) in LAYERS.items()}
    lora = Lora(mods, {"ss_network_dim": "2"}, base_model="some/base")
    out = {fmt: formats.save_lora(lora, tmp_path / "seed" / fmt, fmt) for fmt in formats.FORMATS}
    # LyCORIS layers: a LoHa and a LoKr with one factor low-rank (kohya's layout, and sdlora's diffusers one)
    products = Lora({
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": Product("loha", {
            k: torch.randn(*shape, generator=g) * 0.3 for k, shape in (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 8)),
                                                                        ("hada_w2_a", (8, 2)), ("hada_w2_b", (2, 8)))},
            3.0),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": Product("lokr", {
            k: torch.randn(*shape, generator=g) * 0.3 for k, shape in (("lokr_w1", (2, 2)), ("lokr_w2_a", (4, 1)),
                                                                        ("lokr_w2_b", (1, 4)))}, 2.0)})
    for fmt in ("kohya", "diffusers"):
        out[f"{fmt}-lycoris"] = formats.save_lora(products, tmp_path / "seed" / f"{fmt}-lycoris", fmt)
    return out


def read(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def odd_tensor(rng, t):
    t = t.reshape(1, -1) if t.dim() < 2 else t  # alphas and earlier mutations too
    t = t if t.numel() and t.is_floating_point() else torch.ones(2, 2)
    kind = rng.choice(["0d", "1d", "extra_dim", "as_conv", "T", "empty", "dtype", "nan", "inf", "huge", "row"])
    if kind == "0d":
        return torch.tensor(rng.choice([1.0, 0.0, -2.0]))
    if kind == "1d":
        return t.flatten()[: rng.randint(0, 6)].clone()
    if kind == "extra_dim":  # 2-d -> 3-d, 4-d -> 5-d
        return t.unsqueeze(-1).clone()
    if kind == "as_conv":
        return t.reshape(*t.shape[:2], 1, 1).clone() if t.dim() == 2 else t.flatten(1).clone()
    if kind == "T":
        return t.flatten(1).T.contiguous()
    if kind == "empty":
        return torch.zeros(0, *t.shape[1:])
    if kind == "dtype":
        dt = rng.choice(DTYPES)
        return (t * 10).to(dt) if dt != torch.float8_e4m3fn else t.to(dt)
    if kind in ("nan", "inf", "huge"):
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = {"nan": float("nan"), "inf": -float("inf"), "huge": 3e38}[kind]
        return t
    return t[:-1].clone() if t.shape[0] > 1 else torch.cat([t, t])


def mutate(rng, tensors, meta):
    """1-3 structured changes: keys renamed/dropped/duplicated, tensors reshaped/retyped/poisoned, header garbage."""
    tensors, meta = dict(tensors), dict(meta)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["rename", "rename", "drop", "dup", "tensor", "tensor", "alpha", "meta", "meta", "junk_key"])
        key = rng.choice(sorted(tensors)) if tensors else "x"
        if op == "rename" and tensors:
            old, new = rng.choice(SWAPS)
            t = tensors.pop(key)
            key = key.replace(old, new, 1) if old in key else rng.choice(["", "\n" + key, key + "\n", ".lora_A.weight",
                                                                         key[: rng.randrange(len(key) + 1)]])
            tensors[key] = t
        elif op == "drop" and tensors:
            del tensors[key]
        elif op == "dup" and tensors:
            old, new = rng.choice(SWAPS)
            tensors[key.replace(old, new)] = tensors[key].clone()
        elif op == "tensor" and tensors:
            tensors[key] = odd_tensor(rng, tensors[key])
        elif op == "alpha":
            alphas = [k for k in tensors if k.endswith(".alpha")] or [key]
            tensors[rng.choice(alphas)] = rng.choice([torch.tensor([2.0, 3.0]), torch.tensor(0.0), torch.tensor(-1.0),
                                                      torch.tensor(float("nan")), torch.tensor(float("inf")),
                                                      torch.tensor(True), torch.tensor(4), torch.zeros(0),
                                                      torch.tensor(1e30), torch.ones(1, 1)])
        elif op == "meta":
            meta[rng.choice(META_KEYS)] = rng.choice(GARBAGE + ["".join(chr(rng.randrange(32, 0x2FF)) for _ in range(20))])
        else:
            tensors["".join(rng.choice("lora_unet.te_AB") for _ in range(rng.randint(1, 30))) + ".weight"] = torch.ones(2, 2)
    return tensors, meta


def damage_bytes(rng, data: bytes) -> bytes:
    """Byte-level damage to a valid file: truncation, bit flips, header rewrites, huge declared lengths, noise."""
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.choice(["truncate", "flip", "flip_header", "header_json", "length", "noise", "empty", "append"])
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind in ("flip", "flip_header"):
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(8 + n) if kind == "flip_header" else rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "header_json":  # well-formed JSON with a changed dtype, shape or offset
        header = json.loads(data[8:8 + n])
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = {"dtype": rng.choice(["I8", "U8", "BOOL", "F64", "F16", "BF16", "I64", "F8_E4M3", "C64", "X9"]),
                               "shape": rng.choice([[], [0], [2, 2, 2], [1] * 9, [2**62, 2], [-1, 4]]),
                               "data_offsets": rng.choice([[0, 0], [0, 10**12], [4, 2], [0, 7]])}[field]
        blob = json.dumps(header).encode()
        return struct.pack("<Q", len(blob)) + blob + data[8 + n:]
    if kind == "length":
        return struct.pack("<Q", rng.choice([0, 1, 2**63, 2**40, len(data), n + 1, 2**64 - 1])) + data[8:]
    if kind == "noise":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))
    if kind == "empty":
        return b""
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def check(path, what, failures):
    """load_lora must give a sound LoRA or a one-line UserError naming the file; record anything else."""
    try:
        lora = formats.load_lora(path)
    except UserError as e:
        msg = str(e)
        if str(path) not in msg or "\n" in msg:
            failures.append(f"{what}: bad message {msg!r}")
        return "refused"
    except Exception as e:  # noqa: BLE001 - exactly what must not happen
        failures.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
        return "crashed"
    try:
        assert isinstance(lora, Lora) and lora.modules
        for name, m in lora.modules.items():
            tensors = (m.down, m.up) if m.kind == "lora" else m.factors.values()
            assert all(t.is_floating_point() for t in tensors), name
            assert (m.alpha is None or m.alpha > 0) and torch.isfinite(m.delta()).all(), name
            if m.kind != "lora":  # what sdlora's loader applies
                down, up, alpha = m.as_lora((m.out_features, m.in_features))
                assert torch.isfinite(Module(down, up, alpha).delta()).all(), name
    except Exception as e:  # noqa: BLE001
        failures.append(f"{what}: accepted an unsound LoRA ({type(e).__name__}: {str(e)[:200]})")
    return "loaded"


def test_fuzzed_lora_files_load_or_give_one_line_errors(tmp_path):
    rng = random.Random(11)
    start, failures, outcomes = time.monotonic(), [], []
    for fmt, seed_file in seeds(tmp_path).items():
        tensors, meta = read(seed_file)
        config = seed_file.parent / "adapter_config.json"
        for i in range(150):
            case = tmp_path / f"{fmt}-{i}"
            case.mkdir()
            path = case / seed_file.name
            t, m = mutate(rng, tensors, meta)
            try:
                save_file(t, str(path), m)
            except Exception:  # noqa: BLE001 - safetensors refused to write it (e.g. an empty key): damage bytes
                save_file(tensors, str(path), meta)
                path.write_bytes(damage_bytes(rng, path.read_bytes()))
            if fmt == "peft" and rng.random() < 0.3:  # the config beside the weights is input too
                case.joinpath("adapter_config.json").write_text(rng.choice(GARBAGE))
            elif config.is_file():
                case.joinpath("adapter_config.json").write_text(config.read_text())
            outcomes.append(check(path, f"{fmt} #{i} structured", failures))
        data = seed_file.read_bytes()
        for i in range(120):
            path = tmp_path / f"{fmt}-bytes-{i}.safetensors"
            path.write_bytes(damage_bytes(rng, data))
            outcomes.append(check(path, f"{fmt} #{i} bytes", failures))
    assert not failures, f"{len(failures)} of {len(outcomes)} cases:\n" + "\n".join(failures[:25])
    assert outcomes.count("refused") > len(outcomes) // 2 and "loaded" in outcomes  # both paths were exercised
    assert time.monotonic() - start < 60  # no case hangs (the whole run takes a few seconds)


def _bad_files(tmp_path):
    """A handful of the classes above, each a real file."""
    good = {"unet.a.lora.down.weight": torch.ones(2, 3), "unet.a.lora.up.weight": torch.ones(3, 2)}
    files = {}

    def put(name, tensors, meta=None):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(files[name]), meta)

    put("nan", {**good, "unet.a.lora.up.weight": torch.full((3, 2), float("nan"))})
    put("vector", {**good, "unet.a.lora.down.weight": torch.ones(3)})
    put("metadata", good, {"lora_adapter_metadata": "{not json"})
    put("alpha", {"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(3, 2),
                  "lora_unet_a.alpha": torch.ones(2)})
    put("peft_key", {".lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.ones(3, 2)})
    put("ints", {**good, "unet.a.lora.down.weight": torch.ones(2, 3, dtype=torch.int32)})
    files["noise"] = tmp_path / "noise.safetensors"
    files["noise"].write_bytes(struct.pack("<Q", 2**63) + os.urandom(64))
    return files


def test_cli_refuses_malformed_files_with_one_error_line(tmp_path):
    files = _bad_files(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = []  # a few classes only: each interpreter start costs seconds; the fuzz test covers the rest in-process
    for i, name in enumerate(["nan", "metadata", "alpha", "noise"]):
        path = files[name]
        argv = ["inspect", str(path)] if i % 2 else ["convert", str(path), str(tmp_path / f"out-{name}"), "--to", "kohya"]
        runs.append((argv, path))
    runs.append((["generate", "p", "--lora", str(files["nan"]), "--base", "sdlora-tiny"], files["nan"]))
    procs = [(subprocess.Popen([PY, "-m", "sdlora.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env=env), argv, path) for argv, path in runs]
    for proc, argv, path in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], (argv, err)
    assert not any(p.name.startswith("out-") for p in tmp_path.iterdir())  # convert wrote nothing


@pytest.mark.parametrize("name", ["nan", "ints"])
def test_inspect_and_convert_refuse_damaged_weights(tmp_path, name, capsys):
    """NaN/Inf or integer weights used to be copied by convert (and made generate paint black)."""
    from sdlora.cli import main

    path = _bad_files(tmp_path)[name]
    assert main(["convert", str(path), str(tmp_path / "o.safetensors"), "--to", "kohya"]) == 2
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("NaN/Inf" if name == "nan" else "int32 weights") in err and "layer 'unet.a'" in err
    assert not (tmp_path / "o.safetensors").exists()
