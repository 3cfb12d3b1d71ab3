"""The generation engine: streaming, stop conditions, sampling, KV-cache reuse, options."""

import threading

import pytest
from PIL import Image

import foveal
import tiny
from foveal.engine.sampling import SamplingOptions
from foveal.errors import SamplingError
from foveal.processing.prompt import StreamDecoder, Tokenizer

IMG = Image.new("RGB", (40, 40), (200, 20, 20))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return foveal.load(tiny.build_llava(tmp_path_factory.mktemp("engine")), dtype="float32")


def ask(text="Tell me about it.", images=(IMG,)):
    return [foveal.user(text, images=list(images))]


def test_stream_concatenates_to_generate(vlm):
    full = vlm.generate(ask(), max_tokens=24)
    chunks = list(vlm.stream(ask(), max_tokens=24))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert chunks[-1].finish_reason == full.finish_reason
    s = full.stats
    assert s.prompt_tokens > s.image_tokens == vlm.image_tokens_per_image and s.images == 1
    assert s.generated_tokens == len(full.token_ids)
    assert min(s.preprocess_s, s.encode_s, s.prefill_s, s.decode_s) >= 0


def test_max_tokens_gives_length(vlm):
    r = vlm.generate(ask(), max_tokens=3)
    assert r.finish_reason in ("length", "stop")
    if r.finish_reason == "length":
        assert len(r.token_ids) == 3


def test_stop_string_cuts_text_and_never_streams_it(vlm):
    free = vlm.generate(ask(), max_tokens=24).text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    assert stop.strip(), "random model produced too little text for this test"
    chunks = list(vlm.stream(ask(), max_tokens=24, stop=[stop]))
    text = "".join(c.text for c in chunks)
    assert text == free[:free.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in chunks)


