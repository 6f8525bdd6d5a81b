"""CLIP guidance: steer sampling with the gradient of a CLIP loss (the scheme of Disco Diffusion and of
diffusers' CLIP-guided community pipeline).

At each step the clean estimate x0 is decoded, cut into random crops ("cutouts"), and embedded by a
CLIP image tower; the loss is the squared spherical distance between those embeddings and the
prompt's CLIP text embedding, times the scale. Its gradient with respect to the sample x_t shifts the
noise estimate, eps' = eps - sqrt(1 - alpha_bar) * g with g = -dLoss/dx_t, which in the clean
estimate the samplers take is x0' = x0 - (1 - alpha_bar) / sqrt(alpha_bar) * dLoss/dx_t.

A CLIP directory is either the embedded model's ``shapes-clip`` layout (``open_clip_config.json`` of
the form {embed_dim, vision_cfg, text_cfg} and ``visual.safetensors``: the image tower and the text
projection, whose text tower is the model's own text encoder, completed by the CLIP's text layers
when the model conditions on fewer of them: see :func:`clip_text_tower`), or a whole open_clip model
as the hub stores it (``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``, weights in
``open_clip_model.safetensors``), which brings its own text tower.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .locate import EMBEDDED_MODEL, ModelError

CONFIG_FILE = "open_clip_config.json"
VISUAL_FILE = "visual.safetensors"
FULL_FILE = "open_clip_model.safetensors"
EMBEDDED_CLIP = EMBEDDED_MODEL.parent / "shapes-clip"
TEXT_LAYERS = "text_layers."  # the CLIP's text transformer layers in visual.safetensors (transformers' names)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def build_open_clip(cfg: dict):
    """An open_clip ``CLIP`` from ``{"embed_dim", "vision_cfg", "text_cfg"}`` (and ``quick_gelu``, which
    OpenAI's models' configs set)."""
    import open_clip

    return open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
                          text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=cfg.get("quick_gelu", False))


def shapes_clip_net(cfg: dict, clip_weights: dict):
    """The open_clip model of a shapes-clip directory: built from its config, with the weights of its
    ``visual.safetensors`` (image tower, text projection, logit scale) in fp32; the text layers stored
    there (``text_layers.``) are :func:`clip_text_tower`'s, not open_clip's."""
    net = build_open_clip(cfg)
    net.load_state_dict({**net.state_dict(), **{k: v.float() for k, v in clip_weights.items()
                                                if not k.startswith(TEXT_LAYERS)}})
    return net


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between unit vectors, 2 arcsin(|a - b| / 2)^2 (Disco Diffusion's loss)."""
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


class ClipGuide:
    """A CLIP image tower with the text features to pull towards.

    ``visual(pixels) -> (N, E)`` takes images normalised by ``mean``/``std`` (None: pixels in [-1, 1],
    as the shapes CLIP was trained) at ``image_size``; ``text`` (B, E) are the unit text features, one
    per image of the batch."""

    def __init__(self, visual: torch.nn.Module, text: torch.Tensor, image_size: int, mean=None, std=None,
                 cutouts: int = 4, cut_min: float = 0.8):
        if cutouts < 1:
            raise ValueError(f"clip_cutouts must be >= 1, got {cutouts}")
        self.visual, self.text, self.image_size = visual, F.normalize(text.float(), dim=-1), image_size
        self.mean = None if mean is None else torch.tensor(mean).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, 3, 1, 1)
        self.cutouts, self.cut_min = cutouts, cut_min

    def cut(self, pixels: torch.Tensor, generators) -> torch.Tensor:
        """(B, 3, H, W) -> (B x cutouts, 3, S, S): per image, square crops of side uniform in
        [cut_min, 1] of the shorter side at uniform positions (drawn from the image's generator), resized."""
        B, _, H, W = pixels.shape
        side = min(H, W)
        out = []
        for i in range(B):
            g = generators[i] if isinstance(generators, (list, tuple)) else generators
            for _ in range(self.cutouts):
                r = torch.rand(3, generator=g).tolist()
                s = max(1, int(side * (self.cut_min + (1 - self.cut_min) * r[0])))
                y, x = int(r[1] * (H - s + 1)), int(r[2] * (W - s + 1))
                crop = pixels[i:i + 1, :, y:y + s, x:x + s]
                out.append(F.interpolate(crop, size=(self.image_size, self.image_size), mode="bilinear",
                                         align_corners=False, antialias=s > self.image_size))
        return torch.cat(out)

    def loss(self, pixels: torch.Tensor, generators=None) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> (B,) the mean spherical distance of each image's cutouts to its text."""
        cuts = self.cut(pixels, generators)
        if self.mean is not None:
            cuts = ((cuts + 1) / 2 - self.mean.to(cuts)) / self.std.to(cuts)
        dev = next(self.visual.parameters()).device
        feats = F.normalize(self.visual(cuts.to(dev)).float(), dim=-1)  # (B x cutouts, E)
        text = self.text.to(feats.device).repeat_interleave(self.cutouts, dim=0)
        return spherical_distance(feats, text).view(pixels.shape[0], self.cutouts).mean(1).to(pixels.device)


def clip_guided(denoise: Callable, decode: Callable, guide: ClipGuide, scale: float, generators=None) -> Callable:
    """A denoiser whose clean estimate follows -grad of ``scale x guide.loss(decode(x0))`` (see the
    module's note). ``decode(latents) -> pixels in [-1, 1]`` with autograd. Scale 0 is the plain denoiser."""
    if scale == 0:
        return denoise

    def denoise_guided(x, t, alpha_bar):
        if alpha_bar <= 0.0:  # zero SNR: x0 is no function of x to follow
            return denoise(x, t, alpha_bar)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = denoise(xg, t, alpha_bar)
            loss = guide.loss(decode(x0), generators) * scale
            (grad,) = torch.autograd.grad(loss.sum(), [xg])
        return x0.detach() - (1 - alpha_bar) / math.sqrt(alpha_bar) * grad

    return denoise_guided


