"""Model references: turn what a user types into the files on disk that hold the model.

Forms: a local Hugging Face folder (config.json + *.safetensors); a GGUF file (``mmproj=`` for
its projector); a folder of GGUF files; ``hf:ORG/NAME[/FILE.gguf][@REV]`` from the Hugging Face
cache; ``ollama:[[HOST/]NAMESPACE/]NAME[:TAG]`` from the Ollama store; ``lmstudio:PUBLISHER/
REPO[/FILE.gguf]`` from LM Studio's folders. A bare reference that is no existing path is
looked up as ``ORG/NAME`` (HF cache, then LM Studio, then Ollama) or ``NAME[:TAG]`` (Ollama).

Design decisions:
- Resolution finds files and never parses weights; the one exception reads the GGUF header's
  ``general.architecture`` (first key, a few hundred bytes) to tell a projector ("clip") from a
  text model when the file name does not contain "mmproj".
- Stores are read in place, by the layout their own tool writes:
  * HF cache (huggingface.co/docs/hub/local-cache): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``~/.cache/huggingface/hub``; ``models--ORG--NAME/refs/<rev>`` holds a commit id and
    ``snapshots/<commit>/`` holds symlinks into ``blobs/``. Env is read per call, not frozen.
  * Ollama (ollama/ollama server/modelpath.go, images.go, fixblobs.go, internal/manifest):
    ``$OLLAMA_MODELS`` else ``~/.ollama/models``; JSON manifest at ``manifests/HOST/NAMESPACE/
    NAME/TAG`` (defaults registry.ollama.ai, library, latest) with ``layers`` of ``mediaType``,
    ``digest``, ``size``; blob ``sha256:<hex>`` stored as ``blobs/sha256-<hex>`` (older stores:
    the colon form, also read). Layers ``application/vnd.ollama.image.model`` (text GGUF),
    ``.projector`` (mmproj; the first one, as Ollama does), ``.template`` (Go template text),
    ``.system``, ``.params`` (JSON options) fill the result; ``.license`` is ignored.
  * LM Studio (lmstudio.ai/docs/advanced/sideload): ``~/.lmstudio/models/PUBLISHER/REPO/
    *.gguf`` (older ``~/.cache/lm-studio/models``; ``$LMSTUDIO_MODELS`` overrides), the mmproj
    beside the model file.
- A GGUF model is paired with its projector automatically only when unambiguous (one text
  model, at most one projector in the folder); otherwise ConfigError lists the candidates and
  ``mmproj=`` or naming one file chooses. Split files (``-00001-of-00002.gguf``) are one model
  whose path is the first shard. ``list_models`` is lenient instead: one entry per text model.
- Every name taken from a reference or a manifest must match a strict pattern before it becomes
  a path, so ``ollama:../../etc`` or a digest ``sha256:../x`` is refused.
- ``size_bytes`` counts the weight files that will be loaded (safetensors, or GGUF + mmproj).
- The network is touched only with ``allow_download=True`` (huggingface_hub, imported lazily).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from foveal.errors import ConfigError, FovealError, ModelNotFoundError, WeightsError
from foveal.models.registry import GGUF_WITH_VISION

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)  # no "/", no leading dot
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?", re.ASCII)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", re.ASCII)
_GGUF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.gguf", re.ASCII)
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,255}", re.ASCII)
_COMMIT, _DIGEST = re.compile(r"[0-9a-f]{40}"), re.compile(r"sha256:[0-9a-f]{64}")
_SHARD = re.compile(r"(.+)-\d{5}-of-\d{5}\.gguf")
_OLLAMA_DEFAULTS = ("registry.ollama.ai", "library", "latest")
_MEDIA = "application/vnd.ollama.image."
# Never *.bin: foveal does not load pickled weights.
_HF_DOWNLOAD = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


@dataclass
class ResolvedModel:
    kind: str  # "hf" (folder with config.json + safetensors) or "gguf"
    path: Path  # HF folder, or the text-model GGUF (first shard when split)
    mmproj: Path | None  # projector GGUF (kind "gguf"), None if text-only
    name: str  # display name: "llava:7b", "org/name", a folder name
    source: str  # "local" | "hf-cache" | "ollama" | "lmstudio"
    size_bytes: int
    is_vlm: bool  # HF config with vision_config, a GGUF with a projector, or one holding its tower
    template: str | None = None  # chat template found beside it (Ollama template layer)
    system: str | None = None  # default system prompt (Ollama system layer)
    params: dict | None = None  # default options (Ollama params layer: stop, temperature, ...)


def resolve(ref: str | Path, *, mmproj: str | Path | None = None, allow_download: bool = False,
            revision: str | None = None) -> ResolvedModel:
    """What a reference means on this machine; ModelNotFoundError names every place searched."""
    projector = _check_mmproj(Path(mmproj).expanduser()) if mmproj is not None else None
    text = str(ref)
    scheme, _, rest = text.partition(":")
    if isinstance(ref, Path) or scheme not in ("hf", "ollama", "lmstudio"):
        scheme, rest = "", text
    if revision is not None and scheme not in ("hf", ""):
        raise ConfigError(f"revision= applies to Hugging Face references only, not {text!r}")
    if scheme == "hf":
        found = _find_hf(*_parse_hf(rest, revision), allow_download, projector)
    elif scheme == "ollama":
        found = _find_ollama(_parse_ollama(rest), projector)
    elif scheme == "lmstudio":
        found = _find_lmstudio(_parse_lmstudio(rest), projector)
    else:
        found = _find_bare(text, isinstance(ref, Path), revision, allow_download, projector)
    if projector is not None and found.kind != "gguf":
        raise ConfigError(f"mmproj= applies to GGUF models; {found.name} is a Hugging Face folder")
    return found


def list_models() -> list[ResolvedModel]:
    """Everything findable in the HF cache, the Ollama store and LM Studio's folders."""
    found: list[ResolvedModel] = []
    for repo_dir in sorted(_hf_cache_dir().glob("models--*")):
        snapshot = _hf_snapshot(repo_dir, None)
        if snapshot is not None:  # HF caches also hold tokenizer-only and partial repos: skip them
            found += _quietly(lambda: _folder_models(snapshot, "hf-cache", _hf_id(repo_dir)))
    for parts in _ollama_manifests():
        found += _quietly(lambda: [_find_ollama(parts, None)], warn=True)
    for root in _lmstudio_roots():
        for folder in sorted(p for p in root.glob("*/*") if p.is_dir()):
            name = f"{folder.parent.name}/{folder.name}"
            found += _quietly(lambda: _folder_models(folder, "lmstudio", name), warn=True)
    return found


