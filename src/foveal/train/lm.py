"""`foveal train lm`: a tokenizer and a small Llama-style decoder pretrained on plain text.

Design decisions:
- The tokenizer is byte-level BPE trained with the `tokenizers` library, so any text encodes;
  special tokens `<unk> <s> </s> <pad> <image>` take ids 0-4 (the layout of the bundled
  model, whose chat template comes with it), and `<s>` is added in front of every encoding.
- The corpus is plain text, one document a line, or JSON lines (`.jsonl`), one `{"text": ...}`
  document a line whose text may span several lines (the scene documents of `foveal.data`).
- Documents are wrapped as `<s> text </s>` and packed into fixed-length blocks:
  no padding, every token is a target.
- The result is an HF-format `LlamaForCausalLM` folder (config.json, safetensors, tokenizer,
  chat template) that loads in foveal and transformers and is the LM a VLM is assembled from.
- Same optimizer, schedule, precision and plot as the VLM stages (trainer.py); no DDP or resume
  here: this stage takes minutes on the synthetic corpus.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.thinking import THINK_CLOSE, THINK_OPEN
from ..errors import ConfigError
from ..eval.datasets import SHORT_ANSWER
from .datasets import IGNORE_INDEX, DatasetError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass
class LMConfig:
    corpus: str
    output_dir: str
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 256
    batch_size: int = 16
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    precision: str = "auto"
    seed: int = 0
    tokenizer: str | None = None         # an existing tokenizer.json to reuse instead of training one
    whole_documents: bool = False        # blocks of whole documents, padded, instead of one packed stream
    minutes: float | None = None         # time budget: the schedule decays by time too and ends with it
    progress: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError("hidden-size must divide by heads, and heads by kv-heads")
        if self.vocab_size < 300:
            raise ConfigError(f"vocab-size must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")
        if self.seq_len < 16 or self.batch_size < 1:
            raise ConfigError("seq-len must be >= 16 and batch-size >= 1")


def read_corpus(path: Path) -> list[str]:
    """The corpus's documents: one a line, or from a `.jsonl` file each line's "text"."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"corpus file {path} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise DatasetError(f"corpus file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path} line {number} is not JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DatasetError(f'{path} line {number}: expected an object with a "text" string')
            docs.append(record["text"].strip())
        lines = docs
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"corpus file {path} has no text")
    return lines


