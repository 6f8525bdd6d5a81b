"""ControlNet (Zhang et al. 2023) and T2I-Adapter (Mou et al. 2023): spatial conditioning added to
the U-Net's skip connections (ControlNet) or inside its down blocks (T2I-Adapter).

A ControlNet is a trainable copy of the U-Net's encoder that reads a control image (edges, a
silhouette, a pose) and returns one residual per skip connection and one for the middle block; the
U-Net adds them (diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``).
Several ControlNets add their residuals, as diffusers' MultiControlNet and A1111's units do.

:func:`controlled` wraps a network function ``net(x, t, context)`` (ldm.denoiser.unet_net) so that
every evaluation adds the units' residuals; samplers and guidance never see it. Each unit has a
weight, the fraction of the schedule it acts in (``start``, ``end``: diffusers' control_guidance_start
and _end, A1111's guidance start and end) and a mode:

- ``balanced``: the residuals on both halves of the guided batch, at the weight;
- ``control`` (A1111's "ControlNet is more important"; diffusers' guess mode): the ControlNet runs on
  the conditional half only (the unconditional half gets no residual) and its residuals are scaled
  from 0.1 at the first skip connection up to 1 at the middle block (logspace), so the control
  carries the image even where the prompt says little;
- ``prompt`` (A1111's "My prompt is more important"): both halves, each residual k of K scaled by
  0.825^(K - k) (the deep ones most, the outer ones least), so the prompt's details win.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .names import CANNY_THRESHOLDS, PREPROCESSORS

SOFT_INJECTION = 0.825  # A1111's per-level factor of "My prompt is more important"


@dataclass
class Unit:
    """One ControlNet with its control image and how it acts."""
    net: torch.nn.Module          # diffusers' ControlNetModel
    image: torch.Tensor           # (1 or B, 3, H, W) in [0, 1], the request's size
    weight: float = 1.0
    start: float = 0.0            # the fraction of the schedule it starts acting at ...
    end: float = 1.0              # ... and stops after
    mode: str = "balanced"
    batched: dict = field(default_factory=dict, repr=False)  # the image repeated to each batch size, once

    def acts_at(self, step: int, n_steps: int) -> bool:
        """diffusers' controlnet_keep: whether the unit acts at sampler step ``step`` of ``n_steps``."""
        return not (step / n_steps < self.start or (step + 1) / n_steps > self.end)


def controlled(net: Callable, units: list[Unit], clock: dict, n_steps: int) -> Callable:
    """``net`` with the units' residuals added at every evaluation; ``clock["step"]`` is the sampler's
    step (advanced by Pipeline.sample). A context's ``control_rows`` (B,) marks its conditional rows
    (1) and unconditional ones (0), which the ``control`` mode needs."""

    def f(x: torch.Tensor, t, context: dict) -> torch.Tensor:
        step = clock.get("step", 0) if clock is not None else 0
        down_total = mid_total = None
        for u in units:
            if u.weight == 0 or not u.acts_at(step, n_steps):
                continue
            down, mid = residuals(u, x, t, context)
            if down_total is None:
                down_total, mid_total = down, mid
            else:
                down_total = [a + b for a, b in zip(down_total, down)]
                mid_total = mid_total + mid
        if down_total is None:
            return net(x, t, context)
        return net(x, t, {**context, "down_residuals": down_total, "mid_residual": mid_total})

    return f