def _quietly(make, warn: bool = False) -> list[ResolvedModel]:
    # One broken entry must not hide the others from `foveal ls`; say why it was skipped.
    try:
        return make()
    except FovealError as error:
        (log.warning if warn else log.debug)("skipping: %s", error)
        return []


def _find_bare(text, is_path, revision, allow_download, projector) -> ResolvedModel:
    path = Path(text).expanduser()
    if path.exists():
        return _find_path(path, projector)
    tried = [f"no file or folder {path}"]
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text \
        or (text.endswith(".gguf") and "/" not in text)
    attempts = [("hf", lambda: _find_hf(*_parse_hf(text, revision), allow_download, projector)),
                ("lmstudio", lambda: _find_lmstudio(_parse_lmstudio(text), projector)),
                ("ollama", lambda: _find_ollama(_parse_ollama(text), projector))]
    if "/" not in text:  # a bare "llava" or "llava:7b" is what an Ollama user types
        attempts.insert(0, attempts.pop())
    for scheme, attempt in [] if is_path or looks_like_path else attempts:
        if revision is not None and scheme != "hf":
            continue
        try:
            return attempt()
        except ModelNotFoundError as error:
            tried.append(str(error))
        except _SyntaxError:
            continue  # not a valid reference of this kind: nothing to search
    raise ModelNotFoundError(f"model {text!r} not found: " + "; ".join(tried))


