"""Cross-attention control (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention
Control"): a source and a target prompt are sampled together from the same noise, and the target's
attention maps are taken from the source's where the edit keeps the image.

- Cross-attention replacement: over the first ``cross_replace`` fraction of the steps the target's
  cross-attention probabilities are the source's, carried over the token alignment of the two prompts
  (``align_prompts``); target tokens without a source counterpart (words added) keep their own.
- Re-weighting: the target's probabilities of chosen tokens multiplied by a factor (also negative),
  over the same steps (as the paper's code applies it, on top of the replaced maps).
- Self-attention injection: over the first ``self_replace`` fraction of the steps, in the layers of at
  most ``self_max_positions`` query positions (the paper's 16 x 16), the target's self-attention
  probabilities are the source's: the layout is kept.
- Local blending: the cross-attention maps of chosen words, summed over layers and steps, dilated,
  scaled to [0, 1] over the image and thresholded, give a mask per prompt; outside the union of the
  source's and the target's masks the target's latent is the source's (``local_blend``, a denoiser
  wrapper).

The control is an attention processor (``control_attention``) that computes explicit probabilities
only in the layers and steps it edits; every other call goes to the processor the model had (PyTorch's
fused attention, or xformers). Only the conditional half of a guided batch is edited, as in the paper.

Batch layout: a guided U-Net call sees ``[uncond (2n), cond (2n)]`` (ldm.guidance.guided) and an
unguided one ``[cond (2n)]``; the ``2n`` are the ``n`` sources then the ``n`` targets.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .prompts import parse_attention
from .text import expand_concepts

SELF_MAX_POSITIONS = 16 * 16   # self-attention injection in layers of at most this many positions (the paper's)
BLEND_THRESHOLD = 0.3          # local blending: the mask where the normalised map exceeds this (the paper's)
BLEND_START = 0.2              # ... applied from this fraction of the steps on (the paper's start_blend)


class EditError(ValueError):
    """An edit that cannot be made as asked; the message names the value and the fix."""


# --- prompts as token positions ----------------------------------------------------------------------

@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the context positions the U-Net attends to: ``ids`` the full sequence (start token,
    the prompt's tokens, end token, padding), ``words`` (word, first, end) context positions per word."""
    ids: list[int]
    words: list[tuple[str, int, int]]

    def positions(self, word: str) -> list[int]:
        """The context positions of every occurrence of ``word`` (case and punctuation ignored)."""
        key = _word_key(word)
        return [p for w, a, b in self.words if _word_key(w) == key for p in range(a, b)]


def _word_key(word: str) -> str:
    return word.strip(".,;:!?\"'()[]").lower()


def prompt_tokens(tokenizer, prompt: str) -> PromptTokens:
    """The token positions of a prompt as ldm.text.encode_weighted lays it out (A1111's emphasis syntax
    read and dropped: pieces tokenized one by one); editing needs the prompt in one chunk."""
    length = tokenizer.model_max_length
    eos = tokenizer.eos_token_id
    ids, words = [tokenizer.bos_token_id], []
    for text, weight in parse_attention(expand_concepts(tokenizer, prompt)):
        if weight == -1:
            raise EditError(f"prompt {prompt!r}: BREAK starts a second chunk; an edited prompt must be one chunk")
        for word in text.split():
            toks = tokenizer(word, add_special_tokens=False).input_ids
            words.append((word, len(ids), len(ids) + len(toks)))
            ids += toks
    if len(ids) + 1 > length:
        raise EditError(f"prompt {prompt!r} is {len(ids) - 1} tokens; an edited prompt must fit one chunk of "
                        f"{length - 2} tokens (the text encoder's context): shorten it")
    ids += [eos] * (length - len(ids))
    return PromptTokens(ids, words)


