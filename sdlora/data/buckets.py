"""Aspect-ratio buckets: each image trains at a size of its own shape instead of a square crop.

The buckets are every (width, height) whose sides are multiples of `step` within [min_reso, max_reso]
and whose area is at most resolution² (the memory a square run at --resolution uses) but at least
MIN_AREA of the largest such area, plus the square resolution×resolution itself. An image goes to
the bucket nearest its aspect ratio in log space — which is exactly the bucket that keeps the most
of it — is resized to cover the bucket, and loses only the sliver that does not fit.

kohya's sd-scripts table keeps only the largest height for each width; at 512 px that leaves no
2:3 bucket (a 2:3 photo keeps 90 %). Allowing buckets down to MIN_AREA of the area adds 384×576.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

# Smallest bucket area, as a fraction of the largest: fewer pixels, in exchange for a shape that fits.
MIN_AREA = 0.8


@dataclass(frozen=True)
class Bucketing:
    """How images are sized for training. `enabled=False` is the square crop (--no_bucket)."""
    resolution: int
    enabled: bool = True
    min_reso: int | None = None  # default resolution/2, as kohya's 256 at 512
    max_reso: int | None = None  # default 2×resolution, as kohya's 1024 at 512
    step: int = 64
    no_upscale: bool = False

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.min_reso or max(self.step, self.resolution // 2), self.max_reso or 2 * self.resolution)

    def table(self) -> list[tuple[int, int]]:
        """Every bucket (w, h), sorted; a UserError when the flags leave none."""
        if not self.enabled:
            return [(self.resolution, self.resolution)]
        lo, hi = self.bounds
        area = self.resolution ** 2
        sides = range(math.ceil(lo / self.step) * self.step, hi + 1, self.step)
        pairs = {(w, h) for w in sides for h in sides if w * h <= area}
        if not pairs and not lo <= self.resolution <= hi:
            raise UserError(f"--min_bucket_reso {lo} / --max_bucket_reso {hi} / --bucket_reso_steps {self.step} "
                            f"leave no bucket with area <= --resolution² ({self.resolution}²); widen the range "
                            f"(e.g. --min_bucket_reso {self.resolution // 2} --max_bucket_reso {2 * self.resolution})")
        top = max((w * h for w, h in pairs), default=0)
        keep = {(w, h) for w, h in pairs if w * h >= MIN_AREA * top}
        if lo <= self.resolution <= hi:
            keep.add((self.resolution, self.resolution))  # a square image trains exactly as with --no_bucket
        return sorted(keep)

    def assign(self, size: tuple[int, int], table: list[tuple[int, int]]) -> tuple[int, int] | None:
        """The bucket for an image of `size` (w, h); None when --bucket_no_upscale leaves it no bucket."""
        if not self.enabled:
            return self.resolution, self.resolution
        w, h = size
        if self.no_upscale and w * h < self.resolution ** 2:
            # Small images keep their size: their own bucket, the image floored to whole steps (kohya).
            b = (w // self.step * self.step, h // self.step * self.step)
            return b if min(b) > 0 else None
        ar = math.log(w / h)
        # Nearest shape first; between equally near shapes, the one with more pixels.
        return min(table, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ar), 9), -b[0] * b[1]))


def cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to so that it covers `bucket` (then cropped to it)."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def kept(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The fraction of the image's area that survives the crop to `bucket`."""
    nw, nh = cover(size, bucket)
    return bucket[0] * bucket[1] / (nw * nh)


def report(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]], resolution: int) -> tuple[dict, float, float]:
    """(bucket -> image count, mean area kept, mean area a square centre crop keeps) for the log."""
    counts: dict[tuple[int, int], int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    n = max(len(sizes), 1)
    mean = sum(kept(s, b) for s, b in zip(sizes, buckets)) / n
    square = sum(kept(s, (resolution, resolution)) for s in sizes) / n
    return dict(sorted(counts.items())), mean, square