def _find_path(path: Path, projector: Path | None) -> ResolvedModel:
    source = _store_of(path)
    if path.is_dir():
        return _resolve_folder(path, source, path.name, projector)
    if _gguf_architecture(path) is None:
        raise ConfigError(f"{path} is neither a model folder nor a readable GGUF file")
    return _from_gguf_file(path, source, path.name, projector)


def _store_of(path: Path) -> str:
    # A path inside a store is reported as that store, so `foveal ls` and a path agree.
    roots = [("hf-cache", _hf_cache_dir())] + [("lmstudio", r) for r in _lmstudio_roots()]
    for source, root in roots:
        if path.resolve().is_relative_to(root.resolve()):
            return source
    return "local"


def _resolve_folder(folder: Path, source: str, name: str, projector: Path | None) -> ResolvedModel:
    if (folder / "config.json").is_file():
        return _from_hf_folder(folder, source, name)
    texts, projectors = _scan_gguf(folder)
    if not texts:
        what = f"only projector files ({_names(projectors)})" if projectors else "no model"
        raise ModelNotFoundError(f"{folder} holds {what}: expected config.json + *.safetensors "
                                 "or a GGUF text model")
    if len(texts) > 1:
        raise ConfigError(f"{folder} holds {len(texts)} GGUF models ({_names(g[0] for g in texts)});"
                          " name one file to choose")
    return _gguf_model(texts[0], _pick_projector(projectors, projector, folder), source, name)


def _folder_models(folder: Path, source: str, name: str) -> list[ResolvedModel]:
    """Lenient listing: one entry per text model; a projector is attached only if unambiguous."""
    if (folder / "config.json").is_file():
        return [_from_hf_folder(folder, source, name)]
    texts, projectors = _scan_gguf(folder)
    only = projectors[0] if len(projectors) == 1 else None
    return [_gguf_model(g, only, source, f"{name}/{g[0].name}" if len(texts) > 1 else name,
                        is_vlm=bool(projectors)) for g in texts]


def _from_gguf_file(path: Path, source: str, name: str, projector: Path | None) -> ResolvedModel:
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file {path}")
    texts, projectors = _scan_gguf(path.parent)
    if path in projectors or _gguf_architecture(path) == "clip":
        raise ConfigError(f"{path} is a vision projector (mmproj); give the text model as the "
                          "model and this file as mmproj=")
    shards = next((g for g in texts if path in g), [path])
    return _gguf_model(shards, _pick_projector(projectors, projector, path.parent), source, name)


def _scan_gguf(folder: Path) -> tuple[list[list[Path]], list[Path]]:
    """(text models, each a list of shards; projectors) among the folder's *.gguf files."""
    groups: dict[str, list[Path]] = {}
    for file in sorted(p for p in folder.glob("*.gguf") if p.is_file()):
        shard = _SHARD.fullmatch(file.name)
        groups.setdefault(shard.group(1) if shard else file.name, []).append(file)
    texts, projectors = [], []
    for files in groups.values():  # only a first shard carries the full metadata
        if "mmproj" in files[0].name.lower() or _gguf_architecture(files[0]) == "clip":
            projectors += files
        else:
            texts.append(files)
    return texts, projectors


def _pick_projector(projectors: list[Path], explicit: Path | None, folder: Path) -> Path | None:
    if explicit is not None or len(projectors) <= 1:
        return explicit or (projectors[0] if projectors else None)
    raise ConfigError(f"{folder} holds {len(projectors)} projector files ({_names(projectors)}); "
                      "pass mmproj= to choose one")


def _check_mmproj(path: Path) -> Path:
    if not path.is_file():
        raise ModelNotFoundError(f"mmproj file {path} does not exist")
    arch = _gguf_architecture(path)
    if arch not in (None, "clip"):  # an unreadable file is left for the GGUF reader to explain
        raise ConfigError(f"mmproj {path} is a {arch!r} GGUF, not a projector "
                          "(general.architecture 'clip')")
    return path