def align_prompts(source: PromptTokens, target: PromptTokens) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The token alignment of an edit: ``mapper`` (Ls, Lt) with the target's map at position j taken as
    ``sum_i source_map[i] * mapper[i, j]``, ``has_source`` (Lt,) False where the target keeps its own
    map, and the kind of edit.

    - ``swap``: the prompts have as many words; word k of the target takes the maps of word k of the
      source. A word of m tokens swapped for one of n tokens gives each of its n tokens the mean of
      the m maps, so a swap of words whose token counts differ is handled; the end token and the
      padding follow, shifted by the difference.
    - ``refine``: words added or removed (the paper's refinement): the token sequences are aligned
      (difflib's longest matching blocks); target tokens in a matching block take their source
      token's map, replaced or added tokens keep their own.
    """
    ls, lt = len(source.ids), len(target.ids)
    mapper = torch.zeros(ls, lt)
    if len(source.words) == len(target.words) and source.words:
        kind = "swap"
        mapper[0, 0] = 1.0  # the start token
        for (_, a, b), (_, c, d) in zip(source.words, target.words):
            mapper[a:b, c:d] = 1.0 / (b - a)
        end_s, end_t = source.words[-1][2], target.words[-1][2]
        for j in range(end_t, lt):  # the end token and the padding, shifted
            mapper[min(j - end_t + end_s, ls - 1), j] = 1.0
    else:
        kind = "refine"
        matcher = difflib.SequenceMatcher(None, source.ids, target.ids, autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                mapper[block.a + k, block.b + k] = 1.0
    return mapper, mapper.sum(0) > 0, kind


def word_weights(tokens: PromptTokens, weights: dict[str, float], prompt: str, flag: str = "--reweight") -> torch.Tensor:
    """(L,) factors: ``weights[word]`` at the word's positions, 1 elsewhere; a word not in the prompt is an error."""
    w = torch.ones(len(tokens.ids))
    for word, factor in weights.items():
        pos = tokens.positions(word)
        if not pos:
            raise EditError(f"{flag}: {word!r} is not a word of the prompt {prompt!r}")
        w[pos] = float(factor)
    return w


def parse_reweight(items: list[str]) -> dict[str, float]:
    """``["square=2", "red=-1"]`` -> {"square": 2.0, "red": -1.0}."""
    out = {}
    for item in items:
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*", item)
        if not m:
            raise EditError(f"--reweight: {item!r} is not WORD=FACTOR (e.g. square=2.0 or red=-1)")
        out[m.group(1)] = float(m.group(2))
    return out


# --- the controller ------------------------------------------------------------------------------------

class AttentionEdit:
    """What one edited sampling run does to the attention of its ``n`` source/target pairs.

    ``clock["step"]`` is the sampler step (pipelines.pipeline advances it); ``mappers`` (n, Ls, Lt) and
    ``has_source`` (n, Lt) from ``align_prompts``; ``reweight`` (n, Lt) factors or None;
    ``blend_source`` / ``blend_target`` (n, L) 0/1 masks of the positions of the blend words, or None;
    ``latent_size`` (h, w) of the latents (for the blend masks)."""

    def __init__(self, *, clock: dict, n_steps: int, mappers: torch.Tensor, has_source: torch.Tensor,
                 cross_replace: float = 0.8, self_replace: float = 0.4, reweight: torch.Tensor | None = None,
                 blend_source: torch.Tensor | None = None, blend_target: torch.Tensor | None = None,
                 latent_size: tuple[int, int] = (8, 8), self_max_positions: int = SELF_MAX_POSITIONS):
        for name, v in (("cross_replace", cross_replace), ("self_replace", self_replace)):
            if not 0 <= v <= 1:
                raise EditError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
        if reweight is not None and int(n_steps * cross_replace) == 0:
            raise EditError("--reweight acts over the --cross-replace fraction of the steps (as in Hertz et al.); "
                            f"--cross-replace {cross_replace} leaves none: raise it")
        self.clock = clock
        self.n = mappers.shape[0]
        self.cross_steps = int(n_steps * cross_replace)
        self.self_steps = int(n_steps * self_replace)
        self.blend_steps = int(n_steps * BLEND_START)
        self.mappers, self.has_source, self.reweight = mappers, has_source, reweight
        self.blend = None if blend_source is None else (blend_source, blend_target)
        self.latent_size = latent_size
        self.self_max_positions = self_max_positions
        self.maps = None  # blend maps summed over layers and steps: (2n, 1, h, w), sources then targets
        self.explicit_calls = 0  # attention calls computed with explicit probabilities (for tests and reports)

    @property
    def step(self) -> int:
        return self.clock["step"]

    def edits(self, cross: bool, positions: int, batch: int) -> bool:
        """Whether this attention call needs explicit probabilities."""
        if batch < 2 * self.n:
            return False
        if cross:
            return self.step < self.cross_steps or self.blend is not None
        return self.step < self.self_steps and positions <= self.self_max_positions

    def edit(self, probs: torch.Tensor, cross: bool) -> torch.Tensor:
        """probs (B, heads, N, L) of one attention call -> the edited probabilities."""
        self.explicit_calls += 1
        n, B = self.n, probs.shape[0]
        src, tgt = probs[B - 2 * n:B - n], probs[B - n:]
        if not cross:
            if self.step < self.self_steps:
                return torch.cat([probs[:B - n], src])
            return probs
        if self.blend is not None:
            self._collect(src, tgt)
        if self.step >= self.cross_steps:
            return probs
        m = self.mappers.to(probs)  # (n, Ls, Lt)
        mapped = torch.einsum("bhqs,bst->bhqt", src, m)
        new = torch.where(self.has_source.to(probs.device)[:, None, None, :], mapped, tgt)
        if self.reweight is not None:
            new = new * self.reweight.to(probs)[:, None, None, :]
        return torch.cat([probs[:B - n], new])

    def _collect(self, src: torch.Tensor, tgt: torch.Tensor) -> None:
        """Add this layer's maps of the blend words (mean over heads) to the running sum, at latent size."""
        ws, wt = self.blend
        h, w = self.latent_size
        words = torch.cat([(src.mean(1) * ws.to(src)[:, None, :]).sum(-1),
                           (tgt.mean(1) * wt.to(tgt)[:, None, :]).sum(-1)])  # (2n, N)
        N = words.shape[1]
        k = 1
        while (h // k) * (w // k) > N:
            k *= 2
        grid = words.reshape(-1, 1, h // k, w // k).float()
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False) if k > 1 else grid
        self.maps = grid if self.maps is None else self.maps + grid

    def blend_mask(self) -> torch.Tensor | None:
        """(n, 1, h, w) 1 where the target may differ from the source, from the maps so far (None before
        blending starts or without blend words)."""
        if self.blend is None or self.maps is None or self.step < self.blend_steps:
            return None
        # dilated as the paper does (k=1 at a quarter of SD's 64-latent side): by h/16 latent pixels
        r = self.latent_size[0] // 16
        m = F.max_pool2d(self.maps, 2 * r + 1, stride=1, padding=r) if r else self.maps
        lo, hi = m.flatten(1).amin(1)[:, None, None, None], m.flatten(1).amax(1)[:, None, None, None]
        m = (m - lo) / (hi - lo).clamp(min=1e-12)  # the paper divides by the max, for maps near 0 away from
        # the word; a small model's maps sit on a floor (about 2/3 of the peak on the embedded model)
        mask = (m > BLEND_THRESHOLD).float()
        return torch.maximum(mask[:self.n], mask[self.n:])


def local_blend(denoise: Callable, control: AttentionEdit) -> Callable:
    """A denoiser in which, outside the blend mask, each target's sample and clean estimate are its
    source's (Hertz et al.'s local blending, on the samplers' two quantities: a deterministic step
    is linear in both, so the target's latent outside the mask stays the source's)."""
    n = control.n

    def blend(x, mask):
        if mask is None:
            return x
        mask = mask.to(x)
        return torch.cat([x[:n], x[:n] + mask * (x[n:] - x[:n])])

    def denoise_blended(x, t, alpha_bar):
        x = blend(x, control.blend_mask())
        return blend(denoise(x, t, alpha_bar), control.blend_mask())

    denoise_blended.finish = lambda x: blend(x, control.blend_mask())  # the last step's latents
    return denoise_blended


# --- the attention processor -----------------------------------------------------------------------

class ControlledAttention:
    """An attention processor that hands every call to ``fallback`` (the model's own processor)
    unless ``control`` edits it; then it computes the probabilities explicitly (diffusers' Attention
    helpers: heads, scale, upcasting), lets ``control`` edit them, and applies them to the values."""

    def __init__(self, fallback, control: AttentionEdit, cross: bool):
        self.fallback, self.control, self.cross = fallback, control, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        B = hidden_states.shape[0]
        plain = (hidden_states.ndim != 3 or attention_mask is not None or attn.spatial_norm is not None
                 or attn.group_norm is not None or getattr(attn, "norm_q", None) is not None)
        if plain or not self.control.edits(self.cross, hidden_states.shape[1], B):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # (B x heads, N, L)
        N, L = probs.shape[1:]
        probs = self.control.edit(probs.view(B, attn.heads, N, L), self.cross).reshape(B * attn.heads, N, L)
        out = attn.batch_to_head_dim(torch.bmm(probs.to(v.dtype), v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def control_attention(unet, control: AttentionEdit):
    """Install ``control`` on the U-Net's transformer attention (attn1: self, attn2: cross) for the
    duration; the model's own processors come back afterwards."""
    before = dict(unet.attn_processors)
    procs = {}
    for name, proc in before.items():
        if name.endswith("attn1.processor"):
            procs[name] = ControlledAttention(proc, control, cross=False)
        elif name.endswith("attn2.processor"):
            procs[name] = ControlledAttention(proc, control, cross=True)
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    try:
        yield control
    finally:
        unet.set_attn_processor(before)
