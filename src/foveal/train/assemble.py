"""`foveal train assemble`: a LLaVA checkpoint from a trained CLIP tower and a trained LM.

    foveal train assemble --vision CLIP_DIR --lm LM_DIR -o OUT

Design decisions:
- The tower comes from a `CLIPVisionModel` folder (what `foveal train clip` writes, or any
  CLIP/SigLIP vision checkpoint with `vision_model.*` names); the LM from a Llama-family
  `*ForCausalLM` folder (what `foveal train lm` writes), with its tokenizer. Key sets and shapes
  are checked: a missing or unexpected tensor is an error naming it, never a silent skip.
- The tokenizer must have an `<image>` token (`foveal train lm`'s tokenizer has it at id 4); its
  id becomes `image_token_index`, so prompts expand images by vocabulary id, as llava-hf does.
- The projector is a fresh `mlp2x_gelu` (LLaVA-1.5's), initialised like `nn.Linear`; stage 1
  (`foveal train align`) trains it. Given calibration images, its first layer is initialised to
  read *standardised* features (per-channel mean and std over the images' patch features are
  folded into its weight and bias) and its output is scaled to the norm of the LM's token
  embeddings. Why: a small tower's patch states are dominated by what every image shares
  (position, background), and unscaled they reach the LM as large, nearly constant vectors; measured
  on the shapes world, a from-scratch LM then never learnt to read them (the loss with shuffled
  images stayed equal to the loss with the right ones for 700 steps), while with this init it
  started to within ~150. The result is still a plain `mlp2x_gelu` that transformers loads. `vision_feature_layer` defaults to -1: a tower trained by
  `foveal train clip` pools its last layer's patch states, so those are its trained features
  (for a CLIP trained with class-token pooling, pass -2, LLaVA's choice).
- The chat template is the LM folder's own when it has one, else the bundled one; the image
  processor config is the tower's (so pixels are normalised as the tower was trained).
- The output is an HF LLaVA folder that `foveal.load` and transformers'
  `LlavaForConditionalGeneration` both read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ProjectorConfig, VLMConfig, config_from_hf, load_config_file, vision_config_from_hf
from ..errors import ConfigError


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no *.safetensors file")
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _strip(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                out[k[len(p):]] = t
                break
    return out


def _copy_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str,
               ignore: tuple[str, ...] = ()) -> None:
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("inv_freq") and ".kv_cache." not in k}
    given = {k: v for k, v in tensors.items() if not k.startswith(ignore)}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{what}: the checkpoint does not match the model; missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    for k, t in given.items():
        if own[k].shape != t.shape:
            raise ConfigError(f"{what}: tensor {k} has shape {tuple(t.shape)}, the config implies "
                              f"{tuple(own[k].shape)}")
    module.load_state_dict({k: t.float() for k, t in given.items()}, strict=False)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def calibration_images_in(folder: str | Path, limit: int = 256) -> list[Path]:
    """The first `limit` images (by name) of a folder, for `assemble(calibration_images=...)`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--calibrate {folder}: not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not images:
        raise ConfigError(f"--calibrate {folder}: no .png/.jpg/.webp images in it")
    return images


def calibrate_projector(model, pixels: torch.Tensor) -> dict:
    """Data-dependent projector init (see the module docstring): standardised inputs, output norm
    matched to the LM's token embeddings. pixels: (N, 3, H, W) preprocessed calibration images."""
    proj = model.multi_modal_projector
    with torch.no_grad():
        features = model.image_features(pixels.to(proj.linear_1.weight.dtype))
        flat = features.reshape(-1, features.shape[-1]).float()
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-4)
        proj.linear_1.weight.div_(std)
        proj.linear_1.bias.copy_(-(proj.linear_1.weight @ mean))
        proj.linear_2.bias.zero_()
        text_norm = model.language_model.embed_tokens.weight.norm(dim=-1).mean()
        image_norm = model.project(features).norm(dim=-1).mean()
        proj.linear_2.weight.mul_(text_norm / image_norm)
        after = model.project(features)
    return {"images": int(pixels.shape[0]), "feature_mean_abs": round(mean.abs().mean().item(), 4),
            "feature_std_mean": round(std.mean().item(), 4), "token_norm": round(text_norm.item(), 4),
            "image_token_norm": round(after.norm(dim=-1).mean().item(), 4)}


