"""--cache_latents_to_disk: entries keyed by content and settings, reused across runs, the same LoRA as the RAM
cache, damaged entries encoded again, exact resume, the data folder never written, no latent held in RAM."""
import errno
import os
import re
import shutil
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_images
from helpers import T2I, fast_flags, read_lora, recipe_error, run, start, wait_for
from PIL import Image

import sdlora.io
from sdlora.recipes import text_to_image as t2i
from sdlora.testing import subject_on_noise
from sdlora.training import diskcache

WEIGHTS = "pytorch_lora_weights.safetensors"
EPOCH = "1764028800"  # SOURCE_DATE_EPOCH: identical runs write identical bytes


@pytest.fixture
def data(tmp_path):
    return make_images(tmp_path / "d", n=4)


def _flags(model, out, data, cache, **over):
    return fast_flags(model, out, train_data_dir=data, cache_latents_to_disk=True, latents_cache_dir=cache, **over)


def _counts(r) -> tuple[int, int, int]:
    """(reused, images, encoded) from the run's `latent cache:` line."""
    m = re.search(r"latent cache: (\d+) of (\d+) images reused, (\d+) encoded", r.stderr)
    assert m, r.stderr[-2000:]
    return tuple(int(x) for x in m.groups())


def _entries(cache):
    return sorted(cache.glob("*/*.safetensors"))


def test_second_run_reuses_every_entry_and_all_write_the_ram_caches_lora(tiny_model, tmp_path, data):
    cache = tmp_path / "cache"
    first = run(T2I, _flags(tiny_model, tmp_path / "a" / "o", data, cache), SOURCE_DATE_EPOCH=EPOCH)
    assert _counts(first) == (0, 4, 4) and f"({cache})" in first.stderr
    assert len(_entries(cache)) == 4 and (cache / "CACHEDIR.TAG").exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(sdlora.io.TMP_SUFFIX)]
    second = run(T2I, _flags(tiny_model, tmp_path / "b" / "o", data, cache), SOURCE_DATE_EPOCH=EPOCH)
    assert _counts(second) == (4, 4, 0)
    run(T2I, fast_flags(tiny_model, tmp_path / "c" / "o", train_data_dir=data), SOURCE_DATE_EPOCH=EPOCH)  # RAM
    a, b, c = ((tmp_path / x / "o" / WEIGHTS).read_bytes() for x in "abc")
    assert a == b == c  # bit for bit: the entries restore the VAE output's memory layout too


def test_data_folder_is_never_written(tiny_model, tmp_path, data):
    def snapshot():
        return {p.relative_to(data): (p.stat().st_mtime_ns, p.read_bytes()) for p in data.rglob("*")}
    before = snapshot()
    run(T2I, _flags(tiny_model, tmp_path / "o", data, tmp_path / "cache", validation_split=0.25))
    assert snapshot() == before and len(_entries(tmp_path / "cache")) == 3  # the held-out image stays in RAM


def test_changed_content_or_settings_are_encoded_again_a_moved_or_touched_folder_is_not(tiny_model, tmp_path, data,
                                                                                        capsys):
    from diffusers import AutoencoderKL

    from sdlora.cli.run import run as run_recipe

    cache = tmp_path / "cache"

    def again(folder=data, **over):  # in-process: seven runs, each a process would spend seconds importing
        shutil.rmtree(tmp_path / "o", ignore_errors=True)
        assert run_recipe(t2i.parse_args(_flags(tiny_model, tmp_path / "o", folder, cache, **over)), t2i.make_recipe) == 0
        return _counts(SimpleNamespace(stderr=capsys.readouterr().err))
    assert again() == (0, 4, 4)
    moved = data.rename(tmp_path / "elsewhere")
    for p in moved.iterdir():
        os.utime(p, (1e9, 1e9))
    assert again(moved) == (4, 4, 0)  # keyed by the bytes, not the path or the mtime
    Image.new("RGB", (32, 32), (9, 9, 9)).save(moved / "img1.png")  # same name, size and caption
    assert again(moved) == (3, 4, 1)
    assert again(moved, resolution=64) == (0, 4, 4)
    shutil.rmtree(tmp_path / "o")  # a process of its own: accelerate's precision is set once per process
    assert _counts(run(T2I, _flags(tiny_model, tmp_path / "o", moved, cache, mixed_precision="bf16"))) == (0, 4, 4)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    vae.save_pretrained(tmp_path / "same_vae")  # the same weights from another folder
    assert again(moved, pretrained_vae_model_name_or_path=tmp_path / "same_vae") == (4, 4, 0)
    with torch.no_grad():
        vae.encoder.conv_in.bias[0] += 1e-3
    vae.save_pretrained(tmp_path / "other_vae")
    assert again(moved, pretrained_vae_model_name_or_path=tmp_path / "other_vae") == (0, 4, 4)
    assert len(_entries(cache)) == 4 + 1 + 4 + 4 + 4


