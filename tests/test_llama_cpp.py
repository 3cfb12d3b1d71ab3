"""llama.cpp itself (through llama-cpp-python) on foveal's GGUF exports of the bundled model.

Optional: skipped where llama-cpp-python is not installed (CI does not build it; see
../shared/reference/peers.md for the build flags this machine needs).

What is checked: llama.cpp loads the exported text model, tokenizes text exactly as foveal's
tokenizer does, and its greedy tokens equal foveal's on the same prompt ids (F32 and F16 exports;
the export is the file, foveal runs the float32 original); the exported mmproj runs in llama.cpp's
vision code (mtmd) to foveal's image embeddings, and llama.cpp then gives foveal's answers to the
README's example questions.

llama.cpp's LLaVA graph (this version's `tools/mtmd/models/llava.cpp`) puts CLIP's class token
after the patches while its inputs still assume it first: every patch gets its neighbour's
position embedding, patch 0 is dropped and the projected class token is fed to the LLM
(ggml-org/llama.cpp#25814, fix proposed in #25844). That is llama.cpp's, not the file's: the
embedding test accepts either layout and says which it saw, and the answers test hands foveal's
engine the same layout when llama.cpp has the defect, so both still check every weight of the
export and the whole llama.cpp path.
"""

import ctypes
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import foveal
from foveal.bundled import ASSET_DIR
from foveal.cli import main as cli_main
from foveal.processing.images import preprocess_batch

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="no bundled model installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_QUESTIONS = [line.split("->")[0].strip() for line in (EXAMPLES / "questions.txt").read_text().splitlines()
                     if line.strip() and not line.startswith("#")]
QUESTIONS = ["How many objects are in the image?", "What color is the circle?", "Describe the image.",
             "Is there a red square in the image?", "Read the text in the image.",
             "In which part of the image is the star?"]
TEXTS = ["a medium blue circle at the bottom left and the text J in the middle", "USER: hello ASSISTANT: 3 shapes",
         "Is there a green square in the image?\nAnswer the question using a single word or phrase."]


@pytest.fixture(scope="module")
def ours():
    return foveal.load(None, dtype="float32")


