"""foveal.train: the LLaVA stages on tiny models and real files.

What is checked: labels cover exactly the assistant tokens (+ EOS); align changes only the
projector; LoRA changes only adapters (+ projector), saves PEFT's format, and merging equals
base + adapter; a resumed run repeats an uninterrupted one; a tiny set is overfit; DDP with 2
processes equals one process with the same global batch; a model trained from a transformers
checkpoint answers the same in foveal and transformers; bad data fails with the record named.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import foveal
import tiny
from foveal.bundled import build_random_model
from foveal.cli import main as cli_main
from foveal.data import write_dataset
from foveal.errors import ConfigError, FovealError
from foveal.train import (IGNORE_INDEX, ConversationDataset, DatasetError, TrainConfig, load_adapter,
                          merge_lora, read_records, tokenize, train)

FAST = dict(progress=False, plot=False, precision="fp32", warmup_ratio=0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    files = write_dataset(out, n=16, seed=11, formats=("captions", "instruct"), turns=2)
    return out, files


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("bundled") / "model")


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    return tiny.build_llava(tmp_path_factory.mktemp("hf") / "model", layout="legacy")


def captions(world):
    return str(world[1]["captions"])


def instruct(world):
    return str(world[1]["instruct"])


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".kv_cache." not in k}


def lora_base_name(name):
    """A weight's name once its linear is wrapped by LoRA (LM q_proj / v_proj only)."""
    if name.startswith("language_model.") and (".q_proj." in name or ".v_proj." in name):
        return name.replace(".q_proj.", ".q_proj.base_layer.").replace(".v_proj.", ".v_proj.base_layer.")
    return name


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# ---- data --------------------------------------------------------------------------------
def test_labels_are_assistant_tokens_plus_eos(world, bundled):
    vlm = foveal.load(bundled, dtype="float32")
    record = read_records(Path(instruct(world)))[0]
    ex = tokenize(record, vlm.prompt, eos_id=2)
    answers = [m["content"][-1]["text"] for m in record.messages if m["role"] == "assistant"]
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    # every answer (the bundled template writes " answer " then </s>) and nothing else: the space after
    # "ASSISTANT:" is a target too, as the model has to write it (a lone space token in a small vocabulary)
    assert vlm.tokenizer.decode(labelled, skip_special_tokens=False) == "".join(f" {a} </s>" for a in answers)
    assert labelled.count(2) == len(answers)
    assert not any(lab != IGNORE_INDEX for lab, m in zip(ex.labels, ex.image_mask) if m)
    assert sum(ex.image_mask) == vlm.image_tokens_per_image
    # the user's question is in the input but never in the labels
    question = record.messages[0]["content"][-1]["text"]
    assert question in vlm.tokenizer.decode([t for t in ex.input_ids if t >= 0])


def test_bundled_template_renders_llava_15_text_with_the_answer_space_in_the_span(bundled):
    from transformers import AutoTokenizer
    vlm = foveal.load(bundled, dtype="float32")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the text."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "RP"}]},
                {"role": "user", "content": [{"type": "text", "text": "Count?"}]}]
    text = "Be brief. USER: <image>\nRead the text. ASSISTANT: RP </s>USER: Count? ASSISTANT:"
    assert AutoTokenizer.from_pretrained(bundled).apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True) == text
    built = vlm.prompt.build(messages[:3], n_images=1, add_generation_prompt=False, track_assistant=True)
    # the bundled tokenizer is byte-level: every character is a token of its own
    marked = [t for t, m in zip(built.input_ids, built.assistant_mask) if m]
    assert vlm.tokenizer.decode(marked, skip_special_tokens=False) == " RP "


def test_template_without_eos_gets_one_after_the_last_answer(world, hf_llava):
    vlm = foveal.load(hf_llava, dtype="float32")      # LLaVA-1.5's template: no </s> after answers
    eos = vlm.tokenizer.token_id("</s>")
    record = read_records(Path(instruct(world)))[0]
    ex = tokenize(record, vlm.prompt, eos_id=eos)
    assert ex.input_ids[-1] == eos and ex.labels[-1] == eos
    assert [t for t in ex.labels if t == eos] == [eos]


