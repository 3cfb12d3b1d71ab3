"""foveal: run, serve, quantize, fine-tune, train and evaluate vision-language models locally.

    import foveal
    vlm = foveal.load("path/to/llava-folder")          # or no argument: the bundled model
    result = vlm.generate([{"role": "user", "content": [
        {"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]}],
        max_tokens=64)
    print(result.text, result.stats)
"""

from .api import VLM, load
from .engine.generate import Chunk, GenerationResult, Stats
from .errors import FovealError

__version__ = "0.1.0"


def image(source) -> dict:
    """A message content part holding an image (path, bytes, base64, data URI or PIL image)."""
    return {"type": "image", "image": source}


def text(value: str) -> dict:
    """A message content part holding text."""
    return {"type": "text", "text": value}


def user(*parts, images=()) -> dict:
    """A user message: `foveal.user("What is this?", images=["cat.png"])`."""
    content = [image(i) for i in images] + [text(p) if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


__all__ = ["load", "VLM", "Chunk", "GenerationResult", "Stats", "FovealError", "image", "text", "user",
           "__version__"]
