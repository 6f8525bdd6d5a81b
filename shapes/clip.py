"""The shapes CLIP: an open_clip model whose text tower becomes a transformers ``CLIPTextModel``.

open_clip trains it contrastively; Stable Diffusion pipelines want the text tower as a
``CLIPTextModel`` with a ``CLIPTokenizer``. :func:`text_tower_to_hf` converts the weights (the
fused attention projection split into q, k, v; names mapped), and :class:`ShapesCLIP` scores images
against prompts (CLIP score) with the visual tower and the converted text tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# the CLIP's file names and loader, and the embedded model's CLIP image tower (for CLIP score and
# CLIP guidance), shipped beside the model: their home is ldm.clip_guidance
from ldm.clip_guidance import CONFIG_FILE, EMBEDDED_CLIP, TEXT_LAYERS, VISUAL_FILE, build_open_clip  # noqa: F401
from ldm.clip_guidance import clip_text_tower, shapes_clip_net

BOS, EOS = 49406, 49407


def hf_text_config(cfg: dict, layers: int | None = None):
    from transformers import CLIPTextConfig

    t = {**cfg["text_cfg"], **({} if layers is None else {"layers": layers})}
    return CLIPTextConfig(vocab_size=t.get("vocab_size", 49408), hidden_size=t["width"],
                          intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
                          num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                          max_position_embeddings=t["context_length"], hidden_act="gelu", layer_norm_eps=1e-5,
                          projection_dim=cfg["embed_dim"], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)


def text_tower_to_hf(model, cfg: dict, layers: int | None = None):
    """The text tower of open_clip ``model`` as a transformers ``CLIPTextModel`` (same hidden states);
    with ``layers``, only its first ``layers`` transformer layers (0: the embeddings through the final
    layer norm), as a text encoder for a U-Net to condition on."""
    from transformers import CLIPTextModel

    sd = model.state_dict()
    layers = cfg["text_cfg"]["layers"] if layers is None else layers
    if not 0 <= layers <= cfg["text_cfg"]["layers"]:
        raise ValueError(f"text encoder layers: {layers} is not between 0 and the tower's {cfg['text_cfg']['layers']}")
    hf = CLIPTextModel(hf_text_config(cfg, layers))
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[dst + b + "." + p] = sd[src + a + "." + p]
        for p in ("weight", "bias"):
            q, k, v = sd[src + "attn.in_proj_" + p].chunk(3, dim=0)
            out[dst + "self_attn.q_proj." + p], out[dst + "self_attn.k_proj." + p], out[dst + "self_attn.v_proj." + p] = q, k, v
    if not any(k.startswith("text_model.") for k in hf.state_dict()):  # transformers 5 names
        out = {k[len("text_model."):]: v for k, v in out.items()}
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion left missing={missing} unexpected={unexpected}")
    return hf.eval()


def save_visual(model, cfg: dict, directory: str | Path):
    """Write the parts of the CLIP that a text encoder of no layers lacks: the visual tower, the text
    projection, the logit scale and the text tower's transformer layers (``text_layers.``, in
    transformers' names; :func:`ldm.clip_guidance.clip_text_tower` puts the tower back together)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
          if k.startswith("visual.") or k in ("text_projection", "logit_scale")}
    sd.update({TEXT_LAYERS + k.removeprefix("text_model."): v.detach().contiguous().cpu()
               for k, v in text_tower_to_hf(model, cfg).state_dict().items() if ".layers." in k})
    save_file(sd, str(directory / VISUAL_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))


class ShapesCLIP:
    """CLIP score of images against prompts: 100 * max(cos(image, text), 0) (Hessel et al. 2021)."""

    def __init__(self, clip_dir: str | Path, text_dir: str | Path, device="cpu"):
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTokenizer

        clip_dir, text_dir = Path(clip_dir), Path(text_dir)
        for f in (clip_dir / CONFIG_FILE, clip_dir / VISUAL_FILE):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: {clip_dir} is not a shapes CLIP directory")
        self.cfg = json.loads((clip_dir / CONFIG_FILE).read_text())
        sd = load_file(str(clip_dir / VISUAL_FILE))
        self.visual = shapes_clip_net(self.cfg, sd).visual.eval().to(device)
        self.projection = sd["text_projection"].float().to(device)
        text = CLIPTextModel.from_pretrained(str(text_dir / "text_encoder"), dtype=torch.float32).eval()
        self.text = clip_text_tower(text, sd).to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(text_dir / "tokenizer"))
        self.device = device

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, 64, 64) in [-1, 1] -> unit features (B, E)."""
        f = self.visual(pixels.float().to(self.device))
        return torch.nn.functional.normalize(f, dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids.to(self.device)
        pooled = self.text(ids).pooler_output
        return torch.nn.functional.normalize(pooled @ self.projection, dim=-1)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per image CLIP score against its prompt, (B,)."""
        cos = (self.image_features(pixels) * self.text_features(prompts)).sum(-1)
        return 100 * cos.clamp(min=0)
