"""Gemma 3's pan-and-scan: an image much wider than tall (or the reverse) is also shown as a few crops.

Mirrors transformers 5.25's models/gemma3/image_processing_pil_gemma3.py (`pan_and_scan`) and
processing_gemma3.py (`replace_image_token`, the `images_kwargs` defaults).

Design decisions:
- Settings come from preprocessor_config.json; a null or absent key takes Gemma3Processor's default (off, crops
  of at least 256 px, at most 4 of them, only past an aspect ratio of 1.2), as the processor fills them.
- The crops are boxes over the decoded RGB image, clipped to it as numpy slicing clips them in HF; each crop then
  goes through the same resize / rescale / normalize as the whole image, so the views are [image, crop 1, ...].
- The prompt text for an image with crops is HF's: "Here is the original image {sequence} and here are some crops
  to help you see better " + the sequence once per crop, joined by spaces; without crops, the sequence alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ....errors import ConfigError

# Gemma3Processor.images_kwargs (what a null in preprocessor_config.json becomes)
DEFAULTS = dict(do_pan_and_scan=False, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                pan_and_scan_min_ratio_to_activate=1.2)


@dataclass(frozen=True)
class PanAndScan:
    min_crop_size: int
    max_num_crops: int
    min_ratio: float

    @classmethod
    def from_hf(cls, d: dict) -> "PanAndScan | None":
        """The settings of a preprocessor_config.json, or None when pan-and-scan is off."""
        v = DEFAULTS | {k: d[k] for k in DEFAULTS if d.get(k) is not None}
        if not isinstance(v["do_pan_and_scan"], bool):
            raise ConfigError(f"preprocessor_config.json do_pan_and_scan must be true or false, got "
                              f"{v['do_pan_and_scan']!r}")
        if not v["do_pan_and_scan"]:
            return None
        size, crops, ratio = (v[k] for k in ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                                             "pan_and_scan_min_ratio_to_activate"))
        for key, value in (("pan_and_scan_min_crop_size", size), ("pan_and_scan_max_num_crops", crops)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"preprocessor_config.json {key} must be a positive integer, got {value!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ConfigError(f"preprocessor_config.json pan_and_scan_min_ratio_to_activate must be a positive "
                              f"number, got {ratio!r}")
        return cls(size, crops, float(ratio))

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each crop of a width x height image, row by row; [] when it gets none."""
        if width >= height:
            if width / height < self.min_ratio:
                return []
            n_w = int(math.floor(width / height + 0.5))                 # half rounds up
            n_w = min(self.max_num_crops, max(2, min(int(math.floor(width / self.min_crop_size)), n_w)))
            n_h = 1
        else:
            if height / width < self.min_ratio:
                return []
            n_h = int(math.floor(height / width + 0.5))
            n_h = min(self.max_num_crops, max(2, min(int(math.floor(height / self.min_crop_size)), n_h)))
            n_w = 1
        crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
        if min(crop_w, crop_h) < self.min_crop_size:
            return []
        return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
                for y in range(0, crop_h * n_h, crop_h) for x in range(0, crop_w * n_w, crop_w)]


def image_text(sequence: str, n_crops: int) -> str:
    """What an image's `<start_of_image>` becomes (Gemma3Processor.replace_image_token)."""
    if not n_crops:
        return sequence
    return (f"Here is the original image {sequence} and here are some crops to help you see better "
            + " ".join([sequence] * n_crops))
