"""`foveal train clip | lm | assemble | align | instruct | merge | recipe`: argument parsing for the
training stages.

Option names follow LLaVA's training scripts where they exist (--image-folder, --lora-r,
--lora-alpha, --gradient-checkpointing), with per-part learning rates (--lr-projector, --lr-lm,
--lr-lora, --lr-vision).
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError, FovealError


def _add_common(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("model", help="base model (HF folder or any foveal model reference)")
    p.add_argument("data", help="LLaVA-format conversation JSON (or JSONL)")
    p.add_argument("-o", "--output", required=True, help="output folder (model or adapter, loss.png, checkpoints/)")
    p.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to "
                                                        "(default: the JSON's folder)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per process and micro-step (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr-projector", type=float, default=None,
                   help="projector learning rate (default 1e-3 for align, 2e-5 for instruct)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast (fp32 master weights) or fp32; auto: bf16 where the CPU/GPU has it")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute LM layers in backward "
                                                                         "(less memory, ~30%% slower)")
    p.add_argument("--compile", action="store_true", help="forward and backward through torch.compile: "
                   "~1.3x examples/s on CPU after ~20 s of compiling; falls back to eager if it fails")
    p.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding; the order stays random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: only at a stop)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in OUTPUT/checkpoints (or the one given)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this run with a "
                                                                 "checkpoint (continue later with --resume)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written model (default float32)")
    p.add_argument("--max-minutes", type=float, default=None, help="time budget: the schedule decays by time "
                                                                    "too and the run ends when it is spent")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=cmd_train, stage=stage)


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a VLM: clip, lm, assemble, align (stage 1), instruct (stage 2), "
                                         "merge a LoRA adapter, or a whole recipe")
    tsub = train.add_subparsers(dest="train_command", required=True)

    p = tsub.add_parser("align", help="stage 1: train the projector on image-caption conversations "
                                      "(vision tower and LM frozen)")
    _add_common(p, "align")

    p = tsub.add_parser("instruct", help="stage 2: train projector + LM (or LoRA on the LM) on conversations")
    _add_common(p, "instruct")
    p.add_argument("--lr-lm", type=float, default=None, help="language-model learning rate (default 2e-5)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on the LM instead of full fine-tuning")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,v_proj",
                   help="LM linears to adapt, comma-separated, or all-linear (default q_proj,v_proj)")
    p.add_argument("--lr-lora", type=float, default=None, help="LoRA learning rate (default 2e-4)")
    p.add_argument("--merge", action="store_true", help="with --lora: also write the merged model to OUTPUT/merged")
    p.add_argument("--freeze-projector", action="store_true", help="keep the projector fixed")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower (--lr-vision)")
    p.add_argument("--lr-vision", type=float, default=2e-6)

    p = tsub.add_parser("lm", help="train a BPE tokenizer and pretrain a small decoder LM on a text corpus")
    p.add_argument("corpus", help="text file, one document per line, or JSON lines of {\"text\": ...} documents "
                                  "(`python -m foveal.data OUT --formats corpus` or `--formats documents`)")
    p.add_argument("-o", "--output", required=True, help="output folder (HF LlamaForCausalLM checkpoint)")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--whole-documents", action="store_true",
                   help="each block holds whole documents, padded, instead of a cut of one packed stream")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=None, help="time budget (the schedule decays with it)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_lm)

    p = tsub.add_parser("clip", help="contrastive pretraining of a ViT image encoder and a text encoder on the "
                                     "shapes world's image-caption pairs (generated on the fly)")
    p.add_argument("-o", "--output", required=True, help="output folder: the tower (HF CLIPVisionModel) and "
                                                         "text_encoder/")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=128, help="ViT hidden size")
    p.add_argument("--layers", type=int, default=4, help="ViT layers")
    p.add_argument("--heads", type=int, default=4, help="ViT attention heads")
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=128, help="joint embedding size")
    p.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step (the negatives)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--minutes", type=float, default=None, help="time budget (the schedule decays with it)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-size", type=int, default=256, help="held-out pairs for zero-shot retrieval")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="world seed of the training pairs")
    p.add_argument("--region-weight", type=float, default=0.0,
                   help="also contrast each object's patches with the batch's object phrases, with this weight")
    p.add_argument("--attribute-weight", type=float, default=0.0,
                   help="also contrast each object's patches with every word of each attribute (its shape among "
                        "the shapes, its colour among the colours, its size among the sizes), with this weight")
    p.add_argument("--glyph-weight", type=float, default=0.0,
                   help="also contrast each rendered character's patches with the text alphabet, with this weight")
    p.add_argument("--caption-weight", type=float, default=1.0,
                   help="weight of the whole-image caption contrast (default 1)")
    p.add_argument("--attribute-pooling", choices=("region", "patch"), default="region",
                   help="attribute words against each object's mean patch state (region) or each patch inside it")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="also train linear heads on every patch inside an object to name its shape, colour and "
                        "size (the synthetic world's scene labels), with this weight; the heads are not saved")
    p.add_argument("--no-label-chars", action="store_true",
                   help="with --label-weight: no head naming the character under each rendered glyph's patches")
    p.add_argument("--label-cells", action="store_true",
                   help="with --label-weight: also a head naming the grid cell (top left ... bottom right) of the "
                        "object under each patch, what \"where is the X?\" answers")
    p.add_argument("--label-relations", action="store_true",
                   help="with --label-weight: also a multi-label head naming, per direction (left, right, above, "
                        "below), the kinds of object that lie that way from the object under each patch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_clip)

    p = tsub.add_parser("assemble", help="build an HF LLaVA from a trained vision tower and a trained LM, with a "
                                         "fresh mlp2x_gelu projector")
    p.add_argument("--vision", required=True, help="CLIP/SigLIP vision tower folder (e.g. from `foveal train clip`)")
    p.add_argument("--lm", required=True, help="language model folder with its tokenizer (e.g. `foveal train lm`)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--vision-feature-layer", type=int, default=-1,
                   help="hidden state the projector reads (default -1: `foveal train clip` trains the last layer's "
                        "patch states; use -2 for CLIP towers trained with class-token pooling)")
    p.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    p.add_argument("--calibrate", metavar="IMAGE_DIR", default=None,
                   help="initialise the projector from the feature statistics of (up to 256) images in this "
                        "folder, e.g. the training images (recommended for towers and LMs trained from scratch)")
    p.set_defaults(func=cmd_assemble)

    p = tsub.add_parser("recipe", help="run every stage (data, clip, lm, assemble, [dense], align, instruct, eval) and "
                                       "write a ready model")
    p.add_argument("name", choices=("shapes",), help="recipe: shapes (the bundled model's world)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--minutes-budget", type=float, default=59.0, help="whole-recipe time budget (default 59)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-scenes", type=int, default=150, help="held-out scenes (~16 questions each)")
    p.add_argument("--train-scenes", type=int, default=None, help="training scenes (default: scaled to the budget)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the recipe's)")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch side in pixels (default: the recipe's)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--dense-share", type=float, default=None,
                   help="share of the budget for the dense word alignment of the projector before stage 1 "
                        "(train/dense.py; default: the recipe's, 0 = none)")
    p.add_argument("--relation-thoughts", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 2's relation answers open with a thought: where the two objects are, then one "
                        "comparison (default: on)")
    p.add_argument("--document-thoughts", action=argparse.BooleanOptionalAction, default=None,
                   help="with --relation-thoughts: the LM's scene documents carry the thoughts too (default: off)")
    p.add_argument("--plain-first-share", type=float, default=None,
                   help="with --relation-thoughts: share of stage 2 trained on bare relation answers first "
                        "(default: the recipe's, 0.66)")
    p.add_argument("--stage-option", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one setting of one stage (clip, lm, dense, align, instruct), as that stage's own "
                        "command names it, e.g. clip.attribute_weight=3; repeatable")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_recipe)

    p = tsub.add_parser("merge", help="fold a LoRA adapter (PEFT format) into its base model")
    p.add_argument("base", help="base model")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder for the merged HF checkpoint")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.set_defaults(func=cmd_merge)


def config_from_args(args):
    from .lora import parse_targets
    from .trainer import TrainConfig
    extra = {}
    if args.stage == "instruct":
        extra = dict(lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     lora_targets=parse_targets(args.lora_targets), lr_lm=args.lr_lm, lr_lora=args.lr_lora,
                     merge=args.merge, freeze_projector=args.freeze_projector, train_vision=args.train_vision,
                     lr_vision=args.lr_vision)
        if args.merge and not args.lora:
            raise FovealError("--merge only applies with --lora (a full fine-tune already writes a whole model)")
    return TrainConfig(stage=args.stage, model=args.model, data=args.data, output_dir=args.output,
                       image_folder=args.image_folder, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, lr_projector=args.lr_projector,
                       weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                       max_grad_norm=args.max_grad_norm, precision=args.precision,
                       gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                       max_length=args.max_length,
                       group_by_length=args.group_by_length,
                       seed=args.seed, device=args.device, save_every=args.save_every,
                       keep_checkpoints=args.keep_checkpoints, resume=args.resume, stop_after=args.stop_after,
                       save_dtype=args.save_dtype, progress=not args.no_progress, max_minutes=args.max_minutes,
                       **extra)


def cmd_train(args) -> int:
    from .trainer import train
    result = train(config_from_args(args))
    if args.json and result.is_main:
        print(json.dumps({"output": str(result.output_dir), "finished": result.finished,
                          "steps": len(result.steps), "final_loss": result.losses[-1] if result.losses else None,
                          "examples_per_s": round(result.examples_per_s, 2),
                          "steps_per_s": round(result.steps_per_s, 3),
                          "model": str(result.model_dir) if result.model_dir else None,
                          "adapter": str(result.adapter_dir) if result.adapter_dir else None}))
    return 0


def cmd_merge(args) -> int:
    from .lora import merge_adapter
    out = merge_adapter(args.base, args.adapter, args.out, args.save_dtype)
    print(f"wrote {out}")
    return 0


def cmd_lm(args) -> int:
    from .lm import LMConfig, train_lm
    train_lm(LMConfig(corpus=args.corpus, output_dir=args.output, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                      intermediate_size=args.intermediate_size, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, seq_len=args.seq_len, batch_size=args.batch_size,
                      epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, precision=args.precision,
                      seed=args.seed, progress=not args.no_progress, minutes=args.minutes,
                      whole_documents=args.whole_documents))
    return 0


def cmd_clip(args) -> int:
    from .clip import ClipConfig, train_clip
    report = train_clip(ClipConfig(output_dir=args.output, image_size=args.image_size, patch_size=args.patch_size,
                                   vision_width=args.width, vision_layers=args.layers, vision_heads=args.heads,
                                   text_width=args.text_width, text_layers=args.text_layers,
                                   embed_dim=args.embed_dim, batch_size=args.batch_size, max_steps=args.max_steps,
                                   minutes=args.minutes, lr=args.lr, eval_size=args.eval_size,
                                   precision=args.precision, seed=args.seed, region_weight=args.region_weight,
                                   attribute_weight=args.attribute_weight, glyph_weight=args.glyph_weight,
                                   caption_weight=args.caption_weight, attribute_pooling=args.attribute_pooling,
                                   label_weight=args.label_weight, label_chars=not args.no_label_chars,
                                   label_cells=args.label_cells, label_relations=args.label_relations,
                                   progress=not args.no_progress))
    print(json.dumps(report["retrieval"]))
    return 0


def cmd_assemble(args) -> int:
    from .assemble import assemble, calibration_images_in
    calibration = calibration_images_in(args.calibrate) if args.calibrate else None
    out = assemble(args.vision, args.lm, args.output, vision_feature_layer=args.vision_feature_layer, seed=args.seed,
                   calibration_images=calibration)
    print(f"wrote {out}")
    return 0


def stage_options(options: list[str]) -> dict[str, dict]:
    """["clip.lr=3e-3", ...] -> {"clip": {"lr": 0.003}}; values are JSON where they parse, else strings.
    A stage or a setting the stage does not have is refused by name."""
    from dataclasses import fields

    from .clip import ClipConfig
    from .dense import DenseAlignConfig
    from .lm import LMConfig
    from .trainer import TrainConfig
    known = {"clip": ClipConfig, "lm": LMConfig, "dense": DenseAlignConfig, "align": TrainConfig,
             "instruct": TrainConfig}
    out: dict[str, dict] = {}
    for option in options:
        name, eq, raw = option.partition("=")
        stage, dot, key = name.partition(".")
        if not (eq and dot and key):
            raise ConfigError(f"--stage-option {option!r}: expected STAGE.KEY=VALUE, e.g. clip.lr=3e-3")
        if stage not in known:
            raise ConfigError(f"--stage-option {option!r}: unknown stage {stage!r}; choose from {', '.join(known)}")
        names = {f.name for f in fields(known[stage])} - {"output_dir", "model", "data", "stage", "corpus"}
        if key not in names:
            raise ConfigError(f"--stage-option {option!r}: the {stage} stage has no setting {key!r}; "
                              f"it has {', '.join(sorted(names))}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(stage, {})[key] = value
    return out


def cmd_recipe(args) -> int:
    from .recipe import RecipeConfig, run_recipe
    chosen = {k: v for k, v in (("image_size", args.image_size), ("patch_size", args.patch_size),
                                ("dense_share", args.dense_share),
                                ("plain_first_share", args.plain_first_share),
                                ("relation_thoughts", args.relation_thoughts),
                                ("document_thoughts", args.document_thoughts)) if v is not None}
    summary = run_recipe(RecipeConfig(output_dir=args.output, minutes=args.minutes_budget, seed=args.seed,
                                      eval_scenes=args.eval_scenes, train_scenes=args.train_scenes,
                                      save_dtype=args.save_dtype, progress=not args.no_progress,
                                      extra=stage_options(args.stage_option), **chosen))
    print(json.dumps({k: summary[k] for k in ("total_minutes", "model_bytes", "targets_met") if k in summary}))
    return 0
