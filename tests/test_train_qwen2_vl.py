"""foveal.train on a Qwen2-VL model, against transformers.

A tiny random Qwen2VLForConditionalGeneration (tests/tiny.py) and LLaVA-format records with images of
different sizes (so different `<|image_pad|>` runs and M-RoPE grids) and a text-only record. Checked:
the token ids are the HF processor's; foveal's loss on a right-padded batch equals transformers' with
labels = -100 outside the assistant tokens, and so do the gradients of the LM, the merger and the ViT;
`foveal train instruct` (full, and --lora) lowers the loss, and what it writes loads in foveal (and the
full model in transformers, with the same logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import foveal
from foveal.cli import main as cli_main
from foveal.models.families.qwen2_vl import family as qwen2_vl
from foveal.train import IGNORE_INDEX, ConversationDataset, load_adapter
from foveal.train.trainer import CausalLMLoss, configure_trainable, TrainConfig
from tiny import build_qwen2_vl, hf_qwen2_vl, hf_qwen2_vl_processor

SIZES = [(100, 60), (57, 140), (90, 90)]       # (width, height): 12, 10 and 9 image tokens


def _records(folder: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    for i, (w, h) in enumerate(SIZES):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    records = [
        {"id": "a", "image": "0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "And its size?"}, {"from": "gpt", "value": "Small."}]},
        {"id": "b", "image": "1.png", "conversations": [
            {"from": "human", "value": "Describe the picture.\n<image>"}, {"from": "gpt", "value": "Noise."}]},
        {"id": "c", "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there, friend."}]},
        {"id": "d", "image": "2.png", "conversations": [
            {"from": "human", "value": "<image>\nColours?"}, {"from": "gpt", "value": "Grey and blue."}]},
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = build_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl") / "model")
    data = _records(tmp_path_factory.mktemp("data"))
    return folder, data


def _hf_messages(record):
    out = []
    for turn in record["conversations"]:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[turn["from"]]
        text = turn["value"].replace("<image>", "").strip()
        content = ([{"type": "image"}] if "<image>" in turn["value"] else []) + [{"type": "text", "text": text}]
        out.append({"role": role, "content": content})
    return out


def test_ids_are_the_hf_processors_and_labels_the_answers(setup):
    folder, data = setup
    vlm = foveal.load(folder, dtype="float32")
    ds = ConversationDataset.from_file(data, vlm)
    processor = hf_qwen2_vl_processor(folder)
    records = json.loads(data.read_text())
    for record, example in zip(records, ds.examples):
        text = processor.apply_chat_template(_hf_messages(record), tokenize=False)
        images = [Image.open(data.parent / record["image"]).convert("RGB")] if "image" in record else None
        ref = processor(text=[text], images=images, return_tensors="pt")
        assert example.input_ids == ref["input_ids"][0].tolist(), record["id"]
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        labelled = vlm.tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)
        assert labelled == "".join(f"{a}<|im_end|>\n" for a in answers)
        assert example.positions.shape == (3, len(example.input_ids))


def _grads(model, name_of):
    return {name_of(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_match_transformers(setup):
    folder, data = setup
    vlm = foveal.load(folder, dtype="float32")
    model = vlm.model
    model.language_model.drop_cache()
    ds = ConversationDataset.from_file(data, vlm)
    batch = ds.collate([0, 1, 2], pad_id=vlm.config.text.pad_token_id)
    pixel_values, grid = batch["pixels"]
    assert grid.tolist() != [grid[0].tolist()] * len(grid)        # the images differ in size
    model.train().requires_grad_(True)
    n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = CausalLMLoss(model, True)(batch["input_ids"], batch["labels"], batch["image_mask"], batch["pixels"],
                                     positions=batch["positions"]) / n_labels
    loss.backward()
    ours = _grads(model, lambda n: qwen2_vl.hf_name(n, vlm.config))

    hf = hf_qwen2_vl(folder).train()
    lengths = [len(ds.examples[i].input_ids) for i in range(3)]
    attention = torch.tensor([[1] * n + [0] * (batch["input_ids"].shape[1] - n) for n in lengths])
    ids = batch["input_ids"]
    out = hf(input_ids=ids, attention_mask=attention, pixel_values=pixel_values, image_grid_thw=grid,
             mm_token_type_ids=(ids == vlm.config.image_token_id).int(), labels=batch["labels"])
    out.loss.backward()
    ref = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}

    loss_diff = abs(loss.item() - out.loss.item())
    assert loss_diff <= 1e-5, loss_diff
    assert set(ours) == set(ref)
    worst = {}
    for name, g in ours.items():
        group = "merger" if ".merger." in name else "tower" if ".visual." in name else "lm"
        rel = ((g - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)).item()
        worst[group] = max(worst.get(group, 0.0), rel)
    print(f"loss {loss.item():.6f} diff {loss_diff:.2e}; worst relative grad diff {worst}")
    assert set(worst) == {"lm", "merger", "tower"}
    assert all(v <= 1e-4 for v in worst.values()), worst


def test_padding_does_not_change_the_loss(setup):
    folder, data = setup
    vlm = foveal.load(folder, dtype="float32")
    vlm.model.language_model.drop_cache()
    ds = ConversationDataset.from_file(data, vlm)
    loss = CausalLMLoss(vlm.model, False)

    def of(ix):
        b = ds.collate(ix, pad_id=0)
        return loss(b["input_ids"], b["labels"], b["image_mask"], b["pixels"], positions=b["positions"])
    with torch.no_grad():
        together, apart = of([0, 1, 2, 3]), sum(of([i]) for i in range(4))
    assert abs(together.item() - apart.item()) < 1e-5 * apart.item()


def test_the_merger_is_the_projector(setup):
    folder, data = setup
    vlm = foveal.load(folder, dtype="float32")
    groups = configure_trainable(vlm.model, TrainConfig(stage="align", model=str(folder), data=str(data),
                                                        output_dir="unused"))
    assert set(groups) == {"projector"}
    assert {n.split(".")[1] for n, _ in groups["projector"]} == {"merger"}
    groups = configure_trainable(foveal.load(folder, dtype="float32").model,
                                 TrainConfig(stage="instruct", model=str(folder), data=str(data), output_dir="unused",
                                             train_vision=True))
    assert set(groups) == {"projector", "lm", "vision"}
    assert all(n.startswith("visual.") and ".merger." not in n for n, _ in groups["vision"])


def _ask(data):
    return [{"role": "user", "content": [{"type": "image", "image": str(data.parent / "1.png")},
                                         {"type": "text", "text": "Describe the picture."}]}]


def test_cli_instruct_lowers_the_loss_and_writes_a_model_transformers_reads(setup, tmp_path, capsys):
    folder, data = setup
    out = tmp_path / "full"
    assert cli_main(["train", "instruct", str(folder), str(data), "-o", str(out), "--batch-size", "2",
                     "--max-steps", "6", "--lr-lm", "3e-3", "--lr-projector", "3e-3", "--precision", "fp32",
                     "--warmup-ratio", "0", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and summary["final_loss"] < 0.7 * log[0]["loss"]
    ours = foveal.load(out, dtype="float32")
    ids, logits = ours.prompt_logits(_ask(data))
    _, before = foveal.load(folder, dtype="float32").prompt_logits(_ask(data))
    assert (logits - before).abs().max().item() > 1e-3               # it trained
    hf = hf_qwen2_vl(out)
    processor = hf_qwen2_vl_processor(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(data.parent / "1.png").convert("RGB")], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4


def test_cli_instruct_lora_trains_adapters_and_the_merger(setup, tmp_path):
    folder, data = setup
    out = tmp_path / "adapter"
    assert cli_main(["train", "instruct", str(folder), str(data), "-o", str(out), "--lora", "--lora-r", "4",
                     "--lr-lora", "1e-2", "--lr-projector", "3e-3", "--batch-size", "2", "--max-steps", "6",
                     "--precision", "fp32", "--warmup-ratio", "0", "--no-progress", "--merge"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["merger"]
    assert config["auto_mapping"]["base_model_class"] == "Qwen2VLForConditionalGeneration"
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.visual.merger.mlp.0.weight" in keys
    assert not any(".blocks." in k or "k_proj" in k for k in keys)
    with_adapter = foveal.load(folder, dtype="float32")
    load_adapter(with_adapter.model, out)
    _, got = with_adapter.prompt_logits(_ask(data))
    _, merged = foveal.load(out / "merged", dtype="float32").prompt_logits(_ask(data))
    _, base = foveal.load(folder, dtype="float32").prompt_logits(_ask(data))
    assert (got - merged).abs().max().item() < 1e-4
    assert (got - base).abs().max().item() > 1e-3
    assert cli_main(["train", "merge", str(folder), str(out), str(tmp_path / "merged")]) == 0
    _, merged_later = foveal.load(tmp_path / "merged", dtype="float32").prompt_logits(_ask(data))
    assert (merged_later - merged).abs().max().item() < 1e-5
    peft = pytest.importorskip("peft")
    hf = peft.PeftModel.from_pretrained(hf_qwen2_vl(folder), out).eval()
    processor = hf_qwen2_vl_processor(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(data.parent / "1.png").convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    assert (got - ref).abs().max().item() <= 1e-4           # PEFT reads the adapter and the merger as we do