def _gguf_model(shards: list[Path], projector: Path | None, source: str, name: str,
                is_vlm: bool | None = None, **extra) -> ResolvedModel:
    size = sum(p.stat().st_size for p in shards + ([projector] if projector else []))
    vlm = projector is not None if is_vlm is None else is_vlm
    if not vlm and projector is None:   # a GGUF that holds its own vision tower (Ollama's mllama)
        vlm = _gguf_architecture(shards[0]) in GGUF_WITH_VISION
    return ResolvedModel("gguf", shards[0], projector, name, source, size, vlm, **extra)


def _from_hf_folder(folder: Path, source: str, name: str) -> ResolvedModel:
    config = _read_json(folder / "config.json", "config")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = ("only pickle *.bin/*.pt weights, which foveal never loads; convert them to "
                "safetensors" if pickled else "incomplete download?")
        raise ModelNotFoundError(f"{folder} has config.json but no *.safetensors ({hint})")
    return ResolvedModel("hf", folder, None, name, source, sum(p.stat().st_size for p in weights),
                         bool(config.get("vision_config")))


def _split_repo(text: str, min_parts: int, expected: str) -> tuple[list[str], str | None]:
    """ORG/NAME[/FILE.gguf] -> (["ORG", "NAME"], FILE.gguf or None), refusing any traversal."""
    parts = text.split("/")
    file = parts.pop() if len(parts) == 3 else None
    if not (min_parts <= len(parts) <= 2 and all(_SEGMENT.fullmatch(p) for p in parts)) \
            or any(".." in p or "--" in p for p in parts) \
            or (file is not None and not _GGUF_NAME.fullmatch(file)):
        raise _SyntaxError(f"malformed reference {text!r}; expected {expected}")
    return parts, file


def _parse_hf(text: str, revision: str | None) -> tuple[str, str | None, str | None]:
    repo, _, rev = text.partition("@")
    parts, file = _split_repo(repo, 1, "ORG/NAME[/FILE.gguf][@REVISION]")
    if rev and revision and rev != revision:
        raise ConfigError(f"{text!r} names revision {rev!r} but revision={revision!r} was given")
    rev = rev or revision
    if rev is not None and (not _REVISION.fullmatch(rev) or ".." in rev):
        raise _SyntaxError(f"malformed revision {rev!r}")
    return "/".join(parts), file, rev


def _find_hf(repo_id, file, revision, allow_download, projector) -> ResolvedModel:
    cache = _hf_cache_dir()
    snapshot = _hf_snapshot(cache / ("models--" + repo_id.replace("/", "--")), revision)
    name = f"{repo_id}/{file}" if file else repo_id

    def from_snapshot(folder: Path) -> ResolvedModel:
        if file:
            return _from_gguf_file(folder / file, "hf-cache", name, projector)
        return _resolve_folder(folder, "hf-cache", name, projector)

    if snapshot is not None:
        try:
            return from_snapshot(snapshot)
        except ModelNotFoundError:
            if not allow_download:  # a partial snapshot: downloading may complete it
                raise
    if not allow_download:
        known = [_hf_id(p) for p in cache.glob("models--*")]
        at = f"@{revision}" if revision else ""
        raise ModelNotFoundError(f"{repo_id}{at} is not in the Hugging Face cache {cache}"
                                 f"{_similar(repo_id, known)}; fetch it with `foveal pull hf:{repo_id}{at}`")
    return from_snapshot(_download_hf(repo_id, revision, file))


def _hf_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"


def _hf_snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if not _COMMIT.fullmatch(commit):
            raise ConfigError(f"{ref} should hold a 40-hex commit id, holds {commit[:60]!r}")
    elif revision and _COMMIT.fullmatch(revision):
        commit = revision
    else:  # no refs/main: a cache filled by commit id; use it when it is the only snapshot
        snapshots = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
        return snapshots[0] if revision is None and len(snapshots) == 1 else None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _hf_id(repo_dir: Path) -> str:
    return repo_dir.name.removeprefix("models--").replace("--", "/")


