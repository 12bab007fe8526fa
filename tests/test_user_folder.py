"""--output_dir pointed at a folder of the user's: sdlora refuses it, or with --overwrite_output_dir writes beside
the user's files without touching one of them; it cleans only its own leftovers and prunes only its own checkpoints.
In-process runs on the tiny model (sdlora/training/outdir.py, manifest.py)."""
import json
import shutil

import pytest
from conftest import forbid_model_loads, make_images
from helpers import fast_flags, recipe_error

from sdlora.recipes import text_to_image as t2i
from sdlora.cli.run import run as run_recipe

WEIGHTS = "pytorch_lora_weights.safetensors"


def users_folder(out):
    """What a user keeps in a folder: hidden backups, notes, a folder of their own named like a checkpoint."""
    (out / ".backup.tmp").mkdir(parents=True)
    (out / ".backup.tmp" / "thesis.docx").write_bytes(b"my only copy")
    (out / "notes.tmp").write_text("to do")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "climb.txt").write_text("route notes")
    (out / "photo.png").write_bytes(b"\x89PNG not really")


def snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}


def test_a_users_folder_is_refused_and_a_name_clash_even_with_the_flag(tiny_model, tmp_path, capsys, monkeypatch):
    data, out = make_images(tmp_path / "d", n=2), tmp_path / "mine"
    users_folder(out)
    (out / "README.md").write_text("# my project\n")
    (out / WEIGHTS).write_bytes(b"an earlier LoRA of mine")
    before = snapshot(out)
    forbid_model_loads(monkeypatch)
    flags = fast_flags(tiny_model, out, train_data_dir=data)
    msg = recipe_error(capsys, t2i, flags)
    assert f"--output_dir {out} holds files sdlora did not write (.backup.tmp, README.md, checkpoint-3 and 3 more)" \
        in msg and "--overwrite_output_dir" in msg, msg
    msg = recipe_error(capsys, t2i, flags + ["--overwrite_output_dir"])
    assert f"{out}: README.md, {WEIGHTS} are not sdlora's" in msg and "move them away" in msg, msg
    assert snapshot(out) == before  # nothing deleted, nothing written, no lock or record left


def test_with_the_flag_the_users_files_stay_byte_identical(tiny_model, tmp_path, capsys, monkeypatch):
    data, out = make_images(tmp_path / "d", n=2), tmp_path / "mine"
    users_folder(out)
    before = snapshot(out)
    # what a killed sdlora run leaves: names carrying its marker (a half-written file, a half-pruned checkpoint)
    (out / f".{WEIGHTS}.0123456789abcdef.sdlora-tmp").write_bytes(b"half")
    (out / ".checkpoint-2.fedcba9876543210.sdlora-tmp").mkdir()
    flags = fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=4, checkpointing_steps=2,
                       checkpoints_total_limit=1, overwrite_output_dir=True)
    assert run_recipe(t2i.parse_args(flags), t2i.make_recipe) == 0
    assert "removed what an interrupted run left" in capsys.readouterr().err
    after = snapshot(out)
    assert {k: after.get(k) for k in before} == before  # every file and folder of the user's, byte for byte
    record = json.loads((out / ".sdlora-files.json").read_text())
    assert sorted(set(after) - set(before)) == sorted(
        [".sdlora-files.json", WEIGHTS, "mine.safetensors", "README.md", "checkpoint-4",
         *(f"checkpoint-4/{f}" for f in ("optimizer.pt", "scheduler.pt", "state.json", "unet_lora.safetensors"))])
    assert record["folders"] == ["checkpoint-4"] and sorted(record["files"]) == ["README.md", "mine.safetensors", WEIGHTS]
    # checkpoint-2 was sdlora's and pruned; checkpoint-3 is the user's and stays (its step is not one this run saves)

    # a README.md the user edited after the run is theirs now: a later run refuses to replace it
    (out / "README.md").write_text("# my notes on this LoRA\n")
    forbid_model_loads(monkeypatch)
    again = fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=4, checkpointing_steps=2)
    msg = recipe_error(capsys, t2i, again + ["--resume_from_checkpoint", "latest"])
    assert "README.md is not sdlora's (or changed since it wrote them)" in msg, msg
    (out / "README.md").unlink()
    msg = recipe_error(capsys, t2i, again)
    assert "holds checkpoints of an earlier run (checkpoint-4)" in msg and "start over with --overwrite_output_dir" in msg
    # starting over: sdlora's own checkpoint is deleted before any model loads, the user's files stay
    with pytest.raises(AssertionError, match="a model was loaded"):
        run_recipe(t2i.parse_args(again + ["--overwrite_output_dir"]), t2i.make_recipe)
    assert not (out / "checkpoint-4").exists() and {k: v for k, v in snapshot(out).items() if k in before} == before
    for name in ("photo.png", "notes.tmp"):
        (out / name).unlink()
    shutil.rmtree(out / ".backup.tmp")
    shutil.rmtree(out / "checkpoint-3")
    msg = recipe_error(capsys, t2i, again)  # only sdlora's LoRA left
    assert f"holds the LoRA of an earlier sdlora run ({WEIGHTS}, mine.safetensors): pass --overwrite_output_dir" in msg


def test_an_older_sdlora_versions_folder_says_so(tiny_model, tmp_path, capsys, no_model_loads):
    data, out = make_images(tmp_path / "d", n=2), tmp_path / "o"
    out.mkdir()
    for name in (WEIGHTS, "o.safetensors", "README.md"):  # no .sdlora-files.json: written before the record existed
        (out / name).write_bytes(b"old")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, overwrite_output_dir=True))
    assert "are not sdlora's" in msg and "an sdlora version older than its record" in msg, msg
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "state.json").write_text("{}")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data))
    assert "holds checkpoints of an earlier run (checkpoint-2) (an sdlora version older than its record" in msg, msg


def test_an_output_dir_that_is_a_file(tiny_model, tmp_path, capsys, no_model_loads):
    data, f = make_images(tmp_path / "d", n=2), tmp_path / "lora.safetensors"
    f.write_bytes(b"x")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, f, train_data_dir=data))
    assert msg == f"error: --output_dir {f} is a file; give a folder (a new one, or an empty one of yours)"
    assert f.read_bytes() == b"x"
