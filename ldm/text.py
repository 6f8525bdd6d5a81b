"""Prompt encoding with a CLIP text encoder, as Stable Diffusion conditions its U-Net."""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)


def expand_concepts(tokenizer, prompt: str) -> str:
    """A multi-vector textual-inversion token ``T`` (one with ``T_1`` in the vocabulary) written as
    ``T T_1 .. T_{n-1}`` (ldm.embeddings); other text unchanged."""
    added = tokenizer.get_added_vocab()
    if not any(f"{t}_1" in added for t in added):  # no multi-vector concept: nothing to expand
        return prompt
    for tok in dict.fromkeys(t for t in tokenizer.tokenize(prompt) if t in added):
        n = 1
        while f"{tok}_{n}" in added:
            n += 1
        if n > 1:
            prompt = re.sub(re.escape(tok) + r"(?!_\d)", " ".join([tok] + [f"{tok}_{i}" for i in range(1, n)]), prompt)
    return prompt


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's context length (B, L). A prompt longer than that is
    truncated with a warning that shows the words dropped. Multi-vector concepts are expanded first."""
    max_len = tokenizer.model_max_length
    prompts = [expand_concepts(tokenizer, p) for p in prompts]
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


def text_states(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """The text encoder's last hidden states for each prompt, (B, L, D), in float32, with autograd
    (textual inversion trains through this)."""
    config = getattr(text_encoder, "module", text_encoder).config  # under DDP the model is .module
    ids = tokenize(tokenizer, prompts).to(device or next(text_encoder.parameters()).device)
    mask = None
    if getattr(config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).long()
    return text_encoder(ids, attention_mask=mask)[0].float()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """``text_states`` without autograd: what generation conditions on."""
    return text_states(tokenizer, text_encoder, prompts, device)


@torch.no_grad()
def encode_sdxl(encoders: list[tuple[object, torch.nn.Module]], prompts: list[list[str]], device=None):
    """SDXL's text conditioning (Podell et al. 2023): each encoder's penultimate hidden states,
    concatenated on the last axis (B, L, D1 + D2), and the last encoder's pooled, projected output
    (B, P), the U-Net's ``text_embeds``. ``prompts[i]`` goes to encoder i (the refiner has one)."""
    states, pooled = [], None
    for (tokenizer, encoder), texts in zip(encoders, prompts):
        ids = tokenize(tokenizer, texts).to(device or next(encoder.parameters()).device)
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, P)
            pooled = out[0]
        states.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL conditioning needs a CLIPTextModelWithProjection as its last text encoder")
    return torch.cat(states, dim=-1).float(), pooled.float()
