"""`sdlora caption`: tiny random-weight BLIP, Florence-2 and WD14 tagger folders in the layouts the real ones ship in
(sdlora/caption/random_models.py, no download) caption real image folders; the trainer's reader then reads what
was written. Their captions are noise: what is tested is which files get which text."""
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, ROOT, make_images

from sdlora.caption import folder, random_models, tags
from sdlora.caption.wd14 import TagOptions, Tagger
from sdlora.cli import main
from sdlora.data.images import read_image
from sdlora.data.sources import rows_from_folder


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return random_models.blip(tmp_path_factory.mktemp("models") / "blip")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return random_models.wd14(tmp_path_factory.mktemp("models") / "wd14")


def captions(folder_: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder_.rglob("*.txt"))}


def test_blip_writes_one_caption_per_image_with_the_prefix_and_the_trainer_reads_them(blip, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=3, captions=False)
    assert main(["caption", str(data), "--model", str(blip), "--prefix", "sks dog", "--suffix", "photo",
                 "--batch_size", "2", "--max_length", "8"]) == 0
    written = captions(data)
    assert sorted(written) == ["img0.txt", "img1.txt", "img2.txt"]
    for text in written.values():
        assert text.startswith("sks dog, ") and text.endswith(", photo\n") and len(text) > len("sks dog, , photo\n")
    err = capsys.readouterr().err
    assert "wrote 3 caption(s), skipped 0 file(s)" in err and "BLIP " in err and " on cpu in " in err
    assert "3/3 [" in err and ("img/s]" in err or "s/img]" in err)  # the progress bar: rate and time left
    rows = rows_from_folder(data)
    assert {Path(r.image).stem + ".txt": r.caption for r in rows} == {k: v.strip() for k, v in written.items()}
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temp file left


