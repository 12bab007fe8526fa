#!/usr/bin/env python
"""Same behaviour, bit for bit: train a fixed set of short runs on the bundled tiny models and fingerprint what
they write, so a restructuring can be checked against the code it started from.

    python .ci/same_behaviour.py record golden.json     # on the reference tree
    python .ci/same_behaviour.py check golden.json      # on the changed tree: exit 1 and a list of differences

The tree under test is the current directory (or --tree): its top-level recipe scripts run as subprocesses, with
PYTHONPATH set to that tree, so the same copy of this script can check any checkout.

What is compared, per output file (not whole files: dates, versions and paths legitimately differ):
  *.safetensors  one SHA-256 over each tensor's name, dtype, shape and bytes; the header metadata (JSON values
                 parsed, each key compared on its own)
  *.pt / *.bin   torch.load'ed: the tensors as above, every other leaf by value (optimizer and LR-scheduler state)
  *.png          mode, size and SHA-256 of the decoded pixels (and PNG text chunks)
  *.json         parsed values
  *.md           the text (the model card)
Dropped or normalised, because they change between two runs of the same code (DROPPED_KEYS, normalise(); a
dotted key such as peft's "unet.peft_version" is matched by its last part):
  modelspec.date (today's date), sdlora_version and peft_version/version (package versions), the files' SHA-256
  in .sdlora-files.json (they hash the metadata's date); the work folder's and the tree's absolute paths become
  <WORK> and <TREE>, and "sdlora X.Y.Z" in text becomes "sdlora <VERSION>".

Every run is single-threaded (OMP_NUM_THREADS=1, fp32, fixed seeds, no GPU) so that it reproduces from run to run;
runs go two at a time (--jobs). A quiet 2-core CPU takes about 3 minutes. The committed golden file was recorded on
this project's 2-core Intel Xeon; another CPU (other SIMD kernels) may round differently: record its own golden file
from the start commit there.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T2I, DB = "train_text_to_image_lora.py", "train_dreambooth_lora.py"


def common(steps: int = 4, resolution: bool = True) -> list[str]:
    """Few-second runs; an SDXL base trains at its own size (no --resolution)."""
    return ["--resolution", "32"] * resolution + [
        "--train_batch_size", "2", "--max_train_steps", str(steps), "--seed", "0", "--report_to", "none",
        "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--mixed_precision", "no"]


POKEMON = ["--train_data_dir", "{tree}/examples/data/pokemon", "--max_train_samples", "16"]
TINY, TINY_XL = ["--pretrained_model_name_or_path", "sdlora-tiny"], ["--pretrained_model_name_or_path", "sdlora-tiny-xl"]

# name: [(script, flags), ...] — runs in one output folder, one after the other (the resumed run has two).
RUNS = {
    "t2i": [(T2I, TINY + POKEMON + common() + ["--validation_prompt", "a red square", "--num_validation_images", "2"])],
    "dreambooth_prior_te": [(DB, TINY + common() + [
        "--instance_data_dir", "{tree}/examples/data/dreambooth/instance", "--instance_prompt", "a sks square",
        "--with_prior_preservation", "--class_prompt", "a square", "--num_class_images", "4",
        "--prior_generation_precision", "fp32", "--class_data_dir", "{out}-class-images", "--train_text_encoder"])],
    "sdxl": [(T2I, TINY_XL + POKEMON + common(resolution=False) + [
        "--train_text_encoder", "--validation_prompt", "a red square", "--num_validation_images", "1"])],
    "loha": [(T2I, TINY + POKEMON + common() + ["--lora_type", "loha"])],
    "dora": [(T2I, TINY + POKEMON + common() + ["--lora_type", "dora"])],
    "adalora": [(T2I, TINY + POKEMON + common(6) + ["--lora_type", "adalora"])],
    "resumed": [(T2I, TINY + POKEMON + common(2)),
                (T2I, TINY + POKEMON + common() + ["--resume_from_checkpoint", "latest"])],
}

# Changes made on purpose after the commit the golden file was recorded at, left out of the comparison:
#   issue #29: the model card's `license:` is the base's (the bundled models: apache-2.0), no longer always
#   creativeml-openrail-m.
INTENDED = {".md": (re.compile(r"(?m)^license: .*$"), "license: <the base's licence>")}
# Files a run writes since the golden's commit, on purpose: each run's resolved settings (issue #33).
NEW_FILES = {"sdlora-config.toml"}
DROPPED_KEYS = {"modelspec.date", "sdlora_version", "peft_version", "version", "transformers_version",
                "diffusers_version", "_diffusers_version"}


def env(tree: Path) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
             MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(tree), CUDA_VISIBLE_DEVICES="")
    e.pop("ACCELERATE_MIXED_PRECISION", None)
    return e


def train(name: str, tree: Path, work: Path) -> dict:
    out = work / name
    t0 = time.time()
    for script, flags in RUNS[name]:
        argv = [f.format(tree=tree, out=out) for f in flags] + ["--output_dir", str(out)]
        r = subprocess.run([sys.executable, str(tree / script), *argv], capture_output=True, text=True,
                           env=env(tree), cwd=tree, timeout=900)
        if r.returncode != 0:
            return {"error": f"{script} exited {r.returncode}: {r.stderr[-3000:]}"}
    files = {}
    for folder in [out, Path(f"{out}-class-images")]:
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            files[path.relative_to(work).as_posix()] = fingerprint(path, work, tree)
    print(f"  {name}: {len(files)} files, {time.time() - t0:.0f} s", flush=True)
    return {"files": files}


# --- fingerprints -------------------------------------------------------------------------------------------------

def normalise(value, work: Path, tree: Path):
    """Paths of this run's folders and the package version out of strings, recursively; dropped keys removed."""
    if isinstance(value, dict):
        # peft's adapter metadata spells its keys "unet.peft_version": the last part decides
        return {k: normalise(v, work, tree) for k, v in value.items() if str(k).rsplit(".", 1)[-1] not in DROPPED_KEYS}
    if isinstance(value, (list, tuple)):
        return [normalise(v, work, tree) for v in value]
    if isinstance(value, str):
        for real, mark in ((str(work.resolve()), "<WORK>"), (str(work), "<WORK>"), (str(tree.resolve()), "<TREE>"),
                           (str(tree), "<TREE>")):
            value = value.replace(real, mark)
        return re.sub(r"\bsdlora (v)?\d+\.\d+(\.\d+)?\S*", "sdlora <VERSION>", value)
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def tensor_digest(t) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)} {hashlib.sha256(raw).hexdigest()[:32]}"


