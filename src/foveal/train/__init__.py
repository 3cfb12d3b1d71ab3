"""foveal.train: LLaVA-style training stages, LoRA in PEFT's format, resumable checkpoints, DDP.

    from foveal.train import TrainConfig, train
    result = train(TrainConfig(stage="align", model="base/", data="llava_captions.json",
                               output_dir="runs/align"))
    result.losses, result.model_dir

CLI: `foveal train align|instruct|merge ...`; under `torchrun --nproc_per_node N -m foveal.cli
train ...` the same command runs DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from .datasets import IGNORE_INDEX, ConversationDataset, DatasetError, read_records, tokenize
from .lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, merge_adapter, merge_lora, save_adapter
from .trainer import STAGES, TrainConfig, Trainer, TrainResult, train

__all__ = [
    "IGNORE_INDEX", "STAGES", "ConversationDataset", "DatasetError", "LoRAConfig", "LoRALinear", "TrainConfig",
    "TrainResult", "Trainer", "apply_lora", "load_adapter", "merge_adapter", "merge_lora", "read_records",
    "save_adapter", "tokenize", "train",
]
