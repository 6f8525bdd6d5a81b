"""Prompt encoding with a CLIP text encoder, as Stable Diffusion conditions its U-Net."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's context length (B, L). A prompt longer than that is
    truncated with a warning that shows the words dropped."""
    max_len = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt").input_ids
    full = tokenizer(prompts, padding=False, truncation=False).input_ids
    for prompt, toks in zip(prompts, full):
        if len(toks) > max_len:
            # keep = max_len - 2 content tokens (start and end tokens take the other two)
            dropped = tokenizer.decode(toks[max_len - 1:-1])
            log.warning("prompt is longer than the text encoder's %d tokens; dropped the end: %r "
                        "(prompt: %r)", max_len, dropped, prompt)
    return ids


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """The text encoder's last hidden states for each prompt, (B, L, D), in float32."""
    ids = tokenize(tokenizer, prompts).to(device or text_encoder.device)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).long()
    return text_encoder(ids, attention_mask=mask)[0].float()