def test_existing_captions_are_kept_replaced_or_added_to(tagger, tmp_path, capsys, caplog):
    data = make_images(tmp_path / "data", n=2, captions=False)
    (data / "img0.txt").write_text("my own words, solo")
    run = ["caption", str(data), "--model", str(tagger), "--general_threshold", "0.01"]
    assert main(run) == 0
    assert (data / "img0.txt").read_text() == "my own words, solo"  # never replaced unless asked
    new = (data / "img1.txt").read_text().strip()
    assert "img0.txt exists" not in capsys.readouterr().err + caplog.text  # the summary groups the reasons
    assert main(run + ["--append"]) == 0
    appended = tags.split_tags((data / "img0.txt").read_text())
    assert appended[:2] == ["my own words", "solo"] and appended.count("solo") == 1 and len(appended) > 2
    assert (data / "img1.txt").read_text().strip() == new  # skipped: it has a caption now
    assert main(run + ["--append"]) == 0
    assert tags.split_tags((data / "img0.txt").read_text()) == appended  # appending twice adds nothing twice
    assert main(run + ["--overwrite", "--prefix", "sks"]) == 0
    assert (data / "img0.txt").read_text() == "sks, " + Tagger(tagger, options=TagOptions(0.01))(
        [read_image(data / "img0.png")])[0] + "\n"
    out = capsys.readouterr()
    assert "tag frequency" in out.err and out.out == ""
    assert main(run + ["--overwrite", "--dry_run", "--prefix", "other"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(f"{data / 'img0.txt'}: other, ")
    assert (data / "img0.txt").read_text().startswith("sks, ")  # a dry run writes nothing


def test_hostile_files_get_one_line_each_and_the_rest_is_captioned(tagger, tmp_path, caplog, capsys):
    data = make_images(tmp_path / "data", n=3, captions=False)
    outside = make_images(tmp_path / "outside", n=1, captions=False)
    (data / "notes.bin").write_bytes(b"\x00\x01")
    (data / "empty.png").write_bytes(b"")
    (data / "broken.png").write_bytes((data / "img0.png").read_bytes()[:60])
    (data / "link.png").symlink_to(outside / "img0.png")
    os.mkfifo(data / "pipe.png")
    (data / "img1.txt").write_bytes(b"caf\xe9, tags\n")  # Latin-1, not UTF-8
    (outside / "secret.txt").write_text("keep")
    (data / "img0.txt").symlink_to(outside / "secret.txt")
    with caplog.at_level("WARNING"):
        assert main(["caption", str(data), "--model", str(tagger), "--append"]) == 0
    said = {line.split(": ", 1)[0].removeprefix("skipping "): line for line in caplog.text.splitlines()}
    why = {Path(k).name: v for k, v in said.items() if k.startswith("skipping") or "/" in k}
    expect = {"notes.bin": "not an image", "empty.png": "empty file", "broken.png": "unreadable image",
              "link.png": "symlink to a file outside the folder", "pipe.png": "not a regular file",
              "img1.png": "not UTF-8 text", "img0.png": "link or not a regular file"}
    for name, text in expect.items():
        assert caplog.text.count(f"{data / name}:") == 1 and text in why[name], (name, caplog.text)
    assert (outside / "secret.txt").read_text() == "keep" and (data / "img1.txt").read_bytes() == b"caf\xe9, tags\n"
    assert "wrote 1 caption(s), skipped 7 file(s)" in capsys.readouterr().err and (data / "img2.txt").exists()
    assert main(["caption", str(data), "--model", str(tagger), "--overwrite"]) == 0  # replaced: it is not read
    assert (data / "img1.txt").read_text().strip() and (outside / "secret.txt").read_text() == "keep"


def test_kohya_repeat_folders_with_recursive(blip, tmp_path):
    data = tmp_path / "data"
    make_images(data / "10_sks dog", n=2, captions=False)
    from sdlora.errors import UserError

    with pytest.raises(UserError, match=r"no image in it .*1 sub-folder\(s\) are read with --recursive"):
        folder.plan(data)
    assert main(["caption", str(data), "--model", str(blip), "--recursive", "--prefix", "sks dog",
                 "--max_length", "8"]) == 0
    rows = rows_from_folder(data)
    assert len(rows) == 2 and all(r.repeats == 10 and r.caption.startswith("sks dog, ") for r in rows)


def test_florence2_captions(tmp_path):
    model = random_models.florence2(tmp_path / "florence")
    data = make_images(tmp_path / "data", n=2, captions=False)
    assert main(["caption", str(data), "--model", str(model), "--max_length", "6", "--batch_size", "2"]) == 0
    for text in captions(data).values():
        assert 1 <= len(text.split()) <= 6


@pytest.mark.parametrize("case", ["no folder", "not a model", "timm only", "remote code", "no images", "hub offline"])
def test_bad_model_or_folder_is_one_line(case, blip, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=1, captions=False)
    model = tmp_path / "m"
    model.mkdir()
    if case == "timm only":
        (model / "config.json").write_text('{"architecture": "vit_base_patch16_224", "num_classes": 3}')
    elif case == "remote code":
        (model / "config.json").write_text('{"model_type": "florence2", "auto_map": {"AutoConfig": "x.Y"}}')
    elif case == "no images":
        model, data = blip, tmp_path / "m"
    said = {"no folder": "no such folder, and not a valid Hub model id", "not a model": "no config.json",
            "timm only": "a timm tagger without model.onnx", "remote code": "trust_remote_code",
            "no images": "no image in it", "hub offline": "not a local folder and the Hub is unreachable"}[case]
    arg = {"no folder": str(tmp_path / "nothing/"), "hub offline": "someone/some-captioner"}.get(case, str(model))
    assert main(["caption", str(data), "--model", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and said in err, err


def test_tagger_options_are_kohyas():
    names = random_models.TAGS
    t = Tagger.__new__(Tagger)
    t.names = names
    probs = np.array([0.7, 0.3, 0.9, 0.5, 0.4, 0.2, 0.6, 0.1, 0.36, 0.8, 0.95])  # per selected_tags.csv row
    t.options = TagOptions()
    assert t.caption(probs) == "kirby, 1girl, ^_^, solo, long_hair, simple_background"
    t.options = TagOptions(0.5, 0.9, frozenset({"solo"}), remove_underscore=True, character_first=True, rating=True)
    assert t.caption(probs) == "general, kirby, 1girl, ^_^"
    t.options = TagOptions(0.35, 0.75, frozenset({"long hair"}), remove_underscore=True, separator=" ")
    assert t.caption(probs) == "kirby 1girl hatsune miku ^_^ solo simple background"


def test_tag_edits():
    assert tags.merged("a, b", "b, c, a, d") == "a, b, c, d"
    assert tags.edit("a, b, c", add=["d", "a"], remove=["b"], replace={"c": "e"}) == "a, e, d"
    assert tags.edit("a, b", replace={"b": "a"}) == "a"
    assert tags.compose(" cap ", "sks", "") == "sks, cap"
    assert tags.frequency(["a, b", "b, b", ""]) == {"a": 1, "b": 2}
    assert [tags.no_underscores(t) for t in ("^_^", "long_hair", "o_o")] == ["^_^", "long hair", "o_o"]


def test_a_killed_run_leaves_whole_captions_and_a_rerun_finishes(blip, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(60):
        Image.new("RGB", (32, 32), (i, 255 - i, 0)).save(data / f"{i:03d}.png")
    leftover = data / ".000.txt.0123456789abcdef.sdlora-tmp"  # what a kill inside a write leaves
    cmd = [PY, "-m", "sdlora.cli", "caption", str(data), "--model", str(blip), "--prefix", "sks", "--max_length", "8"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # a tiny model: one thread is fastest
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(data.glob("*.txt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = captions(data)
    assert 0 < len(before) < 60  # killed mid-run
    assert all(t.startswith("sks, ") and t.endswith("\n") and len(t) > 6 for t in before.values())
    leftover.write_text("sks, half a cap")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    after = captions(data)
    assert len(after) == 60 and all(after[k] == v for k, v in before.items())  # carried on, kept what was there
    assert not leftover.exists()


def test_a_chat_vlm_answers_the_prompt_and_only_the_answer_is_written(tmp_path):
    model = random_models.vlm(tmp_path / "vlm")
    data = make_images(tmp_path / "data", n=3, captions=False)
    assert main(["caption", str(data), "--model", str(model), "--prompt", "Describe it.", "--max_length", "5",
                 "--batch_size", "2", "--prefix", "sks"]) == 0
    for text in captions(data).values():
        words = text.removeprefix("sks, ").split()
        assert 1 <= len(words) <= 5 and set(words) <= set(random_models.WORDS), text  # no prompt, no template


def test_another_caption_extension_is_what_the_trainer_reads_with_it(tagger, tmp_path):
    data = make_images(tmp_path / "data", n=2, captions=False)
    assert main(["caption", str(data), "--model", str(tagger), "--caption_extension", "caption",
                 "--general_threshold", "0.01", "--prefix", "sks"]) == 0
    assert not list(data.glob("*.txt")) and len(list(data.glob("*.caption"))) == 2
    rows = rows_from_folder(data, caption_extension=".caption")
    assert [r.caption for r in rows] == [(data / f"img{i}.caption").read_text().strip() for i in range(2)]
    assert all(r.caption.startswith("sks, ") for r in rows)
