#!/usr/bin/env python
"""Does --masked_loss keep a subject's background out of the LoRA? A yellow disc on uniform noise (8 images,
32 px, the bundled model), trained with its mask and without; then "a sks circle" drawn with each LoRA.
Reports the colour inside the disc (the subject, learned by both) and the noise around it (mean absolute
difference of neighbouring pixels outside the disc: what the unmasked LoRA also learns).

    python benchmarks/masked_loss.py --steps 100
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--learning_rate", type=float, default=5e-3)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from sdlora.testing import disc_and_noise, subject_on_noise

    tmp = Path(tempfile.mkdtemp(prefix="bench-mask-"))
    data, masks = subject_on_noise(tmp / "data", tmp / "masks")
    flags = ["--pretrained_model_name_or_path", "sdlora-tiny", "--train_data_dir", str(data), "--resolution", "32",
             "--max_train_steps", str(a.steps), "--train_batch_size", "4", "--learning_rate", str(a.learning_rate),
             "--rank", "8", "--center_crop", "--seed", "0", "--report_to", "none"]
    runs = {"masked": ["--masked_loss", "--mask_dir", str(masks)], "unmasked": []}
    for name, extra in runs.items():
        subprocess.run([sys.executable, str(ROOT / "train_text_to_image_lora.py"), *flags, *extra,
                        "--output_dir", str(tmp / name)], check=True, capture_output=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": a.steps,
              "learning_rate": a.learning_rate, "target_colour": [230, 200, 0]}
    for name in ("base", "masked", "unmasked"):
        colour, noise = disc_and_noise(None if name == "base" else tmp / name)
        report[name] = {"disc_colour": colour, "noise_around": noise}
    b = report["base"]["noise_around"]
    report["noise_learned"] = {n: round(report[n]["noise_around"] - b, 2) for n in ("masked", "unmasked")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