def test_seed_makes_sampling_reproducible(vlm):
    a = vlm.generate(ask(), max_tokens=16, temperature=1.0, seed=7)
    b = vlm.generate(ask(), max_tokens=16, temperature=1.0, seed=7)
    c = vlm.generate(ask(), max_tokens=16, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_is_greedy_and_filters_compose(vlm):
    greedy = vlm.generate(ask(), max_tokens=12)
    assert vlm.generate(ask(), max_tokens=12, temperature=1.0, top_k=1, seed=3).token_ids == greedy.token_ids
    r = vlm.generate(ask(), max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                     repetition_penalty=1.3, seed=1)
    assert len(r.token_ids) >= 1


def test_repetition_penalty_changes_greedy_output(vlm):
    plain = vlm.generate(ask(), max_tokens=24).token_ids
    penalised = vlm.generate(ask(), max_tokens=24, repetition_penalty=5.0).token_ids
    assert plain != penalised
    assert len(set(penalised)) >= len(set(plain))


def test_prefix_reuse_matches_fresh_computation(vlm):
    first = vlm.generate(ask(), max_tokens=8)
    turn2 = ask() + [{"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                     {"role": "user", "content": [{"type": "text", "text": "And then?"}]}]
    reused = vlm.generate(turn2, max_tokens=8)
    assert reused.stats.cached_tokens > vlm.image_tokens_per_image
    vlm.engine.reset()
    fresh = vlm.generate(turn2, max_tokens=8)
    assert fresh.stats.cached_tokens == 0
    assert fresh.token_ids == reused.token_ids


@pytest.mark.parametrize("how", ["length", "stop string"])
def test_a_prompt_extending_the_whole_answer_reuses_only_what_was_computed(vlm, how):
    """The answer's last token never went through a decode step (generation ended on it): its KV slot
    is empty, so a next prompt that continues the exact token ids must recompute it (it reused the
    stale slot once, and answered differently from a fresh computation)."""
    from foveal.engine.generate import Stats
    engine, ids = vlm.engine, list(range(10, 30))

    def run(prompt, **options):
        chunks = list(engine.stream(prompt, [False] * len(prompt), None, [], SamplingOptions.from_kwargs(**options),
                                    Stats()))
        return [t for c in chunks for t in c.token_ids], chunks[-1]

    engine.reset()
    out, last = run(ids, max_tokens=5)
    if how == "stop string":
        text = vlm.tokenizer.decode(out)
        engine.reset()
        out, last = run(ids, max_tokens=5, stop=[text[-1]])
        assert last.finish_reason == "stop" and out
    then = ids + out + [7, 8]
    reused, last = run(then, max_tokens=6)
    assert 0 < last.stats.cached_tokens < len(ids) + len(out)
    engine.reset()
    fresh, _ = run(then, max_tokens=6)
    assert reused == fresh


def test_two_images_and_image_cache(vlm):
    other = Image.new("RGB", (30, 50), (20, 20, 200))
    r = vlm.generate(ask("Compare.", images=(IMG, other)), max_tokens=4)
    assert r.stats.image_tokens == 2 * vlm.image_tokens_per_image and r.stats.images == 2


def test_cancel_stops_generation(vlm):
    cancel = threading.Event()
    seen = 0
    for chunk in vlm.stream(ask(), max_tokens=200, cancel=cancel):
        seen += 1
        cancel.set()
    assert chunk.done and chunk.stats.generated_tokens <= 3


@pytest.mark.parametrize("bad,name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(temperature="hot"), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(stop=[1, 2]), "stop"),
    (dict(max_tokens=1.5), "max_tokens"), (dict(frobnicate=1), "frobnicate"),
])
def test_bad_options_name_the_option(vlm, bad, name):
    with pytest.raises(SamplingError, match=name):
        vlm.generate(ask(), **bad)


def test_options_defaults_are_valid():
    SamplingOptions.from_kwargs()
    assert SamplingOptions.from_kwargs(stop="x").stop == ["x"]


def test_stream_decoder_never_emits_broken_utf8(tmp_path):
    tiny.write_tokenizer(tmp_path, "qwen2")
    tok = Tokenizer.from_folder(tmp_path)
    text = "Ünïcödé 🙂 日本語 and emoji 🙂🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


# ---- CPU matmul routing (models/cpu.py) -------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_bf16(tmp_path_factory):
    return foveal.load(tiny.build_llava(tmp_path_factory.mktemp("engine_bf16")), dtype="bfloat16")


def _onednn_seen(vlm):
    """Record, for every LM linear call, (rows, whether oneDNN was on) while the hook is set."""
    import torch
    seen = []

    def hook(mod, args):
        x = args[0]
        seen.append((x.numel() // x.shape[-1], torch._C._get_mkldnn_enabled()))
    handles = [m.register_forward_pre_hook(hook) for m in (vlm.model.lm_head,
                                                          vlm.model.language_model.layers[0].mlp.up_proj)]
    return seen, handles


def test_bf16_decode_runs_without_onednn_and_prefill_with_it(vlm_bf16):
    import torch
    seen, handles = _onednn_seen(vlm_bf16)
    try:
        vlm_bf16.unload()
        vlm_bf16.generate(ask(), max_tokens=5)
    finally:
        for h in handles:
            h.remove()
    assert torch._C._get_mkldnn_enabled()                # restored afterwards
    many = [on for rows, on in seen if rows > 1]
    one = [on for rows, on in seen if rows == 1]
    assert many and all(many)                            # prefill: oneDNN
    assert len(one) >= 5 and not any(one)                # last-position head + decode steps: PyTorch's gemv


def test_onednn_switch_respects_the_user_and_exceptions(vlm_bf16):
    import torch
    from foveal.models.cpu import matmuls
    x = torch.zeros(1, 1, 4, dtype=torch.bfloat16)
    torch._C._set_mkldnn_enabled(False)
    try:
        with matmuls(x, rows=1):
            assert not torch._C._get_mkldnn_enabled()
        assert not torch._C._get_mkldnn_enabled()        # the user's choice is kept
    finally:
        torch._C._set_mkldnn_enabled(True)
    with pytest.raises(RuntimeError, match="boom"):
        with matmuls(x, rows=1):
            raise RuntimeError("boom")
    assert torch._C._get_mkldnn_enabled()
    with matmuls(x.float(), rows=1):                     # float32 keeps MKL's kernels
        assert torch._C._get_mkldnn_enabled()


def test_prefill_in_another_thread_never_runs_in_the_decode_window(vlm_bf16, tmp_path):
    """The switch is process-wide: a second model prefilling while the first decodes must still
    get oneDNN for its many-row matmuls."""
    import torch
    other = foveal.load(tiny.build_llava(tmp_path / "other"), dtype="bfloat16")
    seen, handles = _onednn_seen(other)
    stop = threading.Event()

    def decode_loop():
        while not stop.is_set():
            vlm_bf16.unload()
            vlm_bf16.generate(ask(), max_tokens=8)
    t = threading.Thread(target=decode_loop)
    t.start()
    try:
        for _ in range(6):
            other.unload()
            other.generate(ask(), max_tokens=2)
    finally:
        stop.set()
        t.join()
        for h in handles:
            h.remove()
    many = [on for rows, on in seen if rows > 1]
    assert len(many) >= 6 and all(many)


def test_bf16_vision_rows_padded_to_a_multiple_of_8_give_the_same_features(tmp_path, monkeypatch):
    """The CPU bf16 tower pads 17 token rows to 24 and masks the padding keys: features as accurate against
    float32 as without padding, and the padded rows never leak into the real ones."""
    import torch
    import foveal.models.vision as V
    folder = tiny.build_llava(tmp_path / "m", image_size=32, patch=8)     # 16 patches + CLS = 17 rows
    ref = foveal.load(folder, dtype="float32")
    vlm = foveal.load(folder, dtype="bfloat16")
    px = torch.randn(2, 3, 32, 32)
    seen = []
    real_forward = V.VisionLayer.forward
    with torch.inference_mode():
        r = ref.model.encode_images(px)
        monkeypatch.setattr(V.VisionLayer, "forward", lambda self, x, mask=None: seen.append(x.shape[1]) or
                            real_forward(self, x, mask))
        padded = vlm.model.encode_images(px)
        assert set(seen) == {24}
        monkeypatch.setattr(V, "ROW_MULTIPLE", 1)
        plain = vlm.model.encode_images(px)
        # garbage in the padding rows must not reach the real rows
        monkeypatch.setattr(V, "ROW_MULTIPLE", 8)
        monkeypatch.setattr(V.F, "pad", lambda x, p: torch.cat([x, torch.full_like(x[:, :p[3]], 1e4)], 1))
        poisoned = vlm.model.encode_images(px)
    assert padded.shape == plain.shape == r.shape
    err = lambda x: ((x.float() - r).norm() / r.norm()).item()       # noqa: E731
    assert err(padded) <= 1.5 * err(plain) + 1e-3
    assert torch.equal(poisoned, padded)


# ---- torch.compile of the decode step ---------------------------------------------------------------
def test_compiled_decode_gives_the_eager_answers(vlm):
    """float32: the same greedy tokens and decode logits within 1e-5 of eager; the cache growing to a
    larger block does not recompile (the step is compiled with dynamic shapes)."""
    import torch
    import torch._dynamo
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = foveal.load(vlm.path, dtype="float32", compile=True)
    graphs = [torch._dynamo.utils.counters["stats"]["unique_graphs"]]     # compiled by load's warm-up
    assert graphs[0] > before and compiled.model.language_model.layers[0].self_attn.kv_cache is None
    for text, n in (("Tell me about it.", 16), ("Describe the colours " * 40, 12)):
        vlm.engine.reset()
        assert compiled.generate(ask(text), max_tokens=n).token_ids == vlm.generate(ask(text), max_tokens=n).token_ids
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert compiled.model.language_model.max_cache_len > 256     # the second prompt grew the cache
    assert compiled.model._compiled_decode is not None
    assert graphs[2] == graphs[1] == graphs[0], "the decode step compiled again in a request"


def test_compiled_decode_with_int4_weights_stays_within_bf16_rounding(vlm):
    import torch
    model = foveal.load(vlm.path, dtype="bfloat16", quant="int4").model
    lm = model.language_model
    lm.setup_cache(1, 256, torch.bfloat16)
    with torch.inference_mode():
        model(torch.randn(1, 20, lm.cfg.hidden_size, dtype=torch.bfloat16), torch.arange(20))
        token, pos = torch.tensor([[7]]), torch.tensor([20])
        eager = model.decode(token, pos, 21).float()
        model.compile_decode()
        fused = model.decode(token, pos, 21).float()
    assert model._compiled_decode is not None
    assert (eager - fused).abs().max().item() <= 0.03 * eager.abs().max().item()


def test_a_failing_compile_falls_back_to_eager_and_keeps_answering(vlm, monkeypatch, caplog):
    import torch

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level("WARNING"):
        model = foveal.load(vlm.path, dtype="float32", compile=True)     # its warm-up step fails
    vlm.engine.reset()
    assert model.generate(ask(), max_tokens=8).token_ids == vlm.generate(ask(), max_tokens=8).token_ids
    assert model.model._compiled_decode is None
    assert "no working C++ compiler" in caplog.text and "decoding eagerly" in caplog.text
    with pytest.raises(foveal.errors.ConfigError, match="compile must be True or False"):
        foveal.load(vlm.path, compile="yes")