def _download_hf(repo_id: str, revision: str | None, file: str | None) -> Path:
    """Fetch into the HF cache (pull.py); a GGUF repo only the named file and its mmproj."""
    from .pull import download
    return download(repo_id, revision, [file, "*mmproj*.gguf"] if file else list(_HF_DOWNLOAD))


def _parse_ollama(text: str) -> tuple[str, str, str, str]:
    head, _, last = text.rpartition("/")
    name, _, tag = last.partition(":")
    parts = (head.split("/") if head else []) + [name]
    parts = list(_OLLAMA_DEFAULTS[:3 - len(parts)]) + parts if len(parts) < 3 else parts
    if not (len(parts) == 3 and _HOST.fullmatch(parts[0]) and ".." not in parts[0]
            and all(_SEGMENT.fullmatch(p) for p in parts[1:]) and _TAG.fullmatch(tag or "x")):
        raise _SyntaxError(f"malformed Ollama reference {text!r}; expected "
                           "[[HOST/]NAMESPACE/]NAME[:TAG] of letters, digits, '.', '_', '-'")
    return parts[0], parts[1], parts[2], tag or _OLLAMA_DEFAULTS[2]


def _ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _ollama_name(host: str, namespace: str, name: str, tag: str) -> str:
    """Ollama's short name: "llava:7b", "user/model:tag", "hf.co/org/repo:Q4_K_M"."""
    if host != _OLLAMA_DEFAULTS[0]:
        return f"{host}/{namespace}/{name}:{tag}"
    return f"{name}:{tag}" if namespace == _OLLAMA_DEFAULTS[1] else f"{namespace}/{name}:{tag}"


def _ollama_manifests() -> list[tuple[str, str, str, str]]:
    found = sorted(p for p in (_ollama_root() / "manifests").glob("*/*/*/*") if p.is_file())
    return [tuple(p.parts[-4:]) for p in found]  # type: ignore[misc]


def _find_ollama(parts: tuple[str, str, str, str], projector: Path | None) -> ResolvedModel:
    root, short = _ollama_root(), _ollama_name(*parts)
    manifest = root.joinpath("manifests", *parts)
    if not manifest.is_file():
        known = [_ollama_name(*p) for p in _ollama_manifests()]
        same = [k for k in known if k.rpartition(":")[0] == short.rpartition(":")[0]]
        raise ModelNotFoundError(f"Ollama model {short} not found in {root / 'manifests'}"
                                 f"{_similar(short, known, first=same)}")
    layers: dict[str, dict] = {}  # the first layer of each media type
    for layer in _read_manifest(manifest):
        layers.setdefault(layer["mediaType"].split(";")[0].strip().removeprefix(_MEDIA), layer)
    if "model" not in layers:
        raise ConfigError(f"Ollama manifest {manifest} has no {_MEDIA}model (GGUF) layer; "
                          "models stored as tensor layers are not supported")
    blob = {kind: _ollama_blob(root, layer, short) for kind, layer in layers.items()
            if kind in ("model", "template", "system", "params", "projector")}
    text = {kind: blob[kind].read_text(encoding="utf-8", errors="replace")
            for kind in ("template", "system") if kind in blob}
    params = _read_json(blob["params"], "Ollama params layer") if "params" in blob else None
    return _gguf_model([blob["model"]], projector or blob.get("projector"), "ollama", short,
                       template=text.get("template"), system=text.get("system"), params=params)


def _read_manifest(path: Path) -> list[dict]:
    layers = _read_json(path, "Ollama manifest").get("layers")
    if not isinstance(layers, list) or not all(
            isinstance(x, dict) and isinstance(x.get("mediaType"), str)
            and isinstance(x.get("digest"), str) for x in layers):
        raise ConfigError(f"Ollama manifest {path} has no valid 'layers' list; re-pull the model")
    return layers