def residuals(u: Unit, x: torch.Tensor, t, context: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One unit's residuals for the batch ``x`` (B, 4, h, w)."""
    cn = u.net
    dtype = cn.dtype
    b = x.shape[0]
    if b not in u.batched:  # one control image per request (or per image), repeated over CFG's halves
        image = u.image.to(x.device, dtype)
        u.batched[b] = image if image.shape[0] == b else image.repeat(b // image.shape[0], 1, 1, 1)
    image = u.batched[b]
    rows = context.get("control_rows")
    take = None  # all rows
    if u.mode == "control" and rows is not None:  # the conditional half only (diffusers' guess mode)
        take = torch.nonzero(rows.to(x.device) > 0.5).flatten()

    def pick(v):
        return v if take is None else v[take]

    t_in = t.to(x.device) if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float32, device=x.device)
    if t_in.ndim:
        t_in = pick(t_in)
    extra = {}
    if "text_embeds" in context:  # SDXL: the ControlNet takes the U-Net's added conditions too
        extra["added_cond_kwargs"] = {"text_embeds": pick(context["text_embeds"]).to(x.device, dtype),
                                      "time_ids": pick(context["time_ids"]).to(x.device, dtype)}
    down, mid = cn(pick(x).to(dtype), t_in, encoder_hidden_states=pick(context["encoder_hidden_states"]).to(dtype),
                   controlnet_cond=pick(image), conditioning_scale=u.weight, guess_mode=u.mode == "control",
                   return_dict=False, **extra)
    if u.mode == "prompt":
        k = len(down)
        down = [d * SOFT_INJECTION ** (k - i) for i, d in enumerate(down)]
    if take is not None and len(take) != b:  # the unconditional rows get no residual
        def full(r):
            out = torch.zeros((b, *r.shape[1:]), dtype=r.dtype, device=r.device)
            out[take] = r
            return out
        down, mid = [full(d) for d in down], full(mid)
    return down, mid


def check_fits(controlnet, unet, name: str, model_arch: str) -> None:
    """A ControlNet made for another architecture than the U-Net's is a ValueError naming both."""
    c, u = controlnet.config, unet.config
    mine = (c.get("cross_attention_dim"), tuple(c.get("block_out_channels", ())), c.get("addition_embed_type"))
    theirs = (u.get("cross_attention_dim"), tuple(u.get("block_out_channels", ())), u.get("addition_embed_type"))
    if mine != theirs:
        def arch(cfg):
            return ("SDXL" if cfg[2] == "text_time" else "SD 2.x" if cfg[0] == 1024 else "SD 1.x" if cfg[0] == 768
                    else f"text width {cfg[0]}") + f", channels {list(cfg[1])}"
        raise ValueError(f"ControlNet {name} was made for another model ({arch(mine)}) than this {model_arch} "
                         f"model ({arch(theirs)}); use a ControlNet made for it")


# --- control images ----------------------------------------------------------------------------------
def preprocess(image, name: str, thresholds: tuple[float, float] | None = None):
    """The control map of a PIL image by preprocessor ``name`` (RGB out): none, canny (OpenCV's Canny on
    the RGB image, the strongest channel's gradient at each pixel, as A1111's annotator runs it, at
    ``thresholds`` (low, high), default CANNY_THRESHOLDS; the shapes world's canny condition), threshold
    (white where the grey level is above 127), invert."""
    import numpy as np
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if name == "none":
        return image
    if name == "invert":
        return ImageOps.invert(image)
    if name == "threshold":
        grey = np.asarray(image.convert("L"))
        return Image.fromarray(np.where(grey > 127, 255, 0).astype(np.uint8)).convert("RGB")
    if name == "canny":
        try:
            import cv2
        except ImportError:
            raise ValueError("the canny preprocessor needs OpenCV: pip install opencv-python-headless") from None
        low, high = thresholds or CANNY_THRESHOLDS
        if not (0 <= low <= high):
            raise ValueError(f"canny thresholds {low:g} / {high:g}: give 0 <= low <= high")
        return Image.fromarray(cv2.Canny(np.ascontiguousarray(np.asarray(image)), low, high)).convert("RGB")
    raise ValueError(f"unknown preprocessor {name!r}; use one of {', '.join(PREPROCESSORS)}")


def fit(image, width: int, height: int, mode: str):
    """A control image brought to ``width`` x ``height``: just-resize (stretched), crop-and-resize (scaled
    to cover, centre crop) or resize-and-fill (scaled to fit, black margins), as A1111's resize modes."""
    from PIL import Image

    if image.size == (width, height):
        return image
    if mode == "just-resize":
        return image.resize((width, height), Image.BICUBIC)
    w, h = image.size
    scale = max(width / w, height / h) if mode == "crop-and-resize" else min(width / w, height / h)
    scaled = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out = Image.new("RGB", (width, height))
    out.paste(scaled, ((width - scaled.size[0]) // 2, (height - scaled.size[1]) // 2))
    return out


def to_tensor01(image) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: what a ControlNet reads (diffusers' control image processor, unnormalised)."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


# --- single files ------------------------------------------------------------------------------------
def hint_channels(state: dict) -> tuple[int, ...]:
    """The conditioning embedding's widths (diffusers' conditioning_embedding_out_channels) read off a
    ControlNet's weights, in either layout."""
    if "controlnet_cond_embedding.conv_in.weight" in state:  # diffusers: conv_in, then pairs of blocks
        widths = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
        k = 1
        while f"controlnet_cond_embedding.blocks.{k}.weight" in state:
            widths.append(state[f"controlnet_cond_embedding.blocks.{k}.weight"].shape[0])
            k += 2
        return tuple(widths)
    hint = {int(key.split(".")[1]): v for key, v in state.items()
            if key.startswith("input_hint_block.") and key.endswith(".weight")}
    convs = [hint[i] for i in sorted(hint)][:-1]  # the last is the zero convolution to the model's width
    return tuple(c.shape[0] for c in convs[0::2])


def controlnet_from_single_file(path, unet, dtype=None):
    """A ControlNet from one .safetensors file: diffusers' layout (``time_embedding...``, ``controlnet_...``
    keys) or the original one of lllyasviel's ``control_*.safetensors`` (``control_model.`` keys, or the
    same without the prefix), converted by diffusers' own converter; its structure is the U-Net's encoder
    (ControlNetModel.from_unet), so no config file is needed. ValueError naming the file when the
    weights do not fit this U-Net."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    state = load_file(str(path))
    prefix = "control_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    channels = hint_channels(state)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels,
                                    load_weights_from_unet=False)
    if "time_embedding.linear_1.weight" not in state:  # the original layout
        state = convert_controlnet_checkpoint(state, dict(net.config))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"ControlNet {str(path)!r} does not fit this model's U-Net "
                         f"({str(exc).splitlines()[0]})") from None
    return net.to(dtype) if dtype is not None else net


# --- T2I-Adapter ---------------------------------------------------------------------------------------
def adapter_features(adapters: list[tuple[torch.nn.Module, torch.Tensor, float]]) -> list[torch.Tensor]:
    """The summed features of T2I-Adapters, each ``(adapter, image (1, C, H, W) in [0, 1], weight)``: one
    tensor per U-Net down block, computed once per request (they do not depend on the timestep), as
    diffusers' MultiAdapter sums them."""
    total = None
    for adapter, image, weight in adapters:
        feats = [f * weight for f in adapter(image.to(adapter.device, adapter.dtype))]
        total = feats if total is None else [a + b for a, b in zip(total, feats)]
    return total


def adapted(net: Callable, features: list[torch.Tensor]) -> Callable:
    """``net`` with the adapters' ``features`` added inside the down blocks at every evaluation, repeated
    over the batch (the images of a request and the halves of the guided batch)."""
    cache = {}

    def f(x: torch.Tensor, t, context: dict) -> torch.Tensor:
        b = x.shape[0]
        if b not in cache:
            cache[b] = [v.repeat(b // v.shape[0], 1, 1, 1) for v in features]
        return net(x, t, {**context, "adapter_features": list(cache[b])})

    return f


def check_adapter_fits(adapter, unet, name: str, model_arch: str) -> None:
    """A T2I-Adapter whose feature widths are not the U-Net's block widths is a ValueError naming both."""
    theirs = list(unet.config.get("block_out_channels", ()))
    mine = list(adapter.config.get("channels", ()))
    if mine[:len(theirs)] != theirs[:len(mine)] or not mine:
        raise ValueError(f"T2I-Adapter {name} makes features of widths {mine}, but this {model_arch} model's U-Net "
                         f"blocks are {theirs} wide; use an adapter made for it")
