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


# --- A1111's prompt syntax: emphasis, chunks, clip skip ---------------------------------------------

def _hidden(out, encoder, layer: str, clip_skip: int) -> torch.Tensor:
    """The states a model conditions on, counted as A1111 counts ``clip_skip`` (1 = the usual layer):
    ``last`` (SD 1.x, 2.x): the final states, or with clip_skip N > 1 the states N layers from the end
    through the final layer norm (diffusers' clip_skip = N - 1); ``penultimate`` (SDXL): the states N
    layers before the last, without the final norm."""
    if layer != "penultimate" and clip_skip <= 1:
        return out.last_hidden_state
    layers = getattr(encoder, "module", encoder).config.num_hidden_layers
    most = layers if layer == "penultimate" else layers + 1
    if clip_skip > most:
        from .locate import ModelError

        raise ModelError(f"clip_skip {clip_skip}: this text encoder has {layers} layer(s), so clip_skip can be "
                         f"at most {most}")
    if layer == "penultimate":
        return out.hidden_states[-(clip_skip + 1)]
    inner = getattr(encoder, "text_model", encoder)
    return inner.final_layer_norm(out.hidden_states[-clip_skip])


def encode_weighted(tokenizer, encoder, prompts: list[str], *, layer: str = "last", clip_skip: int = 1,
                    device=None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each prompt read as A1111 reads it (ldm.prompts): emphasis weights and BREAKs parsed, the
    tokens split into chunks of the context length less the start and end tokens, each chunk encoded
    on its own, its states scaled by the token weights and rescaled to the chunk's original mean
    (A1111's default emphasis), the chunks concatenated. Returns one (1, chunks x L, D) tensor per prompt
    and, for a projection encoder, the pooled (B, P) output of each prompt's first chunk. A prompt of
    one chunk without weights gives exactly the plain tokenisation's states."""
    from .prompts import chunk_tokens, parse_attention

    L = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer(",", add_special_tokens=False).input_ids
    comma = comma[0] if len(comma) == 1 else None
    ids, weights, owner = [], [], []
    for i, prompt in enumerate(prompts):
        parsed = parse_attention(expand_concepts(tokenizer, prompt))
        pieces = [([], -1.0) if w == -1 else (tokenizer(t, add_special_tokens=False).input_ids if t else [], w)
                  for t, w in parsed]
        for toks, ws in chunk_tokens(pieces, L - 2, comma):
            ids.append([bos] + toks + [eos] + [pad] * (L - 2 - len(toks)))
            weights.append([1.0] + ws + [1.0] * (L - 1 - len(toks)))
            owner.append(i)
    dev = device or next(encoder.parameters()).device
    ids_t = torch.tensor(ids, device=dev)
    config = getattr(encoder, "module", encoder).config
    mask = (ids_t != pad).long() if getattr(config, "use_attention_mask", False) else None
    with torch.no_grad():
        out = encoder(ids_t, attention_mask=mask, output_hidden_states=True)
        z = _hidden(out, encoder, layer, clip_skip).float()  # (chunks, L, D)
        w = torch.tensor(weights, dtype=torch.float32, device=z.device)
        weighted = (w != 1).any(dim=1)
        if weighted.any():
            zw = z * w[..., None]
            scale = z.mean(dim=(1, 2), keepdim=True) / zw.mean(dim=(1, 2), keepdim=True)
            z = torch.where(weighted[:, None, None], zw * scale, z)
    pooled = None
    if getattr(out, "text_embeds", None) is not None:
        first = [owner.index(i) for i in range(len(prompts))]
        pooled = out.text_embeds[first].float()
    states = [torch.cat([z[k] for k in range(len(owner)) if owner[k] == i])[None] for i in range(len(prompts))]
    return states, pooled


def prompt_context(model, texts: list[str], texts_2: list[str] | None = None, *, clip_skip: int = 1) -> list[dict]:
    """One context per text (A1111's prompt syntax, ``encode_weighted``): ``encoder_hidden_states``
    (1, chunks x L, D) and for SDXL ``text_embeds`` (1, P); sequences of different chunk counts are
    made equal by ``pad_contexts``."""
    if not getattr(model, "is_sdxl", False):
        states, _ = encode_weighted(model.tokenizer, model.text_encoder, texts, clip_skip=clip_skip,
                                    device=model.device)
        return [{"encoder_hidden_states": s} for s in states]
    texts_2 = texts if texts_2 is None else texts_2
    per_encoder, pooled = [], None
    for (tokenizer, encoder), tx in zip(model.text_encoders(), [texts, texts_2]):
        states, p = encode_weighted(tokenizer, encoder, tx, layer="penultimate", clip_skip=clip_skip,
                                    device=model.device)
        per_encoder.append(states)
        pooled = p if p is not None else pooled
    if pooled is None:
        raise ValueError("SDXL conditioning needs a CLIPTextModelWithProjection as its last text encoder")
    out = []
    for i in range(len(texts)):
        parts = [enc[i] for enc in per_encoder]
        n = max(p.shape[1] for p in parts)
        parts = [p if p.shape[1] == n else torch.cat([p, p.new_zeros(1, n - p.shape[1], p.shape[2])], 1)
                 for p in parts]
        out.append({"encoder_hidden_states": torch.cat(parts, dim=-1), "text_embeds": pooled[i:i + 1]})
    return out


def pad_contexts(contexts: list[dict], empty: dict) -> list[dict]:
    """Make every context's sequence as long as the longest by appending the empty prompt's chunk
    (``empty``: a one-chunk context), as A1111 pads a prompt and its negative to the same chunk count."""
    n = max(c["encoder_hidden_states"].shape[1] for c in contexts)
    chunk = empty["encoder_hidden_states"]
    out = []
    for c in contexts:
        h = c["encoder_hidden_states"]
        if h.shape[1] < n:
            reps = (n - h.shape[1]) // chunk.shape[1]
            c = {**c, "encoder_hidden_states": torch.cat([h] + [chunk.to(h)] * reps, dim=1)}
        out.append(c)
    return out