def _ollama_blob(root: Path, layer: dict, short: str) -> Path:
    digest = layer["digest"]
    if not _DIGEST.fullmatch(digest):  # it becomes a file name: refuse anything else
        raise ConfigError(f"Ollama model {short}: malformed digest {digest[:80]!r} in its manifest")
    for blob in (root / "blobs" / digest.replace(":", "-"), root / "blobs" / digest):
        if blob.is_file():
            expected, actual = layer.get("size"), blob.stat().st_size
            if isinstance(expected, int) and expected != actual:
                raise WeightsError(f"Ollama blob {digest} of {short} is {actual} bytes, its "
                                   f"manifest says {expected} (partial download?); re-pull it")
            return blob
    raise ModelNotFoundError(f"Ollama model {short}: blob {digest} ({layer['mediaType']}) is "
                             f"missing from {root / 'blobs'}; re-pull with `ollama pull {short}`")


def _lmstudio_roots() -> list[Path]:
    if os.environ.get("LMSTUDIO_MODELS"):
        return [Path(p).expanduser() for p in os.environ["LMSTUDIO_MODELS"].split(os.pathsep) if p]
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def _parse_lmstudio(text: str) -> tuple[list[str], str | None]:
    return _split_repo(text, 2, "PUBLISHER/REPO[/FILE.gguf]")


def _find_lmstudio(ref: tuple[list[str], str | None], projector: Path | None) -> ResolvedModel:
    (publisher, repo), file = ref
    name, roots = f"{publisher}/{repo}", _lmstudio_roots()
    for folder in (root / publisher / repo for root in roots):
        if folder.is_dir() and file:
            return _from_gguf_file(folder / file, "lmstudio", f"{name}/{file}", projector)
        if folder.is_dir():
            return _resolve_folder(folder, "lmstudio", name, projector)
    known = [f"{p.parent.name}/{p.name}" for r in roots for p in r.glob("*/*") if p.is_dir()]
    raise ModelNotFoundError(f"LM Studio model {name} not found in "
                             f"{', '.join(map(str, roots))}{_similar(name, known)}")


class _SyntaxError(ConfigError):
    """A reference that is not valid for one scheme (a bare reference then tries the others)."""


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{what} {path} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} should hold a JSON object")
    return data


def _names(paths) -> str:
    return ", ".join(p.name for p in paths)


def _similar(name: str, known: list[str], first=()) -> str:
    close = list(dict.fromkeys([*first, *difflib.get_close_matches(name, known, 5, 0.5)]))
    return f" (similar: {', '.join(close[:5])})" if close else " (nothing similar there)"


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _gguf_architecture(path: Path, max_keys: int = 64) -> str | None:
    """general.architecture of a GGUF file ("" if absent); None if it is not a readable GGUF.

    Reads the key/value header only up to that key, which GGUF writers put first.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            order = "<" if struct.unpack("<I", f.read(4))[0] < 0x10000 else ">"  # big-endian file
            kv_count = struct.unpack(order + "QQ", f.read(16))[1]
            for _ in range(min(kv_count, max_keys)):
                key, kind = _gguf_string(f, order), struct.unpack(order + "I", f.read(4))[0]
                if key == "general.architecture" and kind == _STRING:
                    return _gguf_string(f, order)
                _skip_gguf_value(f, kind, order)
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return None
    return ""


def _gguf_string(f, order: str) -> str:
    length = struct.unpack(order + "Q", f.read(8))[0]
    if length > 1 << 20:
        raise ValueError("absurd GGUF string length")
    return f.read(length).decode("utf-8")


def _skip_gguf_value(f, kind: int, order: str) -> None:
    if kind in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[kind], 1)
    elif kind == _STRING:
        f.seek(struct.unpack(order + "Q", f.read(8))[0], 1)
    elif kind == _ARRAY:
        item, count = struct.unpack(order + "IQ", f.read(12))
        if item in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[item] * count, 1)
        elif item == _STRING and count < 1 << 22:  # e.g. a vocabulary written before the arch key
            for _ in range(count):
                f.seek(struct.unpack(order + "Q", f.read(8))[0], 1)
        else:
            raise ValueError("unexpected GGUF array")
    else:
        raise ValueError(f"unknown GGUF value type {kind}")
