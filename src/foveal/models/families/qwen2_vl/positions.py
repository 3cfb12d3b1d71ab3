"""M-RoPE positions for Qwen2-VL / Qwen2.5-VL / Qwen3-VL prompts, and the cos/sin they rotate by.

Mirrors transformers 5.25 `Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index` /
`Qwen3VLModel.get_rope_index` and the text rotary classes' `recomposition_frequencies`.

Design decisions
- Positions are (3, T): temporal, height, width. A text token has the same value in all three;
  a vision token (t, r, c) of a block starting at position s gets (s + t*interval, s + r, s + c).
  The text after a vision block continues at s + max(h, w) / merge, as transformers 5.25 does
  (older transformers and the Qwen reference used the block's max + 1, which differs for a video
  with more time steps than rows / columns, and for any Qwen2.5-VL video with time spacing).
- The decode position of generated token i is one scalar, T + i + rope_delta, for all three rows;
  rope_delta = max(positions) + 1 - T, as HF's mrope_position_deltas.
- Vision blocks are the runs of image / video placeholder tokens (5.25 reads them from the
  processor's mm_token_type_ids, which marks exactly those tokens). A run is cut into grids by the
  grids' token counts, so two blocks with nothing between them still get one grid each (HF would
  read them as one block); any disagreement between the runs and the grids is a PromptError.
- Qwen2.5-VL spaces video time steps by tokens_per_second * second_per_grid_t (float32, truncated,
  as HF); Qwen3-VL gives every video frame its own block (the processor puts a timestamp before
  each) with time spacing 1.
"""

from __future__ import annotations

import torch

from foveal.errors import ConfigError, PromptError
from foveal.models.families.qwen2_vl.config import KINDS
from foveal.models.families.qwen2_vl.vision import check_grid


def rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, *, spatial_merge_size: int,
               image_token_id: int, video_token_id: int, kind: str = "qwen2_vl",
               second_per_grid_ts=None, tokens_per_second: int = 4) -> tuple[torch.Tensor, int]:
    """One prompt's input_ids (T,) -> (positions (3, T) long, rope_delta).

    image_grid_thw / video_grid_thw: (n, 3) grids of the prompt's images / videos in order (the
    vision tower's patch grids, before merging). second_per_grid_ts: one per video (Qwen2.5-VL;
    1.0 each when absent, as HF).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown Qwen-VL kind {kind!r} (known: {', '.join(KINDS)})")
    ids = torch.as_tensor(input_ids).reshape(-1).tolist() if not isinstance(input_ids, list) else list(input_ids)
    grids = {1: _grids(image_grid_thw, spatial_merge_size), 2: _grids(video_grid_thw, spatial_merge_size)}
    if kind == "qwen3_vl":  # one block per frame, time from the timestamp text between them
        grids[2] = [(1, h, w) for t, h, w in grids[2] for _ in range(t)]
    intervals = [1] * len(grids[2])
    if kind == "qwen2_5_vl":
        if second_per_grid_ts is None:
            intervals = [tokens_per_second * 1] * len(grids[2])
        else:
            seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).reshape(-1)
            if len(seconds) != len(grids[2]):
                raise PromptError(f"second_per_grid_ts has {len(seconds)} values for {len(grids[2])} videos")
            intervals = [tokens_per_second * s for s in seconds]  # 0-d float32 tensors, as in HF
    kinds = [1 if i == image_token_id else 2 if i == video_token_id else 0 for i in ids]
    used = {1: 0, 2: 0}
    pieces, pos, start = [], 0, 0
    m2 = spatial_merge_size ** 2
    for end in range(1, len(ids) + 1):
        if end < len(ids) and kinds[end] == kinds[start]:
            continue
        modality, length = kinds[start], end - start
        if modality == 0:
            pieces.append(torch.arange(length).view(1, -1).expand(3, -1) + pos)
            pos += length
        while modality and length:
            name = "image" if modality == 1 else "video"
            if used[modality] >= len(grids[modality]):
                raise PromptError(f"the prompt has more {name} placeholder tokens than its "
                                  f"{len(grids[modality])} {name} grid(s) account for")
            t, h, w = grids[modality][used[modality]]
            need = t * h * w // m2
            if need > length:
                raise PromptError(f"{name} {used[modality]} with grid {[t, h, w]} needs {need} placeholder "
                                  f"tokens but its run in the prompt has {length}")
            interval = 1 if modality == 1 else intervals[used[modality]]
            pieces.append(_block(pos, t, h // spatial_merge_size, w // spatial_merge_size, interval))
            pos += max(h, w) // spatial_merge_size
            used[modality] += 1
            length -= need
        start = end
    for modality, name in ((1, "image"), (2, "video")):
        if used[modality] != len(grids[modality]):
            raise PromptError(f"{len(grids[modality])} {name} grid(s) given but the prompt's placeholder "
                              f"tokens account for {used[modality]}")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def _grids(grid_thw, merge: int) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    grid = torch.as_tensor(grid_thw)
    if grid.numel() == 0:
        return []
    return check_grid(grid.reshape(-1, 3) if grid.dim() == 1 else grid, merge)


def _block(start: int, t: int, h: int, w: int, interval) -> torch.Tensor:
    """(3, t*h*w) positions of one vision block (HF get_vision_position_ids)."""
    temporal = (torch.arange(t) * interval).long()
    tt, hh, ww = torch.meshgrid(temporal, torch.arange(h) + start, torch.arange(w) + start, indexing="ij")
    block = torch.stack([tt, hh, ww]).reshape(3, -1)
    block[0] += start  # after the interval multiply, as HF
    return block


def decode_positions(prompt_len: int, rope_delta: int, steps: int, start: int = 0) -> torch.Tensor:
    """(steps,) scalar positions of generated tokens start..start+steps-1 (the same in all 3 rows)."""
    return torch.arange(start, start + steps) + prompt_len + rope_delta


def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype=torch.float32,
                  interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (3, T) -> cos, sin (T, head_dim) for q * cos + rotate_half(q) * sin.

    Qwen2/2.5-VL (apply_multimodal_rotary_pos_emb): the head_dim/2 frequencies are cut into
    sections (t, h, w), section i taking its angles from position row i % 3; then doubled.
    Qwen3-VL (interleaved): frequency j takes row 1 if j % 3 == 1 and j < 3*h_section, row 2 if
    j % 3 == 2 and j < 3*w_section, else row 0.
    A (T,) position tensor (text decode) is broadcast to the three rows.
    """
    section = list(mrope_section)
    if sum(section) != inv_freq.shape[-1]:
        raise ConfigError(f"mrope_section {section} sums to {sum(section)}, not the {inv_freq.shape[-1]} "
                          f"rotary frequencies of the head")
    if positions.dim() == 1:
        positions = positions.expand(3, -1)
    freqs = positions[..., None].float() * inv_freq.float().to(positions.device)  # (3, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = (_interleave(f, section) if interleaved else _sections(f, section) for f in (cos, sin))
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([sin, sin], dim=-1).to(dtype)


def _sections(freq: torch.Tensor, section: list[int]) -> torch.Tensor:
    return torch.cat([part[i % 3] for i, part in enumerate(freq.split(section, dim=-1))], dim=-1)


def _interleave(freq: torch.Tensor, section: list[int]) -> torch.Tensor:
    out = freq[0].clone()
    for row in (1, 2):
        idx = slice(row, section[row] * 3, 3)
        out[..., idx] = freq[row, ..., idx]
    return out