def tensors_digest(named: dict) -> str:
    """One digest for a file's tensors (names, dtypes, shapes, bytes): per-tensor entries made the golden file
    1.6 MB. `record --keep DIR` on both trees shows which tensor differs."""
    h = hashlib.sha256()
    for k in sorted(named):
        h.update(f"{k} {tensor_digest(named[k])}\n".encode())
    return f"{len(named)} tensors {h.hexdigest()[:32]}"


def leaves(obj, prefix="", tensors=None):
    """Flatten nested dicts/lists into (path, leaf); tensors go into `tensors` (path -> tensor) instead."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from leaves(obj[k], f"{prefix}.{k}" if prefix else str(k), tensors)
    elif isinstance(obj, (list, tuple)) and len(obj) > 8 and all(isinstance(v, (int, float)) for v in obj):
        # an optimizer's param_groups list every parameter's index: one entry, not hundreds
        yield prefix, f"{len(obj)} numbers {hashlib.sha256(json.dumps(list(obj)).encode()).hexdigest()[:32]}"
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{prefix}[{i}]", tensors)
    else:
        yield prefix, obj if isinstance(obj, (int, float, str, bool, type(None))) else repr(obj)


def parse_json_string(v: str):
    if v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            pass
    return v


def fingerprint(path: Path, work: Path, tree: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = {k: parse_json_string(v) for k, v in (f.metadata() or {}).items()}
            out = {"tensors": tensors_digest({k: f.get_tensor(k) for k in f.keys()})}
        out.update({f"meta {k}": v for k, v in leaves(normalise(meta, work, tree), tensors={})})
        return out
    if suffix in (".pt", ".bin", ".pth"):
        import torch

        obj, tensors = torch.load(str(path), map_location="cpu", weights_only=False), {}
        out = {k or "value": v for k, v in leaves(normalise(obj, work, tree) if not hasattr(obj, "shape") else obj,
                                                   tensors=tensors)}
        return {**out, "tensors": tensors_digest(tensors)}
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            out = {"pixels": f"{im.mode} {im.size[0]}x{im.size[1]} {hashlib.sha256(im.tobytes()).hexdigest()[:32]}"}
            out.update({f"text {k}": v for k, v in normalise(dict(getattr(im, "text", {}) or {}), work, tree).items()})
            return out
    if suffix == ".json" or path.name == ".sdlora-files.json":
        data = json.loads(path.read_text())
        if path.name == ".sdlora-files.json" and isinstance(data.get("files"), dict):
            data["files"] = sorted(data["files"])  # their SHA-256 covers the metadata's date: names only
        return {k or "value": v for k, v in leaves(normalise(data, work, tree), tensors={})}
    if suffix in (".md", ".txt", ".jsonl", ".csv", ".yaml"):
        text = normalise(path.read_text(), work, tree)
        return {"text": text}
    return {"size": path.stat().st_size}  # anything else: only that it is there


# --- record / check -----------------------------------------------------------------------------------------------

def run_all(tree: Path, names: list[str], jobs: int, keep: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="same-behaviour-")) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    print(f"tree {tree}, outputs in {work}", flush=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            done = dict(zip(names, pool.map(lambda n: train(n, tree, work), names)))
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return done


def peft_defaults() -> dict:
    """LoraConfig's defaults, as a config's JSON holds them."""
    import dataclasses

    from peft import LoraConfig

    return {f.name: json.loads(json.dumps(f.default_factory() if f.default_factory is not dataclasses.MISSING
                                          else f.default, default=str))
            for f in dataclasses.fields(LoraConfig) if f.name not in ("peft_type", "r", "lora_alpha")}


def intended(name: str, fingerprint: dict) -> dict:
    """A file's fingerprint with the INTENDED changes masked, on both sides of the comparison. Also intended since
    10b4578: a LoRA file's lora_adapter_metadata leaves out entries at peft's defaults (inject.file_config), and
    the NEW_FILES a run now writes."""
    rule = INTENDED.get(Path(name).suffix)
    if rule and isinstance(fingerprint.get("text"), str):
        return {**fingerprint, "text": rule[0].sub(rule[1], fingerprint["text"])}
    if Path(name).name == ".sdlora-files.json":  # the record of the run's files: without the intended new one
        listed = [v for k, v in sorted(fingerprint.items()) if k.startswith("files[") and v not in NEW_FILES]
        rest = {k: v for k, v in fingerprint.items() if not k.startswith("files[")}
        return {**rest, **{f"files[{i}]": v for i, v in enumerate(sorted(listed))}}
    if Path(name).suffix == ".safetensors":
        defaults, prefix = peft_defaults(), "meta lora_adapter_metadata."
        return {k: v for k, v in fingerprint.items()
                if not (k.startswith(prefix) and defaults.get(k.rsplit(".", 1)[-1], ...) == v)}
    return fingerprint


def compare(golden: dict, now: dict) -> list[str]:
    diffs = []
    for name in golden:
        g, n = golden[name], now.get(name, {"error": "not run"})
        if "error" in n or "error" in g:
            if g != n:
                diffs.append(f"{name}: {n.get('error') or 'ran'} (golden: {g.get('error') or 'ran'})")
            continue
        for f in sorted(set(g["files"]) | set(n["files"])):
            if f not in n["files"]:
                diffs.append(f"{f}: missing")
                continue
            if f not in g["files"] and Path(f).name in NEW_FILES:
                continue
            if f not in g["files"]:
                diffs.append(f"{f}: new file")
                continue
            gf, nf = (intended(f, x["files"][f]) for x in (g, n))
            for k in sorted(set(gf) | set(nf)):
                if gf.get(k, "<absent>") != nf.get(k, "<absent>"):
                    a, b = (json.dumps(x.get(k, "<absent>"))[:300] for x in (gf, nf))
                    diffs.append(f"{f}: {k}: {b} (golden: {a})")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["record", "check"])
    p.add_argument("golden", type=Path)
    p.add_argument("--tree", type=Path, default=Path.cwd(), help="the checkout to run (default: the current folder)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each single-threaded)")
    p.add_argument("--only", nargs="+", choices=list(RUNS), help="a subset of the runs (check: compared alone)")
    p.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    args = p.parse_args(argv)
    tree = args.tree.resolve()
    if not (tree / T2I).is_file():
        p.error(f"{tree} has no {T2I}: run from a checkout's root or give --tree")
    names = args.only or list(RUNS)
    t0 = time.time()
    now = run_all(tree, names, args.jobs, args.keep)
    if args.mode == "record":
        bad = [f"{n}: {r['error']}" for n, r in now.items() if "error" in r]
        if bad:
            print("\n".join(bad), file=sys.stderr)
            return 1
        args.golden.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "dropped_keys": sorted(DROPPED_KEYS),
                                           "runs": now}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now)} runs in {args.golden} ({time.time() - t0:.0f} s)")
        return 0
    golden = json.loads(args.golden.read_text())["runs"]
    golden = {n: golden[n] for n in names if n in golden}
    diffs = compare(golden, now)
    if diffs:
        print(f"{len(diffs)} differences from {args.golden}:", file=sys.stderr)
        print("\n".join(f"  {d}" for d in diffs[:200]), file=sys.stderr)
        print("(to see which tensor or pixel differs: run both trees with --keep DIR and compare the folders)",
              file=sys.stderr)
        return 1
    print(f"same behaviour: {len(now)} runs, {sum(len(r['files']) for r in now.values())} files match "
          f"{args.golden} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
