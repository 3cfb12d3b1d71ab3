"""`foveal pull`: fetch a model from the Hugging Face Hub into the normal HF cache.

Design decisions:
- huggingface_hub's `snapshot_download` does the work (the optional `hub` extra, imported lazily):
  it writes the cache layout `resolve.py` reads (refs/, snapshots/, blobs/), resumes a partial
  file from where it stopped, shows progress bars and honours HF_ENDPOINT, HF_HOME,
  HF_HUB_CACHE and HF_TOKEN. After a pull, `foveal.load("hf:ORG/NAME")` finds the model offline.
- The reference is the one `resolve` takes (`hf:ORG/NAME[/FILE.gguf][@REV]` or bare `ORG/NAME`),
  parsed by the same code, so what can be pulled can be loaded.
- By default only what loading reads is fetched (config, tokenizer, template, safetensors; for a
  GGUF file, that file and the repo's mmproj); `include` globs replace that set.
- huggingface_hub's exceptions become ModelNotFoundError / FovealError with a message saying
  what to do: an unknown or gated repo, an unknown revision, no connection.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FovealError, ModelNotFoundError
from .resolve import _HF_DOWNLOAD, _hf_cache_dir, _parse_hf


def parse_ref(ref: str, revision: str | None = None) -> tuple[str, str | None, str | None]:
    """(repo_id, GGUF file or None, revision or None) from `hf:ORG/NAME[/FILE.gguf][@REV]` or `ORG/NAME...`."""
    text = ref.removeprefix("hf:")
    if text.count("/") not in (1, 2):
        raise FovealError(f"cannot pull {ref!r}: expected hf:ORG/NAME (or ORG/NAME), optionally /FILE.gguf and "
                          f"@REVISION")
    return _parse_hf(text, revision)


def pull(ref: str, revision: str | None = None, include: list[str] | None = None) -> Path:
    """Download into the HF cache; returns the snapshot folder."""
    repo_id, file, revision = parse_ref(ref, revision)
    patterns = list(include) if include else ([file, "*mmproj*.gguf"] if file else list(_HF_DOWNLOAD))
    return download(repo_id, revision, patterns)


def download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                           LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise FovealError(f"downloading {repo_id} needs huggingface_hub: pip install 'foveal[hub]' "
                          f"(or pip install huggingface_hub)") from None
    endpoint = constants.ENDPOINT
    at = f"@{revision}" if revision else ""
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=_hf_cache_dir(),
                                                   allow_patterns=patterns)
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated on {endpoint}: accept its terms on the model page, then log "
                                 f"in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {repo_id} on {endpoint} (check the name; a private repo needs "
                                 f"`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r} on {endpoint}") from None
    except LocalEntryNotFoundError:   # an EntryNotFoundError: first
        raise FovealError(f"cannot reach {endpoint} to download {repo_id}{at}, and it is not in the cache "
                          f"{_hf_cache_dir()}: check the network (or HF_ENDPOINT, HF_HUB_OFFLINE)") from None
    except EntryNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id}{at}: a file is missing on {endpoint}: {e}") from None
    except HfHubHTTPError as e:
        raise FovealError(f"downloading {repo_id}{at} from {endpoint} failed: {e}") from None
    except OSError as e:     # disk full, permissions
        raise FovealError(f"downloading {repo_id}{at} into {_hf_cache_dir()} failed: {e}") from None
    return Path(folder)
