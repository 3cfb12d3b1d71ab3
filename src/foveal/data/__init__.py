"""foveal.data: the synthetic shapes world the bundled model learns from.

    from foveal.data import WorldConfig, generate, write_dataset
    for ex in generate(1000, seed=0):        # Example(scene, image, captions, questions)
        ...
    write_dataset("data/train", n=20000, seed=0)   # images/ + LLaVA, VQAv2, POPE files

Also runnable: `python -m foveal.data OUT_DIR --n 1000 --seed 0`. See world.py for the
world's rules, language.py for the question types, export.py for the file formats.
"""

from foveal.data.dataset import Example, generate, scene_documents, text_corpus
from foveal.data.export import (
    export_llava,
    export_pope,
    export_vqa,
    llava_record,
    pope_records,
    vqa_records,
    write_dataset,
)
from foveal.data.language import Question, canonical_caption, captions, make_questions
from foveal.data.render import png_bytes, render, text_boxes
from foveal.data.world import (
    COLORS,
    POPE_CATEGORIES,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    WorldConfig,
    make_scene,
    object_prior,
    world_words,
)

__all__ = [
    "COLORS", "POPE_CATEGORIES", "QUESTION_TYPES", "SHAPES", "SIZES",
    "Example", "Question", "Scene", "ShapeObject", "WorldConfig",
    "canonical_caption", "captions", "export_llava", "export_pope", "export_vqa", "generate",
    "llava_record", "make_questions", "make_scene", "object_prior", "png_bytes", "pope_records",
    "render", "scene_documents", "text_boxes", "text_corpus", "vqa_records", "world_words", "write_dataset",
]