# --- loading ------------------------------------------------------------------------------------------

def default_clip_dir(model) -> Path:
    """The embedded model's own CLIP (its image tower); other models have none to default to."""
    if Path(model.path).resolve() == EMBEDDED_MODEL.resolve() and (EMBEDDED_CLIP / VISUAL_FILE).is_file():
        return EMBEDDED_CLIP
    raise ModelError("CLIP guidance needs a CLIP model: give clip_model (--clip-model DIR, an open_clip model "
                     "directory); only the embedded model has a default")


class ClipTower:
    """A loaded CLIP for guidance: the image tower and a way to embed prompts (``text_features``)."""

    def __init__(self, visual, text_features: Callable, image_size: int, mean=None, std=None):
        self.visual, self.text_features, self.image_size, self.mean, self.std = visual, text_features, image_size, mean, std

    def guide(self, prompts: list[str], cutouts: int = 4) -> ClipGuide:
        with torch.no_grad():
            text = self.text_features(prompts)
        return ClipGuide(self.visual, text, self.image_size, self.mean, self.std, cutouts=cutouts)


def clip_text_tower(text_encoder, clip_weights: dict):
    """The CLIP's whole text tower from a model's text encoder and the CLIP's ``visual.safetensors``.

    A model may condition its U-Net on fewer text layers than its CLIP was trained with (the embedded
    model's text encoder keeps none: token and position embeddings through the final layer norm, so
    that a held-out pair's words give the states the U-Net saw). The CLIP's own layers then live in
    the CLIP directory under ``text_layers.``; with the text encoder's embeddings and final norm they
    make the tower that CLIP score and CLIP guidance need. Without such layers the text encoder is the
    tower and comes back as it is."""
    layers = {k[len(TEXT_LAYERS):]: v for k, v in clip_weights.items() if k.startswith(TEXT_LAYERS)}
    if not layers:
        return text_encoder
    from transformers import CLIPTextModel

    count = len({k.split("encoder.layers.")[1].split(".")[0] for k in layers})
    config = text_encoder.config.__class__.from_dict({**text_encoder.config.to_dict(), "num_hidden_layers": count})
    tower = CLIPTextModel(config)
    own = {k: v for k, v in text_encoder.state_dict().items() if ".layers." not in k}
    prefix = "text_model." if any(k.startswith("text_model.") for k in tower.state_dict()) else ""
    own = {prefix + k.removeprefix("text_model."): v for k, v in own.items()}
    ref = next(iter(own.values()))
    weights = {**own, **{prefix + k: v.to(ref.dtype) for k, v in layers.items()}}
    missing, unexpected = tower.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(f"the CLIP's text layers do not fit this text encoder: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return tower.to(device=ref.device, dtype=ref.dtype).eval().requires_grad_(False)


def load_clip(clip_dir: str | Path, model, device=None) -> ClipTower:
    """The CLIP in ``clip_dir`` for guiding ``model`` (see the module's note for the two layouts); a
    shapes-clip layout whose text projection does not take the width of the model's text encoder is
    an error naming both widths."""
    from safetensors.torch import load_file

    clip_dir = Path(clip_dir)
    cfg_file = clip_dir / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelError(f"--clip-model {str(clip_dir)!r} has no {CONFIG_FILE}: give an open_clip model directory")
    cfg = json.loads(cfg_file.read_text())
    device = device or model.device
    if (clip_dir / FULL_FILE).is_file():
        import open_clip

        mcfg = cfg.get("model_cfg", cfg)
        net = build_open_clip(mcfg)
        try:
            net.load_state_dict(load_file(str(clip_dir / FULL_FILE)))
        except RuntimeError as exc:
            raise ModelError(f"--clip-model {str(clip_dir)!r}: the weights do not fit its config: {exc}") from None
        net = net.eval().to(device).requires_grad_(False)
        pre = cfg.get("preprocess_cfg", {})
        length = mcfg["text_cfg"].get("context_length", 77)
        return ClipTower(net.visual, lambda prompts: net.encode_text(open_clip.tokenize(prompts, length).to(device)),
                         mcfg["vision_cfg"]["image_size"], pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD))
    if not (clip_dir / VISUAL_FILE).is_file():
        raise ModelError(f"--clip-model {str(clip_dir)!r} has neither {FULL_FILE} nor {VISUAL_FILE}")
    sd = load_file(str(clip_dir / VISUAL_FILE))
    proj = sd.get("text_projection")
    width = model.text_encoder.config.hidden_size if model.text_encoder is not None else None
    if proj is None or width != proj.shape[0]:
        raise ModelError(f"--clip-model {str(clip_dir)!r}: its text projection takes width "
                         f"{None if proj is None else proj.shape[0]}, but this model's text encoder gives {width}; "
                         "use the CLIP this model's text encoder came from, or a whole open_clip model "
                         f"({FULL_FILE}) that brings its own text tower")
    net = shapes_clip_net(cfg, sd)
    visual = net.visual.eval().to(device).requires_grad_(False)
    proj = proj.float().to(device)
    tower = clip_text_tower(model.text_encoder, sd)

    def text_features(prompts):
        from .text import tokenize

        ids = tokenize(model.tokenizer, prompts).to(model.device)
        return tower(ids).pooler_output.float().to(device) @ proj

    return ClipTower(visual, text_features, cfg["vision_cfg"]["image_size"])