def assemble(vision_dir: str | Path, lm_dir: str | Path, out: str | Path, *, vision_feature_layer: int = -1,
             seed: int = 0, dtype: torch.dtype | None = None, calibration_images: list | None = None) -> Path:
    """calibration_images: image paths (or PIL images) for the projector's data-dependent init;
    None keeps `nn.Linear`'s init."""
    from tokenizers import Tokenizer

    from ..bundled import CHAT_TEMPLATE
    from ..models.vlm import VisionLanguageModel
    from ..weights.save import save_checkpoint
    vision_dir, lm_dir, out = Path(vision_dir), Path(lm_dir), Path(out)
    vision = vision_config_from_hf(load_config_file(vision_dir / "config.json"))
    lm_cfg = config_from_hf(load_config_file(lm_dir / "config.json"))
    if lm_cfg.layout != "text":
        raise ConfigError(f"{lm_dir} is not a text-only language model (found a {lm_cfg.layout} checkpoint)")
    if not (lm_dir / "tokenizer.json").exists():
        raise ConfigError(f"{lm_dir} has no tokenizer.json")
    tokenizer_json = (lm_dir / "tokenizer.json").read_text()
    image_id = Tokenizer.from_str(tokenizer_json).token_to_id("<image>")
    if image_id is None:
        raise ConfigError(f"the tokenizer in {lm_dir} has no <image> token; train the LM with "
                          f"`foveal train lm` (its tokenizer reserves <image>) or add the token")
    cfg = VLMConfig(text=lm_cfg.text, vision=vision,
                    projector=ProjectorConfig(kind="mlp2x_gelu", in_features=vision.hidden_size,
                                              out_features=lm_cfg.text.hidden_size, hidden_act="gelu"),
                    image_token_id=image_id, vision_feature_layer=vision_feature_layer,
                    vision_feature_select_strategy="default")
    if not -(vision.num_hidden_layers + 1) <= vision_feature_layer <= vision.num_hidden_layers:
        raise ConfigError(f"vision_feature_layer {vision_feature_layer} is outside the tower's "
                          f"{vision.num_hidden_layers + 1} hidden states")
    torch.manual_seed(seed)
    model = VisionLanguageModel(cfg)
    model.tie_weights()
    with torch.no_grad():
        for layer in (model.multi_modal_projector.linear_1, model.multi_modal_projector.linear_2):
            layer.reset_parameters()
    vt = _strip(_read_tensors(vision_dir), ("vision_tower.vision_model.", "vision_model."))
    # post_layernorm / pooling head are not part of LLaVA's features; layers past the feature layer
    # are not built (the loader reports them as unused too).
    n_built = len(model.vision_tower.encoder.layers)
    skip = ("post_layernorm.", "head.") + tuple(f"encoder.layers.{i}." for i in range(n_built, vision.num_hidden_layers))
    _copy_into(model.vision_tower, vt, f"vision tower {vision_dir}", ignore=skip)
    lm = _read_tensors(lm_dir)
    _copy_into(model.language_model, _strip(lm, ("model.",)), f"language model {lm_dir}")
    if not lm_cfg.text.tie_word_embeddings:
        if "lm_head.weight" not in lm:
            raise ConfigError(f"{lm_dir} has untied embeddings but no lm_head.weight")
        with torch.no_grad():
            model.lm_head.weight.copy_(lm["lm_head.weight"].float())
    model.language_model.init_rope()
    model.eval()
    proc_path = vision_dir / "preprocessor_config.json"
    if proc_path.exists():
        processor = json.loads(proc_path.read_text())
    else:
        from .clip import image_processor_config
        processor = image_processor_config(vision.image_size)
    if calibration_images:
        from ..processing.images import ImageProcessorConfig, load_image, preprocess_batch
        images = [load_image(p).image if isinstance(p, (str, Path)) else p for p in calibration_images]
        calibrate_projector(model, preprocess_batch(images, ImageProcessorConfig.from_hf(processor)))
    tok_cfg_path = lm_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    tok_cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "tokenizer_class": "PreTrainedTokenizerFast"} | tok_cfg | {"image_token": "<image>"}
    template_path = lm_dir / "chat_template.jinja"
    template = template_path.read_text() if template_path.exists() else tok_cfg.pop("chat_template", None)
    return save_checkpoint(model, cfg, out, tokenizer_json=tokenizer_json, tokenizer_config=tok_cfg,
                           chat_template=template or CHAT_TEMPLATE, image_processor=processor, dtype=dtype)