def test_masks_from_the_disk_cache_train_as_from_ram_and_a_changed_mask_is_encoded_again(tiny_model, tmp_path):
    folder, masks = subject_on_noise(tmp_path / "d", tmp_path / "m", n=4)
    (masks / "3.png").unlink()  # one image without a mask: learned whole, as in RAM
    common = dict(train_data_dir=folder, masked_loss=True, mask_dir=masks)
    run(T2I, fast_flags(tiny_model, tmp_path / "ram" / "o", **common), SOURCE_DATE_EPOCH=EPOCH)
    disk = run(T2I, fast_flags(tiny_model, tmp_path / "disk" / "o", cache_latents_to_disk=True,
                               latents_cache_dir=tmp_path / "cache", **common), SOURCE_DATE_EPOCH=EPOCH)
    assert _counts(disk) == (0, 4, 4)
    assert (tmp_path / "ram" / "o" / WEIGHTS).read_bytes() == (tmp_path / "disk" / "o" / WEIGHTS).read_bytes()
    Image.new("L", (32, 32), 255).save(masks / "0.png")
    assert _counts(run(T2I, fast_flags(tiny_model, tmp_path / "o", cache_latents_to_disk=True,
                                       latents_cache_dir=tmp_path / "cache", **common))) == (3, 4, 1)


def test_damaged_entries_are_encoded_again_with_a_warning(tiny_model, tmp_path, data):
    cache = tmp_path / "cache"
    run(T2I, _flags(tiny_model, tmp_path / "a" / "o", data, cache), SOURCE_DATE_EPOCH=EPOCH)
    flipped, truncated, header, intact = _entries(cache)
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0x10  # one bit of one latent value
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:300])
    header.write_bytes(b"\xff" * 8 + header.read_bytes()[8:])
    r = run(T2I, _flags(tiny_model, tmp_path / "b" / "o", data, cache), SOURCE_DATE_EPOCH=EPOCH)
    assert _counts(r) == (1, 4, 3) and "Traceback" not in r.stderr
    for bad, why in ((flipped, "checksum does not match"), (truncated, "unreadable"), (header, "unreadable")):
        assert re.search(rf"WARNING sdlora: latent cache: {re.escape(str(bad))} \(.*img\d\.png\) is damaged \(.*{why}",
                         r.stderr)
    # encoded again in the batch it first came from: the same bits, so the same LoRA
    assert (tmp_path / "a" / "o" / WEIGHTS).read_bytes() == (tmp_path / "b" / "o" / WEIGHTS).read_bytes()
    assert _counts(run(T2I, _flags(tiny_model, tmp_path / "c" / "o", data, cache))) == (4, 4, 0)


def test_fuzzed_entry_is_refused_or_read_exactly(tmp_path):
    store = diskcache.LatentStore(tmp_path, "vae")
    post, mask = torch.randn(8, 4, 4), torch.rand(1, 4, 4)
    store.write("ab12", post, mask, channels_last=True)
    good, rng = store.path("ab12").read_bytes(), np.random.default_rng(0)
    outcomes = set()
    for _ in range(300):
        raw = bytearray(good)
        for i in rng.integers(0, len(raw), rng.integers(1, 4)):
            raw[i] = int(rng.integers(0, 256))
        store.path("ab12").write_bytes(bytes(raw[:rng.integers(len(raw) - 8, len(raw) + 1)]))
        try:
            p, m, cl = store.read("ab12")
        except ValueError:
            outcomes.add("refused")
            continue
        assert torch.equal(p, post) and torch.equal(m, mask) and cl  # a change in the header's padding only
        outcomes.add("read")
    assert "refused" in outcomes


def test_killed_run_resumed_from_the_disk_cache_equals_an_uninterrupted_one(tiny_model, tmp_path, data):
    common = dict(max_train_steps=8, checkpointing_steps=2, gradient_accumulation_steps=2)
    run(T2I, fast_flags(tiny_model, tmp_path / "full", train_data_dir=data, **common))  # RAM cache, no kill
    out, cache = tmp_path / "part", tmp_path / "cache"
    a = start(_flags(tiny_model, out, data, cache, **dict(common, max_train_steps=10**6)), tmp_path / "a.log")
    wait_for(lambda: (out / "checkpoint-4" / "state.json").exists(), "two checkpoints")
    a.send_signal(signal.SIGKILL)
    a.wait()
    r = run(T2I, _flags(tiny_model, out, data, cache, resume_from_checkpoint="latest", **common))
    assert "resumed from" in r.stderr and _counts(r) == (4, 4, 0)
    full, _ = read_lora(tmp_path / "full" / WEIGHTS)
    resumed, _ = read_lora(out / WEIGHTS)
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6


def test_two_runs_building_the_same_entries_at_once(tiny_model, tmp_path, data):
    cache = tmp_path / "cache"
    runs = [start(_flags(tiny_model, tmp_path / x / "o", data, cache), tmp_path / f"{x}.log", SOURCE_DATE_EPOCH=EPOCH)
            for x in "ab"]
    assert [p.wait(timeout=600) for p in runs] == [0, 0], (tmp_path / "a.log").read_text()[-2000:]
    assert (tmp_path / "a/o" / WEIGHTS).read_bytes() == (tmp_path / "b/o" / WEIGHTS).read_bytes()
    assert len(_entries(cache)) == 4 and not [p for p in cache.rglob("*") if p.name.endswith(sdlora.io.TMP_SUFFIX)]


