"""Model references against stores laid out on disk the way HF, Ollama and LM Studio lay them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from foveal.errors import ConfigError, FovealError, ModelNotFoundError, WeightsError
from foveal.weights.resolve import _gguf_architecture, list_models, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MEDIA = "application/vnd.ollama.image."


def write_gguf(path: Path, arch: str, n: int = 8, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch, **kw)
    writer.add_uint32(f"{arch}.block_count", 1)
    writer.add_tensor("v.w" if arch == "clip" else "token_embd.weight",
                      np.ones((n, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_folder(folder: Path, vision: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llava" if vision else "llama", "text_config": {"hidden_size": 4}}
    if vision:
        config["vision_config"] = {"hidden_size": 4}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def hf_cache_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A repo as huggingface_hub caches it: blobs by hash, snapshot symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


class OllamaStore:
    """Writes blobs named by their real sha256 and manifests that point at them."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def blob(self, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / digest.replace(":", "-")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def add(self, name: str, tag: str, layers: list[tuple[str, bytes]],
            host="registry.ollama.ai", namespace="library") -> Path:
        config = self.blob(b'{"model_format":"gguf","model_family":"llama"}')
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
            "layers": [{"mediaType": MEDIA + kind, **self.blob(data)} for kind, data in layers],
        }
        path = self.root / "manifests" / host / namespace / name / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))
        return path


@pytest.fixture
def stores(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    files = tmp_path / "src"
    text, vision = write_gguf(files / "text.gguf", "llama"), write_gguf(files / "vis.gguf", "clip")

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    hf = write_hf_folder(files / "hfmodel")
    hf_cache_repo(cache, "org/tiny-llava", {"config.json": hf / "config.json",
                                            "model.safetensors": hf / "model.safetensors"})
    hf_cache_repo(cache, "org/tiny-GGUF", {"tiny-Q4_0.gguf": text, "tiny-Q8_0.gguf": text,
                                           "mmproj-tiny-f16.gguf": vision})

    ollama = OllamaStore(tmp_path / "ollama" / "models")
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama.root))
    llava = [("model", text.read_bytes()), ("projector", vision.read_bytes()),
             ("template", b"[INST] {{ .Prompt }} [/INST]"), ("system", b"Be brief."),
             ("params", b'{"stop": ["[INST]"], "temperature": 0.2}'), ("license", b"Apache")]
    ollama.add("llava", "latest", llava)
    ollama.add("llava", "7b", llava)
    ollama.add("tinyllama", "latest", [("model", write_gguf(files / "t2.gguf", "llama", 16)
                                        .read_bytes())])
    ollama.add("custom", "v1", llava[:2], namespace="someone")
    ollama.add("repo", "Q4_K_M", llava[:2], host="hf.co", namespace="org")

    lms = tmp_path / "lmstudio" / "models"
    monkeypatch.setenv("LMSTUDIO_MODELS", str(lms))
    write_gguf(lms / "pub" / "vlm-GGUF" / "vlm-Q4_K_M.gguf", "llama")
    write_gguf(lms / "pub" / "vlm-GGUF" / "mmproj-vlm-f16.gguf", "clip")
    write_gguf(lms / "pub" / "text-GGUF" / "text-Q8_0.gguf", "llama")
    return {"tmp": tmp_path, "files": files, "cache": cache, "ollama": ollama, "lms": lms,
            "text": text, "vision": vision}


def size(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths)


# ---- local folders and files ------------------------------------------------------------------

def test_local_hf_folder(stores):
    folder = stores["files"] / "hfmodel"
    for ref in (folder, str(folder)):
        model = resolve(ref)
        assert (model.kind, model.path, model.mmproj, model.source) == ("hf", folder, None, "local")
        assert model.is_vlm and model.name == "hfmodel"
        assert model.size_bytes == size(folder / "model.safetensors")
    text_only = resolve(write_hf_folder(stores["tmp"] / "llama", vision=False))
    assert not text_only.is_vlm


