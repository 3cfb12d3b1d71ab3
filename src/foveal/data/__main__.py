"""`python -m foveal.data OUT_DIR --n N --seed S`: write a dataset of the shapes world."""

from __future__ import annotations

import argparse
import sys
import time

from foveal.data.export import DEFAULT_FORMATS, FORMATS, write_dataset
from foveal.data.world import QUESTION_TYPES, WorldConfig
from foveal.errors import FovealError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m foveal.data", description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=1000, help="number of images (scenes)")
    p.add_argument("--seed", type=int, default=0, help="world seed; use an unseen one for held-out sets")
    p.add_argument("--start", type=int, default=0, help="index of the first scene")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--text-prob", type=float, default=0.5)
    p.add_argument("--types", nargs="+", default=list(QUESTION_TYPES), help="question types")
    p.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), help=f"of {', '.join(FORMATS)}")
    p.add_argument("--turns", type=int, default=None, help="Q/A turns per LLaVA instruct record (all)")
    p.add_argument("--caption-style", default="mixed", choices=("canonical", "mixed"))
    p.add_argument("--think", action="store_true",
                   help="the first answer of each instruct record opens with the scene's description "
                        "as a <think> thought")
    p.add_argument("--relation-thoughts", action="store_true",
                   help="a relation question's answer (instruct records and scene documents) opens with "
                        "where each of its two objects is, as a <think> thought")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = WorldConfig(
            image_size=args.image_size, min_objects=args.min_objects, max_objects=args.max_objects,
            text_prob=args.text_prob, question_types=tuple(args.types),
        )
        t0 = time.perf_counter()
        written = write_dataset(args.out_dir, args.n, args.seed, config, args.formats, args.start,
                                args.turns, args.caption_style, args.think,
                                args.relation_thoughts)
    except FovealError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    for role, path in written.items():
        print(f"{role:16s} {path}")
    print(f"{args.n} scenes in {elapsed:.1f} s ({args.n / max(elapsed, 1e-9):.0f} scenes/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