def train_tokenizer(lines: list[str], vocab_size: int) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # The chat template's role markers ("USER: ... ASSISTANT: ...") are in every training sequence but
    # not in the corpus: without these lines BPE leaves them as ~15 single-byte tokens per turn. So is,
    # in a share of the questions, LLaVA's short-answer instruction: left out, it cost ~30 byte tokens
    # each time, a quarter of every instruct sequence.
    sentences = [s for doc in lines[:: max(1, len(lines) // 10000)] for s in doc.splitlines() if s.strip()]
    sample = sentences[:: max(1, len(sentences) // 10000)]
    instruction = "\n" + SHORT_ANSWER
    roles = [f"USER: {line}{instruction if i % 2 else ''} ASSISTANT: {line}" for i, line in enumerate(sample)]
    tok.train_from_iterator(list(lines) + roles, trainer)
    if any(THINK_OPEN in line for line in lines):
        # A thought's tags as one token each, after the merges (so ids 0-4 keep their places): as byte
        # pieces they cost ~7 tokens a tag in a 512-token vocabulary. Not special, so decoding keeps
        # them for engine/thinking.py to split the thought off, as Qwen3's tokenizer does.
        # THINK_OPEN takes the space in front of it (lstrip), which the chat template puts after
        # "ASSISTANT:": one token instead of two. (Before that space moved into the {% generation %} span,
        # a space token of its own was never a target, and a model never learnt to write the tag.)
        tok.add_tokens([AddedToken(THINK_OPEN, lstrip=True, normalized=False),
                        AddedToken(THINK_CLOSE, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def pack(lines: list[str], tokenizer_json: str, seq_len: int, whole_documents: bool = False) -> torch.Tensor:
    """Documents -> (N, seq_len + 1) blocks of `<s> doc </s> <s> doc </s> ...`.

    whole_documents: every block starts at a document and holds only whole ones, the rest padded
    with IGNORE_INDEX, which the loss skips (a document longer than a block is cut). A question then
    never loses the captions before it to a block boundary, at the cost of the padding."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    eos = tok.token_to_id("</s>")
    docs = [enc.ids + [eos] for enc in tok.encode_batch(lines)]
    if whole_documents:
        blocks, block = [], []
        for doc in docs:
            if block and len(block) + len(doc) > seq_len + 1:
                blocks.append(block + [IGNORE_INDEX] * (seq_len + 1 - len(block)))
                block = []
            block += doc[:seq_len + 1]
        blocks.append(block + [IGNORE_INDEX] * (seq_len + 1 - len(block)))
        return torch.tensor(blocks)
    stream = [i for doc in docs for i in doc]
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise DatasetError(f"the corpus has {len(stream)} tokens, fewer than one block of --seq-len {seq_len}")
    data = torch.tensor(stream[:n * seq_len + 1])
    return torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])


def train_lm(cfg: LMConfig):
    from ..bundled import CHAT_TEMPLATE
    from ..config import RopeConfig, TextConfig, VLMConfig
    from ..models.vlm import VisionLanguageModel
    from ..weights.save import save_checkpoint
    from .plot import plot_losses
    from .trainer import TrainResult, _progress, budget_lr_factor
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    lines = read_corpus(Path(cfg.corpus))
    tokenizer_json = Path(cfg.tokenizer).read_text() if cfg.tokenizer else train_tokenizer(lines, cfg.vocab_size)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if any(v is None for v in ids.values()):
        raise ConfigError(f"the tokenizer lacks special tokens {[t for t, v in ids.items() if v is None]}")
    blocks = pack(lines, tokenizer_json, cfg.seq_len, cfg.whole_documents)
    text = TextConfig(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                      head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=max(2048, cfg.seq_len),
                      rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), tie_word_embeddings=True,
                      bos_token_id=ids["<s>"], eos_token_id=[ids["</s>"]], pad_token_id=ids["<pad>"])
    mcfg = VLMConfig(text=text, layout="text", architecture="LlamaForCausalLM")
    model = VisionLanguageModel(mcfg)
    model.tie_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.language_model.init_rope()
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    per_epoch = max(1, len(blocks) // cfg.batch_size)
    total = cfg.max_steps or max(1, int(per_epoch * cfg.epochs))
    warmup = int(round(cfg.warmup_ratio * total))
    from ..api import default_dtype
    precision = {"auto": default_dtype("cpu"), "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision]
    autocast = torch.autocast("cpu", dtype=precision) if precision != torch.float32 else nullcontext()
    bar = _progress(total, 0, cfg.progress)
    history, t0 = [], time.perf_counter()
    pos = torch.arange(cfg.seq_len)
    budget_s = cfg.minutes * 60 if cfg.minutes else None
    for step in range(total):
        spent = time.perf_counter() - t0
        if budget_s and spent >= budget_s:
            total = step
            break
        factor = budget_lr_factor(step, total, warmup, spent, budget_s)
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        batch = blocks[perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]]       # (B, seq_len + 1)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * factor
        with autocast:
            hidden = model.language_model(model.language_model.embed_tokens(batch[:, :-1].clamp(min=0)), pos)
            logits = model.lm_head(hidden).float()                                # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        rate = (step + 1) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
        history.append({"step": step + 1, "loss": value, "tokens_per_s": round(rate, 1)})
        bar.update(step + 1, value, factor, rate / cfg.seq_len)
    bar.close()
    elapsed = time.perf_counter() - t0
    model.eval()
    save_checkpoint(model, mcfg, out, tokenizer_json=tokenizer_json,
                    tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                      "pad_token": "<pad>", "image_token": "<image>",
                                      "tokenizer_class": "PreTrainedTokenizerFast"},
                    chat_template=CHAT_TEMPLATE)
    (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    plot_losses([h["step"] for h in history], [h["loss"] for h in history], out / "loss.png", "foveal train lm")
    print(f"trained {total} steps ({total * cfg.batch_size * cfg.seq_len / elapsed:.0f} tokens/s); wrote {out}",
          file=sys.stderr)
    result = TrainResult(out, [h["step"] for h in history], [h["loss"] for h in history], True, out)
    result.steps_per_s = total / elapsed
    result.examples_per_s = total * cfg.batch_size / elapsed
    return result