def test_hf_folder_without_safetensors_is_refused(stores):
    folder = stores["tmp"] / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="pickle"):
        resolve(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        resolve(folder)


def test_gguf_file_with_explicit_mmproj(stores):
    text, vision = stores["text"], stores["vision"]
    # the source folder holds two text models, so nothing is paired automatically
    model = resolve(text, mmproj=vision)
    assert (model.kind, model.path, model.mmproj, model.is_vlm) == ("gguf", text, vision, True)
    assert model.size_bytes == size(text, vision)
    with pytest.raises(ConfigError, match="not a projector"):
        resolve(text, mmproj=stores["files"] / "t2.gguf")
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        resolve(text, mmproj=stores["files"] / "nope.gguf")
    with pytest.raises(ConfigError, match="is a vision projector"):
        resolve(vision)
    with pytest.raises(ConfigError, match="Hugging Face folder"):
        resolve(stores["files"] / "hfmodel", mmproj=vision)


def test_folder_pairs_model_and_mmproj_when_unambiguous(stores):
    folder = stores["tmp"] / "pair"
    text = write_gguf(folder / "llava-v1.6-mistral-7b-Q4_K_M.gguf", "llama")
    proj = write_gguf(folder / "mmproj-model-f16.gguf", "clip")
    model = resolve(folder)
    assert (model.path, model.mmproj, model.name, model.is_vlm) == (text, proj, "pair", True)
    assert resolve(text).mmproj == proj  # a file finds the projector beside it too


def test_projector_found_by_header_not_name(stores):
    folder = stores["tmp"] / "byheader"
    text = write_gguf(folder / "a.gguf", "llama")
    proj = write_gguf(folder / "b.gguf", "clip")
    assert (resolve(folder).path, resolve(folder).mmproj) == (text, proj)
    big = write_gguf(stores["tmp"] / "be.gguf", "clip", endianess=gguf.GGUFEndian.BIG)
    assert _gguf_architecture(big) == "clip"
    assert _gguf_architecture(stores["files"] / "hfmodel" / "config.json") is None


def test_text_only_folder(stores):
    folder = stores["tmp"] / "textonly"
    write_gguf(folder / "m.gguf", "llama")
    model = resolve(folder)
    assert model.mmproj is None and not model.is_vlm


def test_ambiguous_pairing_lists_candidates_and_explicit_choice_wins(stores):
    folder = stores["tmp"] / "many"
    q4 = write_gguf(folder / "m-Q4_0.gguf", "llama")
    write_gguf(folder / "m-Q8_0.gguf", "llama")
    with pytest.raises(ConfigError, match="m-Q4_0.gguf, m-Q8_0.gguf"):
        resolve(folder)
    f16 = write_gguf(folder / "mmproj-f16.gguf", "clip")
    write_gguf(folder / "mmproj-q8.gguf", "clip")
    with pytest.raises(ConfigError, match="mmproj-f16.gguf, mmproj-q8.gguf"):
        resolve(q4)
    model = resolve(q4, mmproj=f16)
    assert (model.path, model.mmproj) == (q4, f16)


def test_split_gguf_counts_as_one_model(stores):
    folder = stores["tmp"] / "split"
    first = write_gguf(folder / "big-00001-of-00002.gguf", "llama")
    second = folder / "big-00002-of-00002.gguf"
    second.write_bytes(b"GGUF" + b"\0" * 60)  # later shards carry little metadata
    model = resolve(folder)
    assert model.path == first and model.size_bytes == size(first, second)
    assert resolve(second).path == first


def test_missing_local_path(stores):
    with pytest.raises(ModelNotFoundError, match="no file or folder"):
        resolve(stores["tmp"] / "absent")
    with pytest.raises(ModelNotFoundError, match="absent.gguf"):
        resolve("./absent.gguf")


# ---- Hugging Face cache -----------------------------------------------------------------------

def test_hf_cache_reference(stores):
    snapshot = stores["cache"] / "models--org--tiny-llava" / "snapshots" / COMMIT
    for ref in ("hf:org/tiny-llava", "org/tiny-llava", f"hf:org/tiny-llava@{COMMIT}",
                "hf:org/tiny-llava@main"):
        model = resolve(ref)
        assert (model.kind, model.path, model.source, model.name) == \
            ("hf", snapshot, "hf-cache", "org/tiny-llava")
        assert model.is_vlm and model.size_bytes == size(snapshot / "model.safetensors")
    assert resolve("org/tiny-llava", revision=COMMIT).path == snapshot
    assert resolve(snapshot).source == "hf-cache"
    with pytest.raises(ConfigError, match="revision"):
        resolve("hf:org/tiny-llava@main", revision=COMMIT)


def test_hf_cache_gguf_repo(stores):
    snapshot = stores["cache"] / "models--org--tiny-GGUF" / "snapshots" / COMMIT
    with pytest.raises(ConfigError, match="tiny-Q4_0.gguf, tiny-Q8_0.gguf"):
        resolve("hf:org/tiny-GGUF")
    model = resolve("hf:org/tiny-GGUF/tiny-Q8_0.gguf")
    assert (model.path, model.mmproj) == (snapshot / "tiny-Q8_0.gguf",
                                         snapshot / "mmproj-tiny-f16.gguf")


def test_hf_not_cached_names_cache_and_similar_names(stores):
    with pytest.raises(ModelNotFoundError) as error:
        resolve("hf:org/tiny-lava")
    message = str(error.value)
    assert str(stores["cache"]) in message and "org/tiny-llava" in message
    assert "foveal pull hf:org/tiny-lava" in message      # a command that exists (cli pull)
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve("hf:org/tiny-llava@v9")


def test_download_only_when_allowed_and_failures_are_typed(stores, monkeypatch):
    """The real download needs a network; a stand-in checks the call and the cache it fills."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "org/gone":
            raise OSError("404 repository not found")
        return str(write_hf_folder(kwargs["cache_dir"] / "models--org--new" / "snapshots" / COMMIT))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelNotFoundError, match="foveal pull hf:org/new"):
        resolve("hf:org/new")
    assert calls == []
    model = resolve("hf:org/new", allow_download=True, revision="main")
    assert (model.kind, model.source, model.name) == ("hf", "hf-cache", "org/new")
    repo_id, kwargs = calls[0]
    assert repo_id == "org/new" and kwargs["revision"] == "main"
    assert kwargs["cache_dir"] == stores["cache"] and "*.safetensors" in kwargs["allow_patterns"]
    assert not any(p.endswith(".bin") for p in kwargs["allow_patterns"])
    with pytest.raises(FovealError, match="404"):        # an OSError: the download failed (pull.py)
        resolve("hf:org/gone", allow_download=True)


def test_hf_home_is_honoured(stores, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(stores["cache"].parent))
    assert resolve("hf:org/tiny-llava").source == "hf-cache"


# ---- Ollama store -----------------------------------------------------------------------------

def ollama_blob_path(store: OllamaStore, data: bytes) -> Path:
    return store.root / "blobs" / ("sha256-" + hashlib.sha256(data).hexdigest())


def test_ollama_default_tag_is_latest(stores):
    store, text, vision = stores["ollama"], stores["text"], stores["vision"]
    model = resolve("ollama:llava")
    assert (model.kind, model.source, model.name) == ("gguf", "ollama", "llava:latest")
    assert model.path == ollama_blob_path(store, text.read_bytes())
    assert model.mmproj == ollama_blob_path(store, vision.read_bytes())
    assert model.is_vlm and model.size_bytes == size(text, vision)
    assert model.template == "[INST] {{ .Prompt }} [/INST]" and model.system == "Be brief."
    assert model.params == {"stop": ["[INST]"], "temperature": 0.2}
    assert resolve("ollama:llava:7b").name == "llava:7b"
    assert resolve("llava:7b").source == "ollama"  # what an Ollama user types
    assert resolve("ollama:someone/custom:v1").name == "someone/custom:v1"
    assert resolve("ollama:hf.co/org/repo:Q4_K_M").mmproj is not None
    text_only = resolve("ollama:tinyllama")
    assert text_only.mmproj is None and not text_only.is_vlm and text_only.template is None


def test_ollama_models_env_and_default_home(stores, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(stores["tmp"] / "elsewhere"))
    with pytest.raises(ModelNotFoundError, match="elsewhere"):
        resolve("ollama:llava")
    monkeypatch.delenv("OLLAMA_MODELS")
    home_store = OllamaStore(Path.home() / ".ollama" / "models")
    home_store.add("moondream", "latest", [("model", stores["text"].read_bytes())])
    assert resolve("ollama:moondream").path.parent == home_store.root / "blobs"


def test_ollama_explicit_mmproj_overrides_projector_layer(stores):
    other = write_gguf(stores["tmp"] / "other-mmproj.gguf", "clip", n=2)
    assert resolve("ollama:llava", mmproj=other).mmproj == other


def test_ollama_missing_blob_names_digest(stores):
    store = stores["ollama"]
    data = b"GGUF-never-written"
    digest = hashlib.sha256(data).hexdigest()
    path = store.add("ghost", "latest", [("model", data)])
    (store.root / "blobs" / f"sha256-{digest}").unlink()
    with pytest.raises(ModelNotFoundError, match=f"sha256:{digest}") as error:
        resolve("ollama:ghost")
    assert "ollama pull ghost:latest" in str(error.value)
    manifest = json.loads(path.read_text())
    manifest["layers"][0]["size"] += 1
    (store.root / "blobs" / f"sha256-{digest}").write_bytes(data)
    path.write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="partial download"):
        resolve("ollama:ghost")


def test_ollama_legacy_colon_blob_names_are_read(stores):
    store = stores["ollama"]
    data = stores["text"].read_bytes()
    store.add("old", "latest", [("model", data)])
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    legacy = store.root / "blobs" / digest
    (store.root / "blobs" / digest.replace(":", "-")).rename(legacy)
    assert resolve("ollama:old").path == legacy


def test_ollama_corrupt_manifests(stores):
    root = stores["ollama"].root / "manifests" / "registry.ollama.ai" / "library"
    (root / "broken").mkdir()
    (root / "broken" / "latest").write_text('{"layers": [')
    with pytest.raises(ConfigError, match="not readable JSON"):
        resolve("ollama:broken")
    (root / "broken" / "latest").write_text('{"layers": [{"mediaType": 3}]}')
    with pytest.raises(ConfigError, match="layers"):
        resolve("ollama:broken")
    evil = {"layers": [{"mediaType": MEDIA + "model", "digest": "sha256:../../../etc/passwd"}]}
    (root / "broken" / "latest").write_text(json.dumps(evil))
    with pytest.raises(ConfigError, match="malformed digest"):
        resolve("ollama:broken")
    no_model = {"layers": [{"mediaType": MEDIA + "template", **stores["ollama"].blob(b"t")}]}
    (root / "broken" / "latest").write_text(json.dumps(no_model))
    with pytest.raises(ConfigError, match="no application/vnd.ollama.image.model"):
        resolve("ollama:broken")


def test_ollama_unknown_name_lists_store_and_similar(stores):
    with pytest.raises(ModelNotFoundError) as error:
        resolve("ollama:lava")
    assert str(stores["ollama"].root / "manifests") in str(error.value)
    assert "llava:latest" in str(error.value)
    with pytest.raises(ModelNotFoundError, match="llava:7b"):
        resolve("ollama:llava:13b")  # other tags of the same model are offered first


@pytest.mark.parametrize("ref", ["ollama:../../etc", "ollama:../../etc/passwd",
                                 "ollama:llava:../../x", "ollama:/etc/passwd", "ollama:a/b/c/d",
                                 "ollama:", "hf:../../etc", "hf:org/..", "hf:org/x@../../y",
                                 "hf:org/x/../y.gguf", "lmstudio:../../etc",
                                 "lmstudio:pub/../x", "lmstudio:pub/vlm-GGUF/../../x.gguf"])
def test_path_traversal_is_refused(stores, ref):
    with pytest.raises(ConfigError, match="malformed"):
        resolve(ref)


def test_revision_only_for_hf_and_checked(stores):
    with pytest.raises(ConfigError, match="revision"):
        resolve("ollama:llava", revision="main")
    with pytest.raises(ConfigError, match="malformed revision"):
        resolve("hf:org/tiny-llava", revision="../../../etc")


# ---- LM Studio --------------------------------------------------------------------------------

def test_lmstudio_reference_and_path(stores):
    folder = stores["lms"] / "pub" / "vlm-GGUF"
    model = resolve("lmstudio:pub/vlm-GGUF")
    assert (model.path, model.mmproj) == (folder / "vlm-Q4_K_M.gguf", folder / "mmproj-vlm-f16.gguf")
    assert (model.source, model.name, model.is_vlm) == ("lmstudio", "pub/vlm-GGUF", True)
    assert resolve(folder / "vlm-Q4_K_M.gguf").source == "lmstudio"
    assert resolve("pub/vlm-GGUF").source == "lmstudio"  # not in the HF cache, so LM Studio
    assert resolve("lmstudio:pub/vlm-GGUF/vlm-Q4_K_M.gguf").name == "pub/vlm-GGUF/vlm-Q4_K_M.gguf"
    assert resolve("lmstudio:pub/text-GGUF").mmproj is None


def test_lmstudio_default_folders(stores, monkeypatch):
    monkeypatch.delenv("LMSTUDIO_MODELS")
    old = Path.home() / ".cache" / "lm-studio" / "models"
    write_gguf(old / "TheBloke" / "old-GGUF" / "old.Q4_0.gguf", "llama")
    assert resolve("lmstudio:TheBloke/old-GGUF").path.parent == old / "TheBloke" / "old-GGUF"
    with pytest.raises(ModelNotFoundError) as error:
        resolve("lmstudio:TheBloke/olt-GGUF")
    assert str(Path.home() / ".lmstudio" / "models") in str(error.value)
    assert "TheBloke/old-GGUF" in str(error.value)


def test_unknown_bare_name_names_every_place_searched(stores):
    with pytest.raises(ModelNotFoundError) as error:
        resolve("org/nothing-here")
    message = str(error.value)
    for place in (stores["cache"], stores["lms"], stores["ollama"].root / "manifests"):
        assert str(place) in message


# ---- listing ----------------------------------------------------------------------------------

def test_list_models_finds_everything(stores, caplog):
    root = stores["ollama"].root / "manifests" / "registry.ollama.ai" / "library"
    (root / "broken").mkdir()
    (root / "broken" / "latest").write_text("{")  # skipped with a warning, not fatal
    found = {m.name: m for m in list_models()}
    assert "broken" in caplog.text
    expected = {"org/tiny-llava": ("hf-cache", True), "org/tiny-GGUF/tiny-Q4_0.gguf": ("hf-cache", True),
                "org/tiny-GGUF/tiny-Q8_0.gguf": ("hf-cache", True), "llava:latest": ("ollama", True),
                "llava:7b": ("ollama", True), "tinyllama:latest": ("ollama", False),
                "someone/custom:v1": ("ollama", True), "hf.co/org/repo:Q4_K_M": ("ollama", True),
                "pub/vlm-GGUF": ("lmstudio", True), "pub/text-GGUF": ("lmstudio", False)}
    assert {n: (m.source, m.is_vlm) for n, m in found.items()} == expected
    for model in found.values():  # every listed name resolves to the same files
        files = [model.path] if model.kind == "gguf" else list(model.path.glob("*.safetensors"))
        assert model.size_bytes == size(*files, *([model.mmproj] if model.mmproj else []))
        prefix = {"hf-cache": "hf:", "ollama": "ollama:", "lmstudio": "lmstudio:"}[model.source]
        again = resolve(prefix + model.name)
        assert (again.path, again.mmproj, again.size_bytes) == \
            (model.path, model.mmproj, model.size_bytes)


def test_list_models_empty_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("HF_HUB_CACHE", "HF_HOME", "OLLAMA_MODELS", "LMSTUDIO_MODELS", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert list_models() == []