def test_collate_right_pads(world, bundled):
    vlm = foveal.load(bundled, dtype="float32")
    ds = ConversationDataset.from_file(instruct(world), vlm)
    lengths = [len(ds.examples[i].input_ids) for i in range(3)]
    batch = ds.collate([0, 1, 2], pad_id=3)
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["pixels"].shape == (3, 3, 64, 64)
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == 3).all()
        assert not batch["image_mask"][row, n:].any()


def test_padding_does_not_change_the_loss(world, bundled):
    """A right-padded batch gives each row the loss it has alone."""
    from foveal.train.trainer import CausalLMLoss
    vlm = foveal.load(bundled, dtype="float32")
    vlm.model.language_model.drop_cache()
    ds = ConversationDataset.from_file(instruct(world), vlm)
    loss = CausalLMLoss(vlm.model, False)
    with torch.no_grad():
        together = loss(*(ds.collate([0, 1])[k] for k in ("input_ids", "labels", "image_mask", "pixels")))
        apart = sum(loss(*(ds.collate([i])[k] for k in ("input_ids", "labels", "image_mask", "pixels")))
                    for i in (0, 1))
    assert abs(together.item() - apart.item()) < 1e-3 * apart.item()


# ---- what trains ---------------------------------------------------------------------------
def test_align_changes_only_the_projector(world, bundled, tmp_path):
    vlm = foveal.load(bundled, dtype="float32")
    before = state(vlm.model)
    result = train(TrainConfig(stage="align", model=str(bundled), data=captions(world), output_dir=str(tmp_path),
                               batch_size=4, max_steps=2, **FAST), vlm=vlm)
    diff = changed(before, state(vlm.model))
    assert diff and all(k.startswith("multi_modal_projector.") for k in diff)
    assert len(result.losses) == 2 and result.model_dir == tmp_path
    reloaded = foveal.load(tmp_path, dtype="float32")
    for k, v in state(reloaded.model).items():
        assert torch.equal(v, state(vlm.model)[k]), k


def test_instruct_lora_changes_only_adapters_saves_peft_and_merges(world, hf_llava, tmp_path):
    vlm = foveal.load(hf_llava, dtype="float32")
    before = state(vlm.model)
    out = tmp_path / "adapter"
    train(TrainConfig(stage="instruct", model=str(hf_llava), data=instruct(world), output_dir=str(out),
                      lora=True, lora_r=4, lr_lora=1e-2, batch_size=4, max_steps=3, **FAST), vlm=vlm)
    after = state(vlm.model)
    lora_keys = {k for k in after if ".lora_" in k}
    assert lora_keys
    base_diff = {k for k in before if not torch.equal(before[k], after[lora_base_name(k)])}
    assert base_diff and all(k.startswith("multi_modal_projector.") for k in base_diff)
    assert any(not torch.all(after[k] == 0) for k in lora_keys if "lora_B" in k)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    assert config["base_model_name_or_path"] == str(hf_llava)
    assert config["modules_to_save"] == ["multi_modal_projector"]
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in keys
    assert not any("vision_tower" in k or "k_proj" in k for k in keys)

    messages = [{"role": "user", "content": [{"type": "image", "image": str(Path(instruct(world)).parent /
                                                                           "images" / "000000.png")},
                                             {"type": "text", "text": "What colour is the circle?"}]}]
    with_adapter = foveal.load(hf_llava, dtype="float32")
    load_adapter(with_adapter.model, out)
    _, ref = with_adapter.prompt_logits(messages)
    merged_dir = tmp_path / "merged"
    assert cli_main(["train", "merge", str(hf_llava), str(out), str(merged_dir)]) == 0
    merged = foveal.load(merged_dir, dtype="float32")
    _, got = merged.prompt_logits(messages)
    _, base = foveal.load(hf_llava, dtype="float32").prompt_logits(messages)
    assert (got - ref).abs().max().item() < 1e-4
    assert (base - ref).abs().max().item() > 1e-3         # the adapter does something

    # merging the in-memory model gives the same weights as the merge command
    merge_lora(vlm.model)
    for k, v in state(merged.model).items():
        assert torch.allclose(v, state(vlm.model)[k], atol=1e-6), k


