"""Video input on Qwen2-VL and Qwen2.5-VL, end to end against transformers.

Real video files written by PyAV (H.264 in MP4, MJPEG in AVI, VP8 in WebM). transformers' own video
processor needs torchvision (absent here), so the reference inputs are built as its Qwen2VLProcessor
builds them: frames decoded by transformers' `read_video_pyav` at the indices its sample_frames picks,
pixels from foveal's `process_video` (equal to Qwen2VLVideoProcessor: tests/families/
test_qwen2_vl_parts.py), `<|video_pad|>` expanded to grid.prod() / merge^2 in the chat template's text,
tokenized by transformers' processor; logits from Qwen2VLForConditionalGeneration /
Qwen2_5_VLForConditionalGeneration in float32.
"""

from __future__ import annotations

import base64
import copy
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import foveal
from foveal.errors import ImageError, PromptError
from foveal.models.families.qwen2_vl.image_processing import QwenProcessorConfig, process_video, sample_frame_indices
from foveal.processing.images import ImageLimits, VideoLimits
from tiny import build_llava, build_qwen2_vl, hf_qwen2_vl, hf_qwen2_vl_processor

av = pytest.importorskip("av")
KINDS = ("qwen2_vl", "qwen2_5_vl")
VIDEO_PAD = "<|video_pad|>"


