"""Training the shapes CLIP contrastively with open_clip (Radford et al. 2021), with the real CLIP
BPE tokenizer, then saving its text tower as a transformers ``CLIPTextModel`` + ``CLIPTokenizer``
(frozen from then on, as Stable Diffusion freezes its text encoder) and the rest for CLIP score."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm.tokenizer import write_clip_tokenizer
from shapes import world as shapes
from shapes.clip import build_open_clip, save_visual, text_tower_to_hf

from .config import TrainConfig
from .loop import Objective, sample_offset


@dataclass
class CLIPConfig(TrainConfig):
    embed_dim: int = 64
    vision_width: int = 64
    vision_layers: int = 2
    # A convolutional image tower (open_clip's ModifiedResNet) when given: blocks per stage, e.g.
    # [1, 1, 1, 1]. Its stem and stages see shape outlines that 8-pixel ViT patches blur.
    vision_resnet_layers: list[int] = dataclasses.field(default_factory=list)
    vision_head_width: int = 32
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 20
    attribute_dropout: float = 0.2  # each of size/colour/background left out of a caption with this probability
    # Transformer layers kept in the saved text_encoder/ (what the U-Net conditions on); None: all.
    # The CLIP's whole text tower stays in clip/ for CLIP score and guidance either way.
    text_encoder_layers: int | None = None

    def vision_cfg(self) -> dict:
        if self.vision_resnet_layers:
            if len(self.vision_resnet_layers) != 4:
                raise ValueError(f"vision_resnet_layers: a ResNet tower has 4 stages, got {self.vision_resnet_layers}")
            return {"image_size": shapes.CANVAS, "width": self.vision_width, "layers": list(self.vision_resnet_layers)}
        return {"image_size": shapes.CANVAS, "patch_size": self.patch_size, "width": self.vision_width,
                "layers": self.vision_layers, "head_width": self.vision_head_width}

    def open_clip_cfg(self) -> dict:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": self.vision_cfg(),
                "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                             "heads": self.text_heads, "layers": self.text_layers}}


class CLIPObjective(Objective):
    name = "clip"

    def __init__(self, cfg: CLIPConfig):
        self.cfg = cfg

    def setup(self, accelerator):
        import open_clip

        self.device = accelerator.device
        self._tmp = tempfile.TemporaryDirectory()
        self.tokenizer = write_clip_tokenizer(self._tmp.name, model_max_length=self.cfg.context_length)
        self.model = build_open_clip(self.cfg.open_clip_cfg())
        self.clip_loss = open_clip.ClipLoss()
        self._ids: dict[str, torch.Tensor] = {}
        return {"clip": self.model}

    def tokens(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self._ids]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", truncation=True, max_length=self.cfg.context_length,
                                 return_tensors="pt").input_ids
            self._ids.update(zip(missing, ids))
        return torch.stack([self._ids[c] for c in captions])

    def batch(self, index, generator, rank, world):
        rng = np.random.default_rng([self.cfg.seed, index, rank, 23])
        base = sample_offset(index, rank, world, self.cfg.batch_size)
        scenes = [shapes.sample_scene(self.cfg.seed, base + j) for j in range(self.cfg.batch_size)]
        captions = [shapes.partial_caption(sc, rng, self.cfg.attribute_dropout) for sc in scenes]
        return {"pixels": shapes.render_tensor(scenes), "ids": self.tokens(captions)}

    def loss(self, batch, modules, generator):
        img_f, txt_f, scale = modules["clip"](batch["pixels"].to(self.device), batch["ids"].to(self.device))
        loss = self.clip_loss(img_f, txt_f, scale)
        acc = (img_f @ txt_f.T).argmax(1).eq(torch.arange(len(img_f), device=img_f.device)).float().mean()
        return loss, {"acc": acc, "scale": scale.detach()}

    @torch.no_grad()
    def zero_shot(self, model, split: str, n: int = 512) -> dict[str, float]:
        """Per attribute: how often the image's nearest full caption (among all of the split's captions
        with the other attributes right) names the right value."""
        model.eval()
        scenes = [shapes.sample_scene(self.cfg.seed + 3, i, split) for i in range(n)]
        img = torch.nn.functional.normalize(model.encode_image(shapes.render_tensor(scenes).to(self.device)), dim=-1)
        combos = shapes.combinations("all")
        caps = [shapes.caption(*c) for c in combos]
        txt = torch.cat([torch.nn.functional.normalize(model.encode_text(self.tokens(caps[i:i + 256]).to(self.device)), dim=-1)
                         for i in range(0, len(caps), 256)])
        best = (img @ txt.T).argmax(1).tolist()
        model.train()
        out = {}
        for k, attr in enumerate(("size", "color", "shape", "background")):
            out[attr] = float(np.mean([combos[b][k] == getattr(sc, attr) for b, sc in zip(best, scenes)]))
        out["all"] = float(np.mean([combos[b] == (sc.size, sc.color, sc.shape, sc.background) for b, sc in zip(best, scenes)]))
        return out

    def save(self, directory: Path, modules):
        model = modules["clip"].eval()
        cfg = self.cfg.open_clip_cfg()
        directory = Path(directory)
        text_tower_to_hf(model, cfg, self.cfg.text_encoder_layers).save_pretrained(
            str(directory / "text_encoder"), safe_serialization=True)
        write_clip_tokenizer(directory / "tokenizer", model_max_length=self.cfg.context_length)
        save_visual(model, cfg, directory / "clip")
        metrics = {split: self.zero_shot(model, split) for split in ("seen", "heldout")}
        (directory / "clip" / "zero_shot.json").write_text(json.dumps(metrics, indent=2))
