"""One engine's measurements, run in a fresh process so that its peak RSS is its own.

    python benchmarks/engines.py '{"engine": "foveal", "variant": "bf16", "folder": ..., ...}'

prints one JSON line: per-repeat figures (the caller takes medians) and the process's peak RSS.

Every engine answers the same request: one PNG image + a 32-token question (576 image tokens on
CLIP-L/336; on Qwen2.5-VL the count follows the image's size and the pixel budget: 1230 for the
1280x960 image), greedy, end of sequence ignored so that decode always runs `decode_tokens` tokens.
Each run also reports the image tokens the engine gave the image.
- time to first token = wall time of a request with max_tokens=1, from the image file to the
  first sampled token (decode, preprocess, encode, prefill);
- decode tokens/s = (N - 1) / (wall(N tokens) - wall(1 token)) for transformers and llama.cpp;
  foveal reports the same quantity in its own stats (decode loop only);
- prefill tokens/s = prompt tokens / prefill time of the LM alone (image embeddings given).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from foveal.plan import peak_rss   # this process's own peak (VmHWM)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import QUESTION, is_qwen_vl, messages, prompt_ids  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- foveal -------------------------------------------------------------------------------------
def run_foveal(job: dict) -> dict:
    import foveal
    variant, device = job["variant"], job["device"]
    mode, _, compiled = variant.partition("-")
    vlm = foveal.load(job["folder"], device=device, dtype="bfloat16", quant=None if mode == "bf16" else mode,
                      compile=compiled == "compiled")
    vlm.engine.eos_ids = set()                     # always decode the full count
    msgs, n = messages(job["image"]), job["decode_tokens"]
    runs = []
    for i in range(job["warmup"] + job["repeats"]):
        vlm.unload()                               # no embedding cache, no prefix reuse between runs
        t0 = time.perf_counter()
        vlm.generate(msgs, max_tokens=1)
        _sync(device)
        ttft = time.perf_counter() - t0
        vlm.unload()
        s = vlm.generate(msgs, max_tokens=n).stats
        if i >= job["warmup"]:
            runs.append({"preprocess_ms": s.preprocess_s * 1e3, "encode_ms": s.encode_s * 1e3 / max(s.images, 1),
                         "prefill_tps": s.prefill_tokens_per_s, "ttft_ms": ttft * 1e3,
                         "decode_tps": s.decode_tokens_per_s, "prompt_tokens": s.prompt_tokens,
                         "image_tokens": s.image_tokens // max(s.images, 1), "generated": s.generated_tokens})
    notes = []
    if device.startswith("cuda"):
        notes.append("foveal's stage timers do not synchronize the GPU: its prefill figure on CUDA is optimistic")
    return {"runs": runs, "notes": notes}


# ---- transformers -------------------------------------------------------------------------------
def run_transformers(job: dict) -> dict:
    if is_qwen_vl(Path(job["folder"])):
        return run_transformers_qwen_vl(job)
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration
    device = job["device"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[job["variant"]]
    model = LlavaForConditionalGeneration.from_pretrained(job["folder"], dtype=dtype).eval().to(device)
    processor = CLIPImageProcessor.from_pretrained(job["folder"])
    ids, n_image = prompt_ids(Path(job["folder"]), job["image"])
    input_ids = torch.tensor([ids], device=device)
    cfg, n = model.config, job["decode_tokens"]
    gen = dict(do_sample=False, pad_token_id=cfg.text_config.pad_token_id or 0)

    def pixels():
        image = Image.open(job["image"]).convert("RGB")
        return processor(images=image, return_tensors="pt")["pixel_values"].to(device, dtype)

    runs = []
    with torch.inference_mode():
        for i in range(job["warmup"] + job["repeats"]):
            t0 = time.perf_counter()
            pv = pixels()
            t1 = time.perf_counter()
            feats = model.get_image_features(pixel_values=pv, vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            feats = torch.cat(list(feats.pooler_output))
            _sync(device)
            t2 = time.perf_counter()
            embeds = model.get_input_embeddings()(input_ids)
            mask = (input_ids == cfg.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
            _sync(device)
            t3 = time.perf_counter()
            model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            _sync(device)
            t4 = time.perf_counter()
            model.generate(input_ids=input_ids, pixel_values=pixels(), max_new_tokens=1, **gen)
            _sync(device)
            t5 = time.perf_counter()
            out = model.generate(input_ids=input_ids, pixel_values=pixels(), max_new_tokens=n, min_new_tokens=n, **gen)
            _sync(device)
            t6 = time.perf_counter()
            if i >= job["warmup"]:
                generated = out.shape[1] - input_ids.shape[1]
                runs.append({"preprocess_ms": (t1 - t0) * 1e3, "encode_ms": (t2 - t1) * 1e3,
                             "prefill_tps": len(ids) / (t4 - t3), "ttft_ms": (t5 - t4) * 1e3,
                             "decode_tps": (generated - 1) / max((t6 - t5) - (t5 - t4), 1e-9),
                             "prompt_tokens": len(ids), "image_tokens": n_image, "generated": generated})
    return {"runs": runs, "notes": []}


def hf_qwen_vl_pixels(image_processor, image_path) -> dict:
    """Image decode + Qwen2VLImageProcessorPil: pixel_values, image_grid_thw."""
    from PIL import Image
    return dict(image_processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt"))


def hf_qwen_vl_ids(tokenizer, n_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt as Qwen2VLProcessor builds it: the chat template rendered by the tokenizer, its one
    `<|image_pad|>` repeated n_image times, tokenized; and mm_token_type_ids (1 at image tokens)."""
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_image, 1)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return input_ids, (input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()


def hf_qwen_vl_pieces(folder: Path) -> tuple:
    """transformers' own pieces for a Qwen2.5-VL folder (what Qwen2VLProcessor holds, without its video
    half, which needs torchvision): (model class, Qwen2VLImageProcessorPil, tokenizer)."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    return (Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil.from_pretrained(folder),
            PreTrainedTokenizerFast.from_pretrained(folder))


def run_transformers_qwen_vl(job: dict) -> dict:
    device, folder = job["device"], Path(job["folder"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[job["variant"]]
    model_class, image_processor, tokenizer = hf_qwen_vl_pieces(folder)
    model = model_class.from_pretrained(folder, dtype=dtype).eval().to(device)
    cfg, n = model.config, job["decode_tokens"]
    gen = dict(do_sample=False, pad_token_id=cfg.text_config.pad_token_id or 0)
    merge = image_processor.merge_size ** 2

    def inputs():
        px = hf_qwen_vl_pixels(image_processor, job["image"])
        n_image = int(px["image_grid_thw"].prod()) // merge
        input_ids, mm = hf_qwen_vl_ids(tokenizer, n_image)
        return {"input_ids": input_ids.to(device), "mm_token_type_ids": mm.to(device),
                "pixel_values": px["pixel_values"].to(device), "image_grid_thw": px["image_grid_thw"].to(device)}

    runs = []
    with torch.inference_mode():
        for i in range(job["warmup"] + job["repeats"]):
            t0 = time.perf_counter()
            px = hf_qwen_vl_pixels(image_processor, job["image"])
            pv, grid = px["pixel_values"].to(device, dtype), px["image_grid_thw"].to(device)
            t1 = time.perf_counter()
            feats = model.get_image_features(pixel_values=pv, image_grid_thw=grid)
            feats = torch.cat(list(feats.pooler_output))
            _sync(device)
            t2 = time.perf_counter()
            n_image = int(grid.prod()) // merge
            input_ids, mm = (t.to(device) for t in hf_qwen_vl_ids(tokenizer, n_image))
            embeds = model.get_input_embeddings()(input_ids)
            mask = (input_ids == cfg.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
            positions, _ = model.model.get_rope_index(input_ids, mm, image_grid_thw=grid)
            _sync(device)
            t3 = time.perf_counter()
            model(inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1)
            _sync(device)
            t4 = time.perf_counter()
            model.model.rope_deltas = None
            model.generate(**inputs(), max_new_tokens=1, **gen)
            _sync(device)
            t5 = time.perf_counter()
            model.model.rope_deltas = None
            out = model.generate(**inputs(), max_new_tokens=n, min_new_tokens=n, **gen)
            _sync(device)
            t6 = time.perf_counter()
            if i >= job["warmup"]:
                generated = out.shape[1] - input_ids.shape[1]
                runs.append({"preprocess_ms": (t1 - t0) * 1e3, "encode_ms": (t2 - t1) * 1e3,
                             "prefill_tps": input_ids.shape[1] / (t4 - t3), "ttft_ms": (t5 - t4) * 1e3,
                             "decode_tps": (generated - 1) / max((t6 - t5) - (t5 - t4), 1e-9),
                             "prompt_tokens": input_ids.shape[1], "image_tokens": n_image, "generated": generated})
    return {"runs": runs, "notes": ["transformers Qwen2.5-VL: inputs from Qwen2VLImageProcessorPil and the "
                                    "tokenizer's chat template (the full AutoProcessor needs torchvision)"]}


# ---- llama.cpp (llama-cpp-python) -----------------------------------------------------------------
def run_llama_cpp(job: dict) -> dict:
    import base64
    import llama_cpp
    model_path, mmproj = job["gguf"], job["mmproj"]
    ids, n_image = prompt_ids(Path(job["folder"]), job["image"])
    n, threads = job["decode_tokens"], job["threads"]
    gpu_layers = -1 if job["device"].startswith("cuda") else 0
    qwen = is_qwen_vl(Path(job["folder"]))
    handler_name = "Qwen25VLChatHandler" if qwen else "Llava15ChatHandler"
    handler, notes = None, []
    try:
        from llama_cpp import llama_chat_format
        handler = getattr(llama_chat_format, handler_name)(clip_model_path=str(mmproj), verbose=False)
    except Exception as e:       # noqa: BLE001 - any failure: text-only fallback, said in the notes
        if qwen:                 # a Qwen prompt without its image is not the request: no row at all
            raise RuntimeError(f"llama-cpp-python's {handler_name} is unavailable ({type(e).__name__}: {e})") from e
        notes.append(f"llama.cpp image path unavailable ({handler_name}: {type(e).__name__}: {e}); prefill and "
                     f"TTFT are a text-only prompt of the same {len(ids)} tokens, no encode figure")
    # room for the image as llama.cpp counts it: Qwen2.5-VL's mmproj takes up to 4096 tokens by its own budget
    room = 4096 if qwen else 256
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=len(ids) + n + room, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=gpu_layers, chat_handler=handler, verbose=False)
    eos = llm.token_eos()

    def no_eos(_ids, scores):
        scores[eos] = -float("inf")
        return scores

    # text tokens the model can hold: the image slots become ordinary ids for the text-only prefill
    image_id = job.get("image_token_id", 4)
    tokens = [t if t != image_id else 5 for t in ids]
    uri = "data:image/png;base64," + base64.b64encode(Path(job["image"]).read_bytes()).decode()
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": QUESTION}]}]
    runs = []
    for i in range(job["warmup"] + job["repeats"]):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        t1 = time.perf_counter()
        llm.reset()
        t2 = time.perf_counter()
        llm.create_completion(tokens, max_tokens=1, temperature=0.0)
        t3 = time.perf_counter()
        llm.reset()
        out = llm.create_completion(tokens, max_tokens=n, temperature=0.0,
                                    logits_processor=llama_cpp.LogitsProcessorList([no_eos]))
        t4 = time.perf_counter()
        ttft, encode, image_prompt = (t3 - t2), None, None
        if handler is not None:
            llm.reset()
            t5 = time.perf_counter()
            answer = llm.create_chat_completion(chat, max_tokens=1, temperature=0.0)
            ttft = time.perf_counter() - t5
            image_prompt = answer.get("usage", {}).get("prompt_tokens")
            encode = max(ttft - (t3 - t2), 0.0)          # image + same-length text minus the text alone
        if i >= job["warmup"]:
            generated = out["usage"]["completion_tokens"]
            runs.append({"preprocess_ms": None, "encode_ms": None if encode is None else encode * 1e3,
                         "prefill_tps": len(tokens) / (t1 - t0), "ttft_ms": ttft * 1e3,
                         "decode_tps": (generated - 1) / max((t4 - t3) - (t3 - t2), 1e-9),
                         "prompt_tokens": len(tokens), "image_tokens": None if qwen else n_image,
                         "image_prompt_tokens": image_prompt, "generated": generated})
    if handler is not None:
        notes.append(f"llama.cpp: image through {handler_name} (its own chat template); encode ms = its "
                     "image TTFT minus the TTFT of the same-length text prompt; preprocessing is inside it")
    if handler is not None and qwen:
        reported = runs[0]["image_prompt_tokens"] if runs else None
        notes.append(f"llama.cpp Qwen2.5-VL: the image is resized by llama.cpp's own budget (8-4096 tokens, not "
                     f"HF's pixel budget), so its image-token count is its own; its image prompt was {reported} "
                     f"tokens by llama-cpp-python's usage; its encode figure (image TTFT minus the TTFT of "
                     f"the same {len(tokens)} text ids the other engines get) so also holds the prefill of the "
                     f"tokens its count differs by")
    return {"runs": runs, "notes": notes}


RUNNERS = {"foveal": run_foveal, "transformers": run_transformers, "llama.cpp": run_llama_cpp}


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    result = RUNNERS[job["engine"]](job)
    result["peak_rss"] = peak_rss()
    if job["device"].startswith("cuda"):
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    print("BENCH-RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