def write_video(path, codec="libx264", n=8, size=(64, 48), rate=4, seed=0):
    """n coloured frames (a moving square on noise), as a real encoder writes them."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = w, h
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(n):
            frame = (torch.rand(h, w, 3, generator=g) * 80).to(torch.uint8)
            frame[..., i % 3] += 120
            frame[4 * i % h:4 * i % h + 12, 6 * i % w:6 * i % w + 12] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _frames(n=5, size=(64, 48), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in range(n)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"mp4": write_video(d / "clip.mp4"), "avi": write_video(d / "clip.avi", "mjpeg"),
            "webm": write_video(d / "clip.webm", "libvpx"), "long": write_video(d / "long.mp4", n=24, rate=8),
            "dir": d}


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    folder = build_qwen2_vl(tmp_path_factory.mktemp(request.param), kind=request.param)
    return request.param, folder, foveal.load(str(folder), dtype="float32"), hf_qwen2_vl(folder), \
        hf_qwen2_vl_processor(folder)


def _hf_video(folder, source):
    """What transformers' Qwen2VLProcessor would make of a video (a file: read_video_pyav at sample_frames'
    2 fps; a list of frames: all of them, 24 fps assumed for the time spacing)."""
    from transformers.video_utils import read_video_pyav
    vcfg = QwenProcessorConfig.from_hf(json.loads((folder / "preprocessor_config.json").read_text()), video=True)
    if isinstance(source, list):
        frames, fps = source, 24.0
    else:
        picked = {}

        def indices(metadata, **_):
            picked["meta"] = metadata
            return sample_frame_indices(metadata.total_num_frames, 2, metadata.fps, fps=2)
        array, _ = read_video_pyav(str(source), indices)
        frames = [Image.fromarray(f) for f in array]
        meta = picked["meta"]
        fps = len(frames) / meta.total_num_frames * meta.fps
    done = process_video(frames, vcfg)
    return done.pixel_values, done.grid_thw, vcfg.temporal_patch_size / fps


def _hf_inputs(processor, messages, images, videos, kind):
    hf_messages = [{"role": m["role"], "content": [{"type": p["type"]} if p["type"] != "text" else p
                                                   for p in m["content"]]} for m in messages]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    for _, grid, _ in videos:      # Qwen2VLProcessor.__call__: one pad per merged patch
        text = text.replace(VIDEO_PAD, "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    text = text.replace("<|placeholder|>", VIDEO_PAD)
    # the processor refuses video pads without its video processor: tokenize with that check off, then mark
    # the video tokens (mm_token_type_ids 2) as the processor itself does
    quiet = copy.copy(processor)
    quiet.video_token = None
    inputs = quiet(text=[text], images=images or None, return_tensors="pt")
    inputs["mm_token_type_ids"] = torch.tensor(processor.create_mm_token_type_ids(inputs["input_ids"]))
    assert inputs["mm_token_type_ids"].eq(2).sum() == sum(int(g.prod()) // 4 for _, g, _ in videos)
    if videos:
        inputs["pixel_values_videos"] = torch.cat([p for p, _, _ in videos])
        inputs["video_grid_thw"] = torch.cat([g for _, g, _ in videos])
        if kind == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.tensor([s for _, _, s in videos])
    return inputs


def _ask(text, *media):
    parts = [{"type": "video", "video": m} if not isinstance(m, Image.Image) else {"type": "image", "image": m}
             for m in media]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("source", ["frames", "mp4"])
def test_video_logits_match_transformers(pair, videos, source):
    kind, folder, ours, hf, processor = pair
    video = _frames() if source == "frames" else str(videos["mp4"])
    messages = _ask("What happens in this video?", video)
    ref_video = _hf_video(folder, video)
    ref_inputs = _hf_inputs(processor, messages, [], [ref_video], kind)
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    chunk = ours.processor.prepare(messages, ours.image_limits).images[0]
    pixels, grid = ours.processor.pixels([chunk])
    assert torch.equal(grid, ref_inputs["video_grid_thw"]) and torch.equal(pixels, ref_inputs["pixel_values_videos"])
    assert chunk.options.second_per_grid == pytest.approx(ref_video[2])
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
        blank = hf(**{**ref_inputs, "pixel_values_videos": torch.zeros_like(pixels)}).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4 < (blank - ref).abs().max().item()   # the video matters
    assert ours.count_tokens(messages) == len(ids)
    # 5 frames padded to 6: t = 3; the 8-frame 4-fps file sampled at 2 fps: frames 0, 2, 4, 6, t = 2
    assert grid[0, 0].item() == (3 if source == "frames" else 2)


def test_image_and_video_in_one_prompt_and_a_second_turn(pair, videos):
    kind, folder, ours, hf, processor = pair
    image, clip = _frames(1, (100, 60), seed=7)[0], str(videos["mp4"])
    messages = [*_ask("Is the picture in the video?", image, clip),
                {"role": "assistant", "content": [{"type": "text", "text": "Maybe."}]},
                *_ask("And in these frames?", _frames(4, seed=3))]
    refs = [_hf_video(folder, clip), _hf_video(folder, messages[-1]["content"][0]["video"])]
    ref_inputs = _hf_inputs(processor, messages, [image], refs, kind)
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    r = ours.generate(messages, max_tokens=2)
    n_video = ref_inputs["input_ids"][0].eq(ours.config.video_token_id).sum().item()
    assert (r.stats.images, r.stats.videos, r.stats.video_frames) == (1, 2, 4 + 4)
    assert r.stats.video_tokens == n_video and r.stats.image_tokens == \
        ref_inputs["input_ids"][0].eq(ours.config.image_token_id).sum().item()


def test_a_video_is_encoded_once_however_it_is_sent(pair, videos):
    _, _, ours, _, _ = pair
    path = videos["mp4"]
    ours.engine.image_cache.clear()
    first = ours.generate(_ask("What?", str(path)), max_tokens=1)
    data_uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    by_bytes = ours.generate([{"role": "user", "content": "What?", "videos": [path.read_bytes()]}], max_tokens=1)
    by_uri = ours.generate(_ask("What?", data_uri), max_tokens=1)
    assert len(ours.engine.image_cache) == 1                   # one key: content hash + sampled frames
    assert first.stats.video_tokens == by_bytes.stats.video_tokens == by_uri.stats.video_tokens > 0
    assert by_uri.stats.cached_tokens == len(ours.prompt_logits(_ask("What?", data_uri))[0]) - 1
    # other frames of the same file are another entry
    ours.generate([{"role": "user", "content": [{"type": "video", "video": str(path), "num_frames": 8},
                                                {"type": "text", "text": "What?"}]}], max_tokens=1)
    assert len(ours.engine.image_cache) == 2


def test_message_videos_equal_video_parts(pair, videos):
    _, _, ours, _, _ = pair
    parts = _ask("Describe.", str(videos["mp4"]))
    ollama_style = [{"role": "user", "content": "Describe.", "videos": [str(videos["mp4"])]}]
    assert ours.prompt_logits(parts)[0] == ours.prompt_logits(ollama_style)[0]


@pytest.mark.parametrize("container", ["mp4", "avi", "webm"])
def test_decoded_frames_equal_transformers_read_video_pyav(videos, container):
    from transformers.video_utils import read_video_pyav
    from foveal.processing.video import load_video
    video = load_video(videos[container])
    assert (video.n_frames, video.width, video.height, video.fps, video.duration_s) == (8, 64, 48, 4.0, 2.0)
    expected, meta = read_video_pyav(str(videos[container]), lambda metadata, **_: [0, 3, 5, 7])
    got = video.decode([0, 3, 5, 7])
    assert len(got) == len(expected) == 4
    assert all((e == np.asarray(g)).all() for e, g in zip(expected, got))


def test_fps_and_num_frames_sample_as_transformers(pair, videos):
    _, _, ours, _, _ = pair
    long = str(videos["long"])          # 24 frames at 8 fps: 3 s
    chunk = lambda **o: ours.processor.prepare([{"role": "user", "content": [  # noqa: E731
        {"type": "video", "video": long, **o}, {"type": "text", "text": "?"}]}], ours.image_limits).images[0]
    assert chunk().indices == sample_frame_indices(24, 2, 8.0, fps=2) == [0, 4, 8, 12, 16, 20]
    assert chunk(fps=4).indices == sample_frame_indices(24, 2, 8.0, fps=4) and chunk(fps=4).frames == 12
    assert chunk(num_frames=4).indices == [0, 6, 12, 18]
    assert chunk(max_frames=4).frames == 4


# ---- bad input: each a clear, typed error before decoding -------------------------------------------
def _limited(ours, **video):
    return ImageLimits(video=VideoLimits(**video))


def test_too_many_frames_too_long_or_too_large_is_refused(pair, videos, monkeypatch):
    _, _, ours, _, _ = pair
    clip = str(videos["mp4"])
    prepare = lambda msgs, **v: ours.processor.prepare(msgs, _limited(ours, **v))  # noqa: E731
    with pytest.raises(ImageError, match="list of 10 frames is over the limit of 8 frames"):
        prepare(_ask("?", _frames(10)), max_frames=8)
    with pytest.raises(ImageError, match="10 frames sampled, over the limit of 8"):
        prepare([{"role": "user", "content": [{"type": "video", "video": str(videos["long"]), "num_frames": 10}]}],
                max_frames=8)
    with pytest.raises(ImageError, match=r"clip.mp4' lasts 2.0 s, over the limit of 1 s"):
        prepare(_ask("?", clip), max_duration_s=1)
    with pytest.raises(ImageError, match="64x48 = 3072 pixels per frame, over the limit of 3000"):
        prepare(_ask("?", clip), max_pixels_per_frame=3000)
    with pytest.raises(ImageError, match="bytes, over the video limit of 100 bytes"):
        prepare(_ask("?", clip), max_bytes=100)
    # nothing was decoded for any of them
    from foveal.processing.video import LoadedVideo
    monkeypatch.setattr(LoadedVideo, "decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageError):
        prepare(_ask("?", clip), max_duration_s=1)


def test_not_a_video_is_refused_naming_the_file(pair, videos, tmp_path):
    _, _, ours, _, _ = pair
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video at all, only some text in a file")
    with pytest.raises(ImageError, match=r"file '.*notes.mp4' is not a video in a container foveal reads"):
        ours.generate(_ask("?", str(text)), max_tokens=1)
    png = tmp_path / "still.png"
    _frames(1)[0].save(png)
    with pytest.raises(ImageError, match=r"still.png' is not a video"):
        ours.generate(_ask("?", str(png)), max_tokens=1)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(videos["mp4"].read_bytes()[:600])
    with pytest.raises(ImageError, match=r"cut.mp4' (is not a readable video|has no video|is truncated)"):
        ours.generate(_ask("?", str(truncated)), max_tokens=1)
    with pytest.raises(ImageError, match="no such video file"):
        ours.generate(_ask("?", str(tmp_path / "missing.mp4")), max_tokens=1)
    with pytest.raises(ImageError, match="not video/"):
        ours.generate(_ask("?", "data:image/png;base64,AAAA"), max_tokens=1)
    assert ours.generate(_ask("?", str(videos["avi"])), max_tokens=1).stats.videos == 1   # still answers


def test_missing_pyav_names_the_extra(pair, videos, monkeypatch):
    _, _, ours, _, _ = pair
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImageError, match=r"pip install 'foveal\[video\]'"):
        ours.generate(_ask("?", str(videos["mp4"])), max_tokens=1)
    assert ours.generate(_ask("?", _frames(4)), max_tokens=1).stats.video_frames == 4   # frames need no PyAV


def test_a_llava_model_refuses_a_video_by_name(tmp_path, videos):
    llava = foveal.load(str(build_llava(tmp_path / "llava")), dtype="float32")
    with pytest.raises(PromptError, match="a LLaVA model does not take video input"):
        llava.generate(_ask("?", str(videos["mp4"])), max_tokens=1)
    with pytest.raises(PromptError, match="does not take video"):
        llava.count_tokens([{"role": "user", "content": "?", "videos": [str(videos["mp4"])]}])


def test_bad_video_options_are_prompt_errors(pair, videos):
    _, _, ours, _, _ = pair
    for options, match in (({"fps": 0}, "fps must be a positive number"),
                           ({"num_frames": 2.5}, "num_frames must be a positive integer"),
                           ({"fps": 2, "num_frames": 4}, "by fps or by num_frames, not both")):
        with pytest.raises(PromptError, match=match):
            ours.generate([{"role": "user", "content": [{"type": "video", "video": str(videos["mp4"]), **options}]}],
                          max_tokens=1)


# ---- front ends: the CLI and the OpenAI server --------------------------------------------------------
def test_cli_run_with_a_video(pair, videos, capsys):
    from foveal.cli import main
    kind, folder, *_ = pair
    code = main(["run", str(folder), "--video", str(videos["mp4"]), "What happens?", "--max-tokens", "3",
                 "--stats", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 0 and "8 video (4 frames)" in err          # 2 time steps x 4 merged patches
    assert main(["run", str(folder), "--video", str(videos["dir"] / "nope.mp4"), "?"]) == 1
    assert "no such video file" in capsys.readouterr().err


def test_openai_server_takes_video_url(pair, videos):
    from openai import BadRequestError, OpenAI
    from live_server import MODEL, LiveServer
    _, _, ours, _, _ = pair
    data = videos["mp4"].read_bytes()
    with LiveServer(ours, image_root=videos["dir"], max_videos=1, max_video_bytes=len(data) + 10) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        ask = lambda *parts: client.chat.completions.create(  # noqa: E731
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}])
        uri = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}
        by_file = {"type": "video_url", "video_url": {"url": f"file://{videos['mp4']}"}}
        r = ask(uri)
        assert r.usage.prompt_tokens == len(ours.prompt_logits(_ask("?", str(videos["mp4"])))[0])
        assert r.model_extra["timings"]["videos"] == 1 and r.model_extra["timings"]["video_frames"] == 4
        assert ask(by_file).usage.prompt_tokens == r.usage.prompt_tokens
        for parts, match in (((uri, by_file), "too many videos: at most 1"),
                             (({"type": "video_url", "video_url": {"url": f"file://{videos['long']}"}},),
                              "over the limit of"),
                             (({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}},),
                              "outside the image root"),
                             (({"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}},),
                              "data URI of a video"),
                             (({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"
                                                                   + base64.b64encode(b"x" * 64).decode()}},),
                              "not a video in a container")):
            with pytest.raises(BadRequestError, match=match):
                ask(*parts)


def test_a_checkpoint_without_a_video_token_refuses_video_by_name(pair, videos, tmp_path):
    import shutil
    kind, folder, *_ = pair
    edited = tmp_path / "no-video"
    shutil.copytree(folder, edited)
    raw = json.loads((edited / "config.json").read_text())
    raw["video_token_id"] = 7
    (edited / "config.json").write_text(json.dumps(raw))
    other = foveal.load(str(edited), dtype="float32")
    with pytest.raises(PromptError, match=r"this Qwen2-VL checkpoint \(its tokenizer has no <\|video_pad\|> token 7\) "
                                          r"does not take video"):
        other.generate(_ask("?", str(videos["mp4"])), max_tokens=1)
    assert other.generate(_ask("?", _frames(1)[0]), max_tokens=1).stats.images == 1
