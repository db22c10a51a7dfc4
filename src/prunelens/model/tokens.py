"""Token plumbing shared by every forward: chat rendering, prompt encoding, padding, EOS and pad ids.

Instruct models get their chat template (a single user turn, or the few-shot turns given) unless
disabled: without it, answers of chat-tuned models are mostly formatting failures, not the model's
knowledge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel

Message = dict[str, str]


def render(tokenizer: Any, turns: Sequence[Message], chat_template: bool = True) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's reply.

    Without a chat template (or with it disabled) the turns are joined as plain text: user turns as
    they are, assistant turns after a space, separated by blank lines.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    parts = [t["content"] if t["role"] != "assistant" else " " + t["content"] for t in turns]
    text = "".join(p if i == 0 or parts[i].startswith(" ") else "\n\n" + p for i, p in enumerate(parts))
    return tokenizer(text)["input_ids"]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
    """Token ids per prompt; instruct models get their chat template (with generation prompt)."""
    use_chat = chat_template and getattr(tokenizer, "chat_template", None)
    out = []
    for p in prompts:
        if use_chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"]
        if not ids:
            raise PrunelensError("a prompt encodes to zero tokens")
        out.append(list(ids))
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device,
              left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to one width, and the mask of real tokens. Left padding lines up the last
    tokens (for decoding from a cache); right padding keeps positions 0.. (for scoring whole rows)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols] = torch.tensor(s, dtype=torch.long)
        mask[r, cols] = 1
    return ids.to(device), mask.to(device)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(seqs, pad_id, device, left=True)


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(seqs, pad_id, device, left=False)


def eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for src in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def pad_id(lm: LoadedModel) -> int:
    """Token used to fill padded positions (never attended): the pad token, else an EOS token."""
    pad = lm.tokenizer.pad_token_id
    return pad if pad is not None else min(eos_ids(lm), default=0)