def test_after_setup_no_latent_is_in_memory(tiny_model, tmp_path, data):
    from sdlora.cli.flags import train_config
    from sdlora.training.loop import setup

    def tensors(obj, seen=()):
        if isinstance(obj, torch.Tensor):
            return 1
        if isinstance(obj, dict):
            return sum(tensors(k) + tensors(v) for k, v in obj.items())
        if isinstance(obj, (list, tuple, set)):
            return sum(tensors(v) for v in obj)
        return tensors(vars(obj)) if hasattr(obj, "__dict__") else 0

    def caches(out, **over):
        args = t2i.parse_args(fast_flags(tiny_model, out, train_data_dir=data, **over))
        config = train_config(args)
        return setup(config, t2i.make_recipe(args, config)).caches
    ram = caches(tmp_path / "ram")
    disk = caches(tmp_path / "disk", cache_latents_to_disk=True, latents_cache_dir=tmp_path / "cache")
    assert tensors(ram.latents) == 1 and len(ram) == len(disk) == 4  # the check sees RAM's bucket tensor
    latent_state = {k: v for k, v in vars(disk).items() if k != "embeds"}  # text embeddings stay in RAM
    assert disk.latents is None and tensors(latent_state) == 0  # only keys, rows' buckets and the store's folder
    post, mask = disk.latent_batch([0, 2])
    assert torch.equal(post, ram.latent_batch([0, 2])[0]) and post.stride() == ram.latent_batch([0, 2])[0].stride()


def test_flag_is_not_used_when_the_pixels_change_and_the_log_says_why(tiny_model, tmp_path, data):
    r = run(T2I, _flags(tiny_model, tmp_path / "o", data, tmp_path / "cache", random_flip=True))
    assert "--random_flip changes the pixels every epoch, so --cache_latents_to_disk is not used" in r.stderr
    assert "latent cache:" not in r.stderr and not _entries(tmp_path / "cache")


def test_flag_mistakes_are_one_line_before_loading(tiny_model, tmp_path, data, capsys, no_model_loads):
    def error(**over):
        return recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, **over))
    assert "--latents_cache_dir is only used with --cache_latents_to_disk" in error(latents_cache_dir=tmp_path / "c")
    assert "contradict" in error(cache_latents_to_disk=True, no_cache=True)
    msg = error(cache_latents_to_disk=True, latents_cache_dir=data / "cache")
    assert "is inside --train_data_dir" in msg and not (data / "cache").exists()
    (tmp_path / "file").write_text("")
    assert "--latents_cache_dir" in error(cache_latents_to_disk=True, latents_cache_dir=tmp_path / "file" / "c")


def test_default_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert diskcache.default_dir() == tmp_path / "sdlora" / "latents"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert diskcache.default_dir() == diskcache.Path.home() / ".cache" / "sdlora" / "latents"


def test_disk_full_while_caching_is_one_line(tiny_model, tmp_path, data, capsys, monkeypatch):
    cache, real = tmp_path / "cache", sdlora.io.write_file

    def write(path, payload, **kw):
        if str(path).startswith(str(cache)) and ".safetensors." in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, payload, **kw)
    monkeypatch.setattr(sdlora.io, "write_file", write)
    msg = recipe_error(capsys, t2i, _flags(tiny_model, tmp_path / "o", data, cache))
    assert str(cache) in msg and "disk is full" in msg and "choose another --latents_cache_dir" in msg, msg
    assert not _entries(cache) and not [p for p in cache.rglob("*") if p.name.endswith(sdlora.io.TMP_SUFFIX)]


def test_first_writer_wins_and_a_writer_never_leaves_a_half_file(tmp_path):
    path = tmp_path / "e.safetensors"
    with sdlora.io.atomic_path(path, replace=False) as tmp:  # a writer still busy ...
        tmp.write_bytes(b"slow")
        sdlora.io.write_bytes(path, b"fast", replace=False)  # ... while another finishes first
    assert path.read_bytes() == b"fast"
    sdlora.io.write_bytes(path, b"third", replace=False)
    assert path.read_bytes() == b"fast" and [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(KeyboardInterrupt), sdlora.io.atomic_path(tmp_path / "x", replace=False) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # killed mid-write
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_datasets_row_is_keyed_by_its_decoded_pixels_a_file_by_its_bytes(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    assert diskcache.content_id(lambda: red.copy()) == diskcache.content_id(lambda: red.copy())
    assert diskcache.content_id(lambda: red.copy()) != diskcache.content_id(lambda: blue.copy())
    red.save(tmp_path / "a.png")
    red.save(tmp_path / "b.png", compress_level=0)  # the same pixels in other bytes: another entry (safe, not shared)
    assert diskcache.content_id(tmp_path / "a.png") != diskcache.content_id(tmp_path / "b.png")
