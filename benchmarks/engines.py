"""One engine's measurements, run in a fresh process so that its peak RSS is its own.

    python benchmarks/engines.py '{"engine": "foveal", "variant": "bf16", "folder": ..., ...}'

prints one JSON line: per-repeat figures (the caller takes medians) and the process's peak RSS.

Every engine answers the same request: one PNG image + a 32-token question (576 image tokens on
CLIP-L/336), greedy, end of sequence ignored so that decode always runs `decode_tokens` tokens.
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
from workloads import QUESTION, messages, prompt_ids  # noqa: E402


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
                         "generated": s.generated_tokens})
    notes = []
    if device.startswith("cuda"):
        notes.append("foveal's stage timers do not synchronize the GPU: its prefill figure on CUDA is optimistic")
    return {"runs": runs, "notes": notes}


# ---- transformers -------------------------------------------------------------------------------
def run_transformers(job: dict) -> dict:
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
                             "prompt_tokens": len(ids), "generated": generated})
    return {"runs": runs, "notes": []}


# ---- llama.cpp (llama-cpp-python) -----------------------------------------------------------------
def run_llama_cpp(job: dict) -> dict:
    import base64
    import llama_cpp
    model_path, mmproj = job["gguf"], job["mmproj"]
    ids, n_image = prompt_ids(Path(job["folder"]), job["image"])
    n, threads = job["decode_tokens"], job["threads"]
    gpu_layers = -1 if job["device"].startswith("cuda") else 0
    handler, notes = None, []
    try:
        from llama_cpp.llama_chat_format import Llava15ChatHandler
        handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    except Exception as e:       # noqa: BLE001 - any failure: text-only fallback, said in the notes
        notes.append(f"llama.cpp image path unavailable ({type(e).__name__}: {e}); prefill and TTFT are a "
                     f"text-only prompt of the same {len(ids)} tokens, no encode figure")
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=len(ids) + n + 256, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=gpu_layers, chat_handler=handler, verbose=False)
    eos = llm.token_eos()

    def no_eos(_ids, scores):
        scores[eos] = -float("inf")
        return scores

    # text tokens the model can hold: the image slots become ordinary ids for the text-only prefill
    tokens = [t if t != 4 else 5 for t in ids]
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
        ttft, encode = (t3 - t2), None
        if handler is not None:
            llm.reset()
            t5 = time.perf_counter()
            llm.create_chat_completion(chat, max_tokens=1, temperature=0.0)
            ttft = time.perf_counter() - t5
            encode = max(ttft - (t3 - t2), 0.0)          # image + same-length text minus the text alone
        if i >= job["warmup"]:
            generated = out["usage"]["completion_tokens"]
            runs.append({"preprocess_ms": None, "encode_ms": None if encode is None else encode * 1e3,
                         "prefill_tps": len(tokens) / (t1 - t0), "ttft_ms": ttft * 1e3,
                         "decode_tps": (generated - 1) / max((t4 - t3) - (t3 - t2), 1e-9),
                         "prompt_tokens": len(tokens), "generated": generated})
    if handler is not None:
        notes.append("llama.cpp: image through Llava15ChatHandler (its own chat template); encode ms = its "
                     "image TTFT minus the TTFT of the same-length text prompt; preprocessing is inside it")
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
