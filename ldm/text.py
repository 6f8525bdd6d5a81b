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


def encode_sdxl(encoders: list[tuple[object, torch.nn.Module]], prompts: list[list[str]], device=None,
                grad: bool = False):
    """SDXL's text conditioning (Podell et al. 2023): each encoder's penultimate hidden states,
    concatenated on the last axis (B, L, D1 + D2), and the last encoder's pooled, projected output
    (B, P), the U-Net's ``text_embeds``. ``prompts[i]`` goes to encoder i (the refiner has one).
    ``grad``: with autograd (training text encoders)."""
    states, pooled = [], None
    with torch.set_grad_enabled(grad):
        for (tokenizer, encoder), texts in zip(encoders, prompts):
            ids = tokenize(tokenizer, texts).to(device or next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, P)
                pooled = out[0]
            states.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL conditioning needs a CLIPTextModelWithProjection as its last text encoder")
    return torch.cat(states, dim=-1).float(), pooled.float()


def size_ids(model, height: int, width: int, *, original: tuple[int, int] | None = None,
             crop: tuple[int, int] = (0, 0), negative: bool = False) -> list[float]:
    """SDXL's size conditioning, one row of ``time_ids``: original size (H, W), crop top-left (y, x) and
    target size; for the refiner original size, crop and an aesthetic score (6 for the prompt, 2.5 for
    the negative, diffusers' defaults)."""
    oh, ow = original or (height, width)
    if model.requires_aesthetics_score:
        return [oh, ow, *crop, 2.5 if negative else 6.0]
    return [oh, ow, *crop, height, width]


def text_context(model, texts: list[str], texts_2: list[str] | None = None, *, sizes: list[list[float]] | None = None,
                 negative: bool = False, like: dict | None = None, grad: bool = False) -> dict:
    """The U-Net's conditioning for ``texts`` (one per sample), as generation and training both build it:
    ``encoder_hidden_states``, and for SDXL ``text_embeds`` and ``time_ids`` (``sizes``: one size_ids row
    per sample; None leaves ``time_ids`` out, for a cache of prompts; ``texts_2`` for the second
    encoder, default the same). A negative context of empty
    prompts is zeros shaped ``like`` the positive one where the model says force_zeros_for_empty_prompt."""
    if not getattr(model, "is_sdxl", False):
        states = text_states(model.tokenizer, model.text_encoder, texts, model.device) if grad else \
            encode_prompts(model.tokenizer, model.text_encoder, texts, model.device)
        return {"encoder_hidden_states": states}
    texts_2 = texts if texts_2 is None else texts_2
    if negative and model.force_zeros_for_empty_prompt and not any(texts) and not any(texts_2):
        ctx = {k: torch.zeros_like(like[k]) for k in ("encoder_hidden_states", "text_embeds")}
    else:
        hidden, pooled = encode_sdxl(model.text_encoders(), [texts, texts_2], device=model.device, grad=grad)
        ctx = {"encoder_hidden_states": hidden, "text_embeds": pooled}
    if sizes is not None:
        ctx["time_ids"] = torch.tensor(sizes, dtype=torch.float32)  # (B, 5 or 6)
    return ctx