def test_peft_loads_our_adapter(world, hf_llava, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "adapter"
    vlm = foveal.load(hf_llava, dtype="float32")
    train(TrainConfig(stage="instruct", model=str(hf_llava), data=instruct(world), output_dir=str(out),
                      lora=True, lora_r=4, lr_lora=1e-2, batch_size=4, max_steps=2, merge=True, **FAST), vlm=vlm)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    hf = peft.PeftModel.from_pretrained(tiny.hf_model(hf_llava), out).eval()
    merged = tiny.hf_model(out / "merged")
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item() < 1e-4


def test_full_instruct_from_a_transformers_checkpoint_matches_transformers(world, hf_llava, tmp_path):
    out = tmp_path / "full"
    train(TrainConfig(stage="instruct", model=str(hf_llava), data=instruct(world), output_dir=str(out),
                      lr_lm=1e-3, lr_projector=1e-3, batch_size=4, max_steps=3, **FAST))
    ours = foveal.load(out, dtype="float32")
    base = foveal.load(hf_llava, dtype="float32")
    hf = tiny.hf_model(out)
    image = str(Path(instruct(world)).parent / "images" / "000003.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "How many shapes are there?"}]}]
    from foveal.processing.images import load_image, preprocess_batch
    from foveal.processing.prompt import normalize_messages
    template_messages, _ = normalize_messages(messages, ours.prompt.template)
    inputs = ours.prompt.build(template_messages, n_images=1)
    pixels = preprocess_batch([load_image(image).image], ours.image_config)
    ids = torch.tensor([inputs.input_ids])
    hf_messages = [{"role": "user", "content": [{"type": "image", "path": image},
                                                {"type": "text", "text": "How many shapes are there?"}]}]
    processed = tiny.hf_processor(out).apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True, return_tensors="pt")
    assert processed["input_ids"][0].tolist() == inputs.input_ids       # processor_config.json: the image expands
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                          max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = set(ours.engine.eos_ids)
    ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    got = ours.generate(messages, max_tokens=12).token_ids
    assert got == ref
    _, a = ours.prompt_logits(messages)
    _, b = base.prompt_logits(messages)
    assert (a - b).abs().max().item() > 1e-3


def test_loss_decreases_on_a_tiny_overfit_set(world, bundled, tmp_path):
    data = json.loads(Path(captions(world)).read_text())[:2]
    path = Path(captions(world)).parent / "overfit.json"
    path.write_text(json.dumps(data))
    result = train(TrainConfig(stage="instruct", model=str(bundled), data=str(path), output_dir=str(tmp_path),
                               batch_size=2, max_steps=15, lr_lm=3e-3, lr_projector=3e-3, warmup_ratio=0.0,
                               progress=False))
    assert result.losses[-1] < 0.4 * result.losses[0]
    assert all(b < a for a, b in zip(result.losses[:8], result.losses[1:9]))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 16))


def test_gradient_checkpointing_and_accumulation_keep_the_step(world, bundled, tmp_path):
    base = dict(stage="instruct", model=str(bundled), data=captions(world), max_steps=2, **FAST)
    plain = train(TrainConfig(output_dir=str(tmp_path / "a"), batch_size=4, **base))
    other = train(TrainConfig(output_dir=str(tmp_path / "b"), batch_size=2, grad_accum=2,
                              gradient_checkpointing=True, **base))
    assert plain.losses == pytest.approx(other.losses, abs=1e-5)


def test_compiled_training_step_takes_the_same_steps(world, bundled, tmp_path):
    """--compile: forward and backward through torch.compile give the eager run's losses (bf16 apart)."""
    base = dict(stage="instruct", model=str(bundled), data=captions(world), max_steps=3, batch_size=4,
                train_vision=True, **FAST)
    eager = train(TrainConfig(output_dir=str(tmp_path / "a"), **base))
    compiled = train(TrainConfig(output_dir=str(tmp_path / "b"), compile=True, **base))
    assert compiled.finished and compiled.losses == pytest.approx(eager.losses, rel=2e-2)
    assert json.loads((tmp_path / "b" / "train_config.json").read_text())["compile"] is True


