"""Fuzzed data folders (issue #11): rows or one-line UserError naming the file; never a traceback or a hang."""
import io
import json
import logging
import os
import random
import signal
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from helpers import DREAMBOOTH, T2I, fast_flags, run
from PIL import Image

from sdlora.data.images import read_image
from sdlora.data.sources import Row, rows_from_folder, rows_from_images
from sdlora.errors import UserError

ROOT_USER = os.geteuid() == 0  # chmod 000 doesn't stop root from reading


def _png(size=(8, 8), mode="RGB", colour=0) -> bytes:
    b = io.BytesIO()
    Image.new(mode, size, colour).save(b, "PNG")
    return b.getvalue()


def _bomb() -> bytes:
    """A tiny PNG that claims 30000 x 30000 pixels (beyond PIL's decompression-bomb limit)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _image_bytes(rng: random.Random) -> bytes:
    """A valid image in an odd mode or format, or a broken one (mutated, truncated, garbage, bomb)."""
    kind = rng.choice(["mode", "mode", "mutate", "truncate", "garbage", "empty", "bomb", "idat0"])
    if kind == "mode":
        mode, fmt = rng.choice([("L", "PNG"), ("LA", "PNG"), ("P", "GIF"), ("I;16", "PNG"), ("1", "TIFF"), ("F", "TIFF"),
                                ("CMYK", "JPEG"), ("RGBA", "WEBP"), ("LAB", "TIFF"), ("YCbCr", "TIFF"), ("RGB", "BMP")])
        b = io.BytesIO()
        rgb = np.random.default_rng(rng.randrange(99)).integers(0, 255, (9, 7, 3), dtype=np.uint8)
        # Pillow < 10.3 cannot convert RGB to I;16: build that one from 16-bit data directly
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(rgb).convert(mode)
        img.save(b, fmt)
        return b.getvalue()
    data = bytearray(_png((12, 10), colour=(rng.randrange(256), 0, 0)))
    if kind == "mutate":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        data = data[:rng.randrange(1, len(data))]
    elif kind == "garbage":
        data = bytearray(rng.randbytes(rng.randint(1, 300)))
    elif kind == "empty":
        data = b""
    elif kind == "bomb":
        data = _bomb()
    else:
        i = data.index(b"IDAT") - 4
        data[i:i + 4] = b"\0\0\0\0"  # PIL raises SyntaxError on this one
    return bytes(data)


def _caption_bytes(rng: random.Random) -> bytes:
    return rng.choice([b"a red square", b"", b"\xef\xbb\xbfbom caption", "caf\xe9".encode("latin-1"),
                       "caption".encode("utf-16"), b"nul \0 byte", "\u2028 separator".encode()])


def _jsonl_line(rng: random.Random, names: list[str], outside: str) -> str:
    fn = rng.choice(names + ["gone.png", "../outside.png", outside, "sub\\x.png", "", "a\0b.png", "notes.txt", "sub"])
    row = {"file_name": rng.choice([fn, fn, fn, 5, None, [fn], {"p": fn}])}
    if rng.random() < 0.1:
        row.pop("file_name")
    cap = rng.choice(["a caption", "", None, ["one", "two"], [], 42, 1.5, True, {"en": "x"}, ["x", 3], "\u2028\x85"])
    if rng.random() < 0.9:
        row[rng.choice(["text", "text", "text", "caption"])] = cap
    line = json.dumps(row, ensure_ascii=rng.random() < 0.5)
    return rng.choice([line] * 12 + ["not json", "[1, 2]", "[" * 5000, '{"file_name": ' + "9" * 5000 + "}",
                                      '{"file_name": "a.png", "text": "x"} ' * 2000, ""])


def _csv_line(rng: random.Random, names: list[str]) -> str:
    fn = rng.choice(names + ["gone.png", "../outside.png", ""])
    return rng.choice([f"{fn},a caption", f"{fn},\"quoted, comma\"", f"{fn},a, unquoted comma", f"{fn}", ",",
                       f"{fn},\"multi\nline\"", f"{fn},nul\0byte", f"{fn},\"" + "x" * 140_000 + "\"", f"{fn},caf\xe9"])


def make_folder(rng: random.Random, d, outside) -> set:
    """A data folder mixing good and bad files; returns every path a message may name."""
    d.mkdir()
    names = []
    for i in range(rng.randint(0, 3)):  # good images, some captioned
        name = f"img{i}.png" if rng.random() < 0.7 else f"sub/img{i}.png"
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_bytes(_png(colour=(i * 60, 0, 0)))
        names.append(name)
        if rng.random() < 0.8:
            (d / name).with_suffix(".txt").write_bytes(_caption_bytes(rng) if rng.random() < 0.3 else b"ok")
    for i in range(rng.randint(0, 3)):  # odd or broken images
        (d / f"odd{i}.{rng.choice(['png', 'jpg', 'gif', 'tif', 'webp', 'bin'])}").write_bytes(_image_bytes(rng))
    for _ in range(rng.randint(0, 3)):  # links and other non-files
        name = f"link{rng.randrange(1000)}.png"
        kind = rng.choice(["inside", "out_file", "out_dir", "loop", "dangling", "dir_loop", "fifo", "txt_dir",
                           "txt_out", "txt_fifo", "chmod", "hidden"])
        if os.path.lexists(d / name):
            continue
        if kind == "inside" and names:
            (d / name).symlink_to(names[0])
        elif kind == "out_file":
            (d / name).symlink_to(outside / "outside.png")
        elif kind == "out_dir" and not os.path.lexists(d / "ext"):
            (d / "ext").symlink_to(outside, target_is_directory=True)
        elif kind == "loop":
            (d / name).symlink_to(name)
        elif kind == "dangling":
            (d / name).symlink_to("nowhere.png")
        elif kind == "dir_loop" and not os.path.lexists(d / "sub" / "up"):
            (d / "sub").mkdir(exist_ok=True)
            (d / "sub" / "up").symlink_to("..", target_is_directory=True)
        elif kind == "fifo":
            os.mkfifo(d / name)
        elif kind in ("txt_dir", "txt_out", "txt_fifo") and names and not (d / names[-1]).with_suffix(".txt").is_dir():
            txt = (d / names[-1]).with_suffix(".txt")
            txt.unlink(missing_ok=True)
            {"txt_dir": txt.mkdir, "txt_fifo": lambda: os.mkfifo(txt),
             "txt_out": lambda: txt.symlink_to(outside / "outside.txt")}[kind]()
        elif kind == "chmod" and not ROOT_USER:
            (d / name).write_bytes(_png())
            (d / name).chmod(0)
        elif kind == "hidden":
            (d / ".hidden.png").write_bytes(b"x")
    meta = rng.choice([None, None, "metadata.jsonl", "metadata.csv"])
    if meta == "metadata.jsonl":
        text = "\n".join(_jsonl_line(rng, names, str(outside / "outside.png")) for _ in range(rng.randint(0, 5)))
        data = text.encode("utf-8", "surrogatepass")
    elif meta == "metadata.csv":
        text = "\n".join([rng.choice(["file_name,text", "file_name,caption", "name,text"])]
                         + [_csv_line(rng, names) for _ in range(rng.randint(0, 4))])
        data = text.encode(rng.choice(["utf-8", "utf-8", "utf-8-sig", "latin-1"]))
    if meta:
        (d / meta).write_bytes(data)
    return {str(d)} | {str(p) for p in d.rglob("*")} | {str(d / n) for n in names}


@contextmanager
def deadline(seconds):
    """Turn a hang (a blocking FIFO read, an endless walk) into a failure."""
    def boom(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _check(call, d, named: set, records: list):
    """`call()` gives usable rows from inside `d`, or a one-line UserError that starts with a file it was given."""
    try:
        with deadline(10):
            rows = call()
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        lead = msg.split(": ")[0].split(", line ")[0]
        lead = lead.removeprefix("--train_data_dir ").removeprefix("--instance_data_dir ")
        assert lead in named, msg
        return "error"
    for r in rows:
        assert isinstance(r, Row) and (isinstance(r.caption, str) or all(isinstance(c, str) for c in r.caption))
        assert os.path.realpath(r.image).startswith(f"{d.resolve()}{os.sep}"), r.image  # nothing from outside
        assert "outside caption" not in r.caption
        assert read_image(r.image).mode == "RGB"  # what passed the scan also loads for training
    for rec in records:
        assert "\n" not in rec.getMessage(), rec.getMessage()
    return "rows"


def test_fuzzed_folders_give_rows_or_one_line_errors(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "outside.png").write_bytes(_png())
    (outside / "outside.txt").write_text("outside caption")
    seen = {"rows": 0, "error": 0}
    for seed in range(150):
        rng = random.Random(seed)
        d = tmp_path / f"d{seed}"
        named = make_folder(rng, d, outside)
        allow = rng.random() < 0.5
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            seen[_check(lambda: rows_from_folder(d, allow_empty_captions=allow), d, named, caplog.records)] += 1
            _check(lambda: rows_from_images(d, "a sks thing", "--instance_data_dir"), d, named, caplog.records)
    assert seen["rows"] > 20 and seen["error"] > 20, seen  # the mix exercises both outcomes


def _no_model_loaded(r):
    lines = r.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for word in ("Loading", "cached", "caching", "LoRA parameters"):  # what a run prints once models load
        assert word not in r.stderr, r.stderr[-3000:]
    return errors[0], r.stderr


def test_scripts_name_the_bad_file_before_loading_models(tiny_model, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png())
    t2i = tmp_path / "t2i"
    t2i.mkdir()
    for n in ("a", "b"):
        (t2i / f"{n}.png").write_bytes(_png())
    (t2i / "out.png").symlink_to(outside)
    (t2i / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "gone.png", "text": "x"}\n'
                                        '{"file_name": "b.png", "text": 7}\n')
    inst = tmp_path / "inst"
    inst.mkdir()
    broken = bytearray(_png())
    i = broken.index(b"IDAT") - 4
    broken[i:i + 4] = b"\0\0\0\0"
    (inst / "broken.png").write_bytes(bytes(broken))
    (inst / "link.png").symlink_to(outside)
    with ThreadPoolExecutor(2) as pool:  # both at once: each is mostly Python start-up
        a = pool.submit(run, T2I, fast_flags(tiny_model, tmp_path / "o1", train_data_dir=t2i), check=False)
        b = pool.submit(run, DREAMBOOTH, fast_flags(tiny_model, tmp_path / "o2", instance_data_dir=inst,
                                                    instance_prompt="a sks square"), check=False)
    err, log = _no_model_loaded(a.result())
    assert err == f"error: {t2i / 'metadata.jsonl'}, line 3: caption 'text' should be text or a list of texts (got 7); " \
                  f"put it in quotes"
    assert log.count(f"skipping {t2i / 'out.png'}: symlink to a file outside --train_data_dir") == 1
    assert log.count(f"skipping {t2i / 'metadata.jsonl'}, line 2: no file 'gone.png'") == 1
    err, log = _no_model_loaded(b.result())
    assert err.startswith(f"error: --instance_data_dir {inst}: no readable image")
    assert log.count(f"skipping {inst / 'broken.png'}: unreadable image (broken PNG file") == 1
    assert log.count(f"skipping {inst / 'link.png'}: symlink to a file outside --instance_data_dir") == 1