@pytest.fixture(scope="module", params=["f32", "f16"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gguf-{request.param}")
    assert cli_main(["export", str(ASSET_DIR), "--gguf", str(out), "--type", request.param]) == 0
    model = next(p for p in out.glob("*.gguf") if "mmproj" not in p.name)
    mmproj = next(p for p in out.glob("*.gguf") if "mmproj" in p.name)
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_threads=2, n_gpu_layers=0, verbose=False)
    yield llm, mmproj
    llm.close()


def test_llama_cpp_tokenizes_like_foveal(ours, exported):
    llm, _ = exported
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours.tokenizer.tok.encode(text).ids, text


def test_llama_cpp_greedy_tokens_equal_foveals(ours, exported):
    llm, _ = exported
    eos = set(ours.engine.eos_ids)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids, _ = ours.prompt_logits(messages)
        mine = ours.generate(messages, max_tokens=24, temperature=0.0).token_ids
        llm.reset()
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in eos or len(theirs) == len(mine):
                break
            theirs.append(token)
        assert theirs == [t for t in mine if t not in eos], question


def foveal_chat_handler():
    """llama-cpp-python's LLaVA handler, with the bundled model's own chat template (no system
    line; "USER: <image>\\nquestion ASSISTANT:") so both engines see the same tokens."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class Handler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = ("{% for message in messages %}{% if message.role == 'user' %}USER: "
                       "{% for content in message.content %}{% if content.type == 'image_url' %}"
                       "{{ content.image_url.url }}\n{% endif %}{% endfor %}"
                       "{% for content in message.content %}{% if content.type == 'text' %}{{ content.text }} "
                       "{% endif %}{% endfor %}{% endif %}{% endfor %}ASSISTANT:")
    return Handler


def llama_cpp_image_embeddings(llm, mmproj: Path, image: Image.Image) -> torch.Tensor:
    """llama.cpp's (mtmd's) image embeddings (tokens, D_text) for one image, its own preprocessing."""
    from llama_cpp import mtmd_cpp as mtmd

    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, "llama.cpp refused the exported mmproj"
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = mtmd.mtmd_input_text()
        text.text = mtmd.mtmd_default_marker() + b"\n"
        text.text_len, text.add_special, text.parse_special = len(text.text), False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * llm.n_embd(),))
                return torch.from_numpy(out.reshape(n, llm.n_embd()).copy())
        raise AssertionError("mtmd made no image chunk")
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)


def class_token_last(model, pixels: torch.Tensor) -> torch.Tensor:
    """foveal's image embeddings as llama.cpp's LLaVA graph lays out a CLIP tower (#25814): the
    class token after the patches, positions 0..P added in that order, rows 1..P kept."""
    tower, emb = model.vision_tower, model.vision_tower.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([patches, emb.class_embedding.expand(len(pixels), 1, -1)], 1) + emb.position_embedding.weight
    x = tower.pre_layrnorm(x)
    for layer in tower.encoder.layers:
        x = layer(x)
    return model.project(x[:, 1:])


@pytest.fixture(scope="module")
def layout(ours, exported) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(llama.cpp has the class-token defect, foveal's embeddings in llama.cpp's layout, llama.cpp's),
    for the example image, once per export."""
    llm, mmproj = exported
    image = Image.open(EXAMPLES / "shapes.png")
    theirs = llama_cpp_image_embeddings(llm, mmproj, image)
    pixels = preprocess_batch([image], ours.image_config)
    with torch.inference_mode():
        right, defect = ours.model.encode_images(pixels)[0], class_token_last(ours.model, pixels)[0]
    has_defect = (defect - theirs).abs().max() < (right - theirs).abs().max()
    return has_defect, defect if has_defect else right, theirs


def test_llama_cpps_clip_encodes_the_exported_mmproj_to_foveals_embeddings(ours, exported, layout):
    _, mmproj = exported
    has_defect, mine, theirs = layout
    assert theirs.shape == mine.shape == (ours.image_tokens_per_image, ours.config.text.hidden_size)
    # llama.cpp unfolds patches in f16 (im2col) even for an F32 file; measured 3e-4 of the scale (F32)
    tolerance = 3e-3 if "F32" in mmproj.name else 1e-2
    assert (mine - theirs).abs().max() <= tolerance * mine.abs().max(), ("class token last" if has_defect else "")
    if has_defect:
        warnings.warn("llama.cpp's LLaVA graph puts the class token last (ggml-org/llama.cpp#25814); "
                      "the exported mmproj matches foveal under that layout")


def test_image_answers_through_llama_cpps_clip_equal_foveals(ours, exported, layout, monkeypatch):
    """The exported mmproj runs in llama.cpp's own vision code (mtmd/clip): same answers as foveal,
    foveal's engine given llama.cpp's class-token layout where llama.cpp has that defect."""
    import base64
    llm, mmproj = exported
    if layout[0]:
        monkeypatch.setattr(ours.model, "encode_images", lambda pixels: class_token_last(ours.model, pixels))
    ours._image_cache.clear()
    chat = llama_cpp.Llama(model_path=llm.model_path, n_ctx=512, n_threads=2, n_gpu_layers=0, verbose=False,
                           chat_handler=foveal_chat_handler()(clip_model_path=str(mmproj), verbose=False))
    image = EXAMPLES / "shapes.png"
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    same = []
    for question in EXAMPLE_QUESTIONS:
        theirs = chat.create_chat_completion(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                          {"type": "text", "text": question}]}],
            temperature=0.0, max_tokens=48)["choices"][0]["message"]["content"]
        mine = ours.generate([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                            {"type": "text", "text": question}]}],
                             max_tokens=48, temperature=0.0).text
        same.append((question, mine.strip(), theirs.strip()))
    chat.close()
    ours._image_cache.clear()
    assert all(m == t for _, m, t in same), same