def test_a_failing_compile_falls_back_to_eager(world, bundled, tmp_path, monkeypatch, capsys):
    """No C++ compiler for Inductor (or any compile error): one message naming it, then the same steps eagerly."""
    def broken(module, **_):
        def fail(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return fail
    base = dict(stage="instruct", model=str(bundled), data=captions(world), max_steps=2, batch_size=4, **FAST)
    eager = train(TrainConfig(output_dir=str(tmp_path / "a"), **base))
    monkeypatch.setattr(torch, "compile", broken)
    fallback = train(TrainConfig(output_dir=str(tmp_path / "b"), compile=True, **base))
    err = capsys.readouterr().err
    assert err.count("torch.compile of the training step failed") == 1 and "InvalidCxxCompiler" in err
    assert fallback.losses == pytest.approx(eager.losses, abs=1e-6)
    with pytest.raises(ConfigError, match="compile must be true or false"):
        TrainConfig(stage="align", model="m", data="d", output_dir="o", compile="yes")


def test_group_by_length_pads_less_and_keeps_every_example_once(world, bundled, tmp_path):
    from foveal.train import Trainer
    common = dict(stage="align", model=str(bundled), data=instruct(world), output_dir=str(tmp_path),
                  batch_size=2, epochs=2, **FAST)
    plain, grouped = Trainer(TrainConfig(**common)), Trainer(TrainConfig(group_by_length=True, **common))
    lengths = [len(e.input_ids) for e in plain.dataset.examples]
    assert len(set(lengths)) > 2                       # the fixture's conversations differ in length

    def padded(trainer, epoch):
        steps = range(epoch * trainer.steps_per_epoch, (epoch + 1) * trainer.steps_per_epoch)
        batches = [b for s in steps for b in trainer.batch_indices(s)]
        return batches, sum(len(b) * max(lengths[i] for i in b) for b in batches)

    for epoch in (0, 1):
        batches, cost = padded(grouped, epoch)
        flat = sorted(i for b in batches for i in b)
        assert flat == sorted(set(flat)) and len(flat) == grouped.steps_per_epoch * 2     # each example once
        assert cost <= padded(plain, epoch)[1]
        assert cost == 2 * sum(sorted(lengths[i] for i in flat)[1::2])   # pairs of neighbours in length order
    assert padded(grouped, 0)[0] != padded(grouped, 1)[0]                               # a new order each epoch
    again = Trainer(TrainConfig(group_by_length=True, **common))
    assert padded(again, 0)[0] == padded(grouped, 0)[0]                                 # and a seeded one


# ---- resume ---------------------------------------------------------------------------------
def test_resume_continues_the_same_loss_curve(world, bundled, tmp_path):
    common = dict(stage="instruct", model=str(bundled), data=captions(world), lora=True, lora_dropout=0.1,
                  lr_lora=5e-3, batch_size=2, max_steps=6, warmup_ratio=0.2, progress=False, plot=False,
                  precision="fp32")
    whole = train(TrainConfig(output_dir=str(tmp_path / "whole"), **common))
    first = train(TrainConfig(output_dir=str(tmp_path / "split"), stop_after=3, **common))
    assert not first.finished and (tmp_path / "split/checkpoints/step-000003/state.json").exists()
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in (tmp_path / "split").rglob("*"))
    second = train(TrainConfig(output_dir=str(tmp_path / "split"), resume="auto", **common))
    assert second.finished and second.steps == list(range(1, 7))
    assert max(abs(a - b) for a, b in zip(whole.losses, second.losses)) < 1e-6
    a = load_file(tmp_path / "whole/adapter_model.safetensors")
    b = load_file(tmp_path / "split/adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_checkpoint_of_another_run(world, bundled, tmp_path):
    common = dict(stage="align", model=str(bundled), data=captions(world), output_dir=str(tmp_path), **FAST)
    train(TrainConfig(batch_size=2, max_steps=4, stop_after=1, **common))
    with pytest.raises(ConfigError, match="different run"):
        train(TrainConfig(batch_size=4, max_steps=4, resume="auto", **common))


# ---- distributed ----------------------------------------------------------------------------
DDP_SCRIPT = """
import json, os, sys
import torch
from safetensors.torch import save_file
from foveal.train import TrainConfig, Trainer
cfg = TrainConfig(**json.loads(sys.argv[1]))
trainer = Trainer(cfg)
result = trainer.train()
rank = trainer.dist.rank
save_file({k: v.detach().contiguous() for k, v in trainer.trainable_state().items()},
          os.path.join(sys.argv[2], f"rank{rank}.safetensors"))
json.dump(result.losses, open(os.path.join(sys.argv[2], f"losses{rank}.json"), "w"))
"""


@pytest.mark.slow        # ~10-20 s: two torchrun workers plus a reference run
def test_ddp_two_processes_equal_one_process(world, bundled, tmp_path):
    common = dict(stage="instruct", model=str(bundled), data=captions(world), max_steps=3, lr_lm=1e-3,
                  lr_projector=1e-3, **FAST)
    single = tmp_path / "single"
    single.mkdir()
    subprocess.run([sys.executable, "-c", DDP_SCRIPT, json.dumps(dict(common, output_dir=str(single / "o"),
                                                                      batch_size=4)), str(single)], check=True)
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), str(script),
                           json.dumps(dict(common, output_dir=str(ddp / "o"), batch_size=2)), str(ddp)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(ddp / "rank0.safetensors"), load_file(ddp / "rank1.safetensors")
    one = load_file(single / "rank0.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    assert max((r0[k] - one[k]).abs().max().item() for k in r0) < 1e-5
    l0, l1 = (json.loads((ddp / f"losses{r}.json").read_text()) for r in (0, 1))
    ls = json.loads((single / "losses0.json").read_text())
    assert l0 == l1
    assert max(abs(a - b) for a, b in zip(l0, ls)) < 1e-5
    assert (ddp / "o" / "model.safetensors").exists()


# ---- bad input -------------------------------------------------------------------------------
def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


def test_bad_data_is_refused_with_the_record_named(world, tmp_path):
    images = Path(captions(world)).parent
    good = {"id": "ok", "image": "images/000000.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]}
    cases = {
        "does not exist": [good, dict(good, id="rec-7", image="images/nope.png")],
        "no <image> marker": [dict(good, id="rec-8", conversations=[{"from": "human", "value": "What?"},
                                                                  {"from": "gpt", "value": "A."}])],
        "1 <image> marker\\(s\\) but 0 image": [{"id": "rec-9", "conversations": good["conversations"]}],
        "unknown speaker 'robot'": [dict(good, id="rec-10", conversations=[{"from": "robot", "value": "hi"}])],
        "no gpt turn": [dict(good, id="rec-11", conversations=good["conversations"][:1])],
        "no 'conversations'": [{"id": "rec-12", "image": "images/000000.png"}],
    }
    for message, records in cases.items():
        with pytest.raises(DatasetError, match=message) as err:
            read_records(_write(tmp_path, records), images)
        assert "rec-" in str(err.value)
    with pytest.raises(DatasetError, match="not valid JSON \\(line 1"):
        read_records(_write(tmp_path, '[{"id": "x",'), images)
    with pytest.raises(DatasetError, match="JSON list"):
        read_records(_write(tmp_path, '{"id": "x"}'), images)
    with pytest.raises(DatasetError, match="does not exist"):
        read_records(tmp_path / "missing.json")


def test_unreadable_image_names_the_record(bundled, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    path = _write(tmp_path, [{"id": "broken-1", "image": "bad.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]}])
    vlm = foveal.load(bundled, dtype="float32")
    ds = ConversationDataset.from_file(path, vlm)
    with pytest.raises(DatasetError, match="broken-1"):
        ds.collate([0])


def test_bad_options_are_refused(world, bundled, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown training stage 'pretrain'"):
        TrainConfig(stage="pretrain", model="m", data="d", output_dir="o")
    with pytest.raises(ConfigError, match="align' trains only the projector"):
        TrainConfig(stage="align", model="m", data="d", output_dir="o", lora=True)
    with pytest.raises(ConfigError, match="batch-size"):
        TrainConfig(stage="align", model="m", data="d", output_dir="o", batch_size=0)
    with pytest.raises(ConfigError, match="not language-model linears"):
        train(TrainConfig(stage="instruct", model=str(bundled), data=captions(world), output_dir=str(tmp_path),
                          lora=True, lora_targets=("qkv",), **FAST))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train(TrainConfig(stage="align", model=str(bundled), data=captions(world), output_dir=str(tmp_path),
                          batch_size=64, **FAST))
    assert cli_main(["train", "instruct", str(bundled), captions(world), "-o", str(tmp_path), "--merge"]) == 1
    assert "--merge only applies with --lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "pretrain", str(bundled), captions(world), "-o", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli_main(["train", "align", str(bundled), captions(world), "-o", str(tmp_path), "--lora"])
    with pytest.raises(FovealError, match="not a LoRA adapter folder"):
        load_adapter(foveal.load(bundled).model, tmp_path)


def test_cli_align_writes_model_log_and_plot(world, bundled, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "align", str(bundled), captions(world), "-o", str(out), "--max-steps", "2",
                     "--batch-size", "4", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["finished"] and summary["steps"] == 2 and summary["model"] == str(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "preprocessor_config.json", "loss.png", "train_log.jsonl", "train_config.json"):
        assert (out / name).exists(), name
    assert foveal.load(out).generate("hello", max_tokens=2).token_ids is not None


def test_loss_plot_without_matplotlib(tmp_path, monkeypatch):
    from foveal.train.plot import plot_losses
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib -> ImportError
    path = plot_losses([1, 2, 3, 4], [3.0, 2.5, 2.7, 1.0], tmp_path / "loss.png")
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (700, 400) and len(im.getcolors(maxcolors=100_000)) > 3


def test_train_lm_pretrains_a_text_model_that_transformers_reads(tmp_path):
    from transformers import LlamaForCausalLM
    from foveal.data import text_corpus
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text_corpus(40, seed=2)))
    out = tmp_path / "lm"
    assert cli_main(["train", "lm", str(corpus), "-o", str(out), "--max-steps", "12", "--seq-len", "64",
                     "--batch-size", "8", "--vocab-size", "320", "--layers", "2", "--precision", "fp32",
                     "--no-progress"]) == 0
    log = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and log[-1] < log[0]
    ours = foveal.load(out, dtype="float32")
    assert ours.config.layout == "text" and ours.tokenizer.token_id("<image>") == 4
    ids = ours.tokenizer.encode("How many red shapes")
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(ids):]
    seq = list(ids)
    for _ in range(8):      # greedy, recomputing the whole prompt each time
        seq.append(ours.engine.prompt_logits(seq, [False] * len(seq), None)[-1].argmax().item())
    assert seq[len(ids):] == ref.tolist()
    (tmp_path / "empty.txt").write_text("\n\n")
    assert cli_main(["train", "lm", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "x")]) == 1


def test_template_without_generation_blocks_labels_each_assistant_turn(world, tmp_path):
    folder = tiny.build_llava(tmp_path / "qwen", text="qwen2", layout="legacy")     # ChatML, no {% generation %}
    vlm = foveal.load(folder, dtype="float32")
    record = read_records(Path(instruct(world)))[0]
    ex = tokenize(record, vlm.prompt, eos_id=vlm.tokenizer.token_id("<|im_end|>"))
    answers = [m["content"][-1]["text"] for m in record.messages if m["role"] == "assistant"]
    labelled = vlm.tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert labelled == "".join(f"{a}<|im_end|>\n" for a in answers)     # the answer, its end, the newline


def test_train_lm_reads_scene_documents_as_whole_blocks(tmp_path):
    from foveal.train.lm import pack, read_corpus, train_tokenizer
    written = write_dataset(tmp_path / "data", 12, seed=3, formats=("documents",))
    docs = read_corpus(written["documents"])
    assert len(docs) == 12 and all(len(d.splitlines()) > 5 for d in docs)      # newlines kept inside a document
    tokenizer = train_tokenizer(docs, 400)
    blocks = pack(docs, tokenizer, 640, whole_documents=True)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer)
    lengths = [len(e.ids) + 1 for e in tok.encode_batch(docs)]                # + </s>
    assert all(n <= 641 for n in lengths) and len(blocks) < len(docs)       # some blocks hold two
    kept = []
    for block in blocks.tolist():
        assert block[0] == tok.token_to_id("<s>")                               # a block starts at a document
        body = [t for t in block if t != IGNORE_INDEX]
        assert block[len(body):] == [IGNORE_INDEX] * (len(block) - len(body))          # padding only at the end
        kept.append(tok.decode(body, skip_special_tokens=False))
    text = "".join(kept)
    assert all(text.count(d) == 1 for d in docs)                              # each document whole, once
    cut = pack(docs, tokenizer, 64, whole_documents=True)                     # longer than a block: cut
    assert len(cut) == len(docs) and (cut != IGNORE_INDEX).all() and (cut[:, 0] == tok.token_to_id("<s>")).all()
    out = tmp_path / "lm"
    assert cli_main(["train", "lm", str(written["documents"]), "-o", str(out), "--max-steps", "6", "--seq-len", "320",
                     "--whole-documents", "--batch-size", "4", "--vocab-size", "400", "--layers", "1",
                     "--precision", "fp32", "--no-progress"]) == 0
    log = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(math.isfinite(x) for x in log) and log[-1] < log[0]


def test_lm_tokenizer_makes_thinking_tags_single_tokens_that_decoding_keeps(tmp_path):
    from tokenizers import Tokenizer

    from foveal.engine.thinking import split_thinking
    from foveal.processing.prompt import Tokenizer as FovealTokenizer
    from foveal.train.lm import SPECIAL_TOKENS, read_corpus, train_tokenizer
    plain = read_corpus(write_dataset(tmp_path / "plain", 30, seed=3, formats=("documents",))["documents"])
    docs = read_corpus(write_dataset(tmp_path / "rel", 30, seed=3, formats=("documents",),
                                     relation_thoughts=True)["documents"])
    without, with_tags = (Tokenizer.from_str(train_tokenizer(d, 400)) for d in (plain, docs))
    assert without.token_to_id("<think>") is None and without.get_vocab_size() == 400
    assert [with_tags.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]    # the layout stays
    assert {with_tags.token_to_id("<think>"), with_tags.token_to_id("</think>")} == {400, 401}
    line = next(x for d in docs for x in d.splitlines() if "<think>" in x)
    ids = with_tags.encode(line).ids
    assert ids.count(400) == ids.count(401) == 1                               # one token a tag
    # foveal decodes skipping special tokens; the tags are not special, so the thought can be split off
    text = FovealTokenizer(with_tags).decode(ids[ids.index(400):])
    thought, answer = split_thinking(text)
    assert thought.startswith("the ") and " is " in thought and answer in ("yes", "no")
    # The tag takes the space the chat template puts after "ASSISTANT:": one token, not two.
    turn = with_tags.encode("USER: Is the circle left of the square? ASSISTANT: <think>the circle")
    assert turn.tokens[turn.ids.index(400) - 1] == ":"
    assert with_tags.decode(with_tags.encode(" <think>a</think>no").ids) == "<think>a</think>no"


@pytest.mark.parametrize("content, problem", [
    (b'{"text": "a red circle"}\nnot json\n', "line 2 is not JSON"),
    (b'{"text": "a red circle"}\n{"body": "x"}\n', 'line 2: expected an object with a "text" string'),
    (b'["a red circle"]\n', 'line 1: expected an object with a "text" string'),
    (b'{"text": "  "}\n\n', "has no text"),
    (b'\xff\xfe{"text": 1}', "is not UTF-8"),
])
def test_a_bad_jsonl_corpus_is_refused_by_line(tmp_path, content, problem, capsys):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(content)
    assert cli_main(["train", "lm", str(path), "-o", str(tmp_path / "lm"), "--max-steps", "1"]) == 1
    assert problem in capsys.readouterr().err and not (tmp_path / "lm").exists()
