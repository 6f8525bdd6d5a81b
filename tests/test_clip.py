"""The shapes CLIP: its open_clip text tower converted to a transformers CLIPTextModel computes the
same hidden states and pooled features; the real CLIP BPE ids are used by both."""

import pytest
import torch

from ldm.tokenizer import write_clip_tokenizer
from shapes.clip import build_open_clip, text_tower_to_hf

CFG = {"embed_dim": 16,
       "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
       "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def test_text_tower_conversion_matches_open_clip(tmp_path):
    torch.manual_seed(0)
    model = build_open_clip(CFG).eval()
    with torch.no_grad():  # make every weight matter (open_clip initialises some to zero / one)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = text_tower_to_hf(model, CFG)
    tok = write_clip_tokenizer(tmp_path, model_max_length=12)
    ids = tok(["a large red circle on a blue background", "a star"], padding="max_length", max_length=12,
              return_tensors="pt").input_ids
    with torch.no_grad():
        # open_clip's path to the per-token states: embeddings, transformer (causal), final LN
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        ours_hidden = model.ln_final(x)
        out = hf(ids)
        pooled_oc = model.encode_text(ids)
    assert torch.allclose(out.last_hidden_state, ours_hidden, atol=1e-5)
    assert torch.allclose(out.pooler_output @ model.text_projection, pooled_oc, atol=1e-5)


RESNET_CFG = {**CFG, "vision_cfg": {"image_size": 64, "width": 8, "layers": [1, 1, 1, 1]}}


@pytest.mark.parametrize("cfg,layers", [(CFG, None), (RESNET_CFG, None), (CFG, 0), (CFG, 1)],
                         ids=["vit", "resnet", "vit-encoder-of-0-layers", "vit-encoder-of-1-layer"])
def test_saved_clip_scores_as_open_clip_does(tmp_path, cfg, layers):
    """ShapesCLIP, loaded from what training saves (visual tower + converted text tower), gives the
    open_clip model's own image and text features, for the ViT and the convolutional image tower,
    and when the saved text encoder keeps fewer layers than the tower (the rest come from clip/)."""
    from finetune.clip import CLIPConfig
    from shapes import world as shapes
    from shapes.clip import ShapesCLIP, save_visual

    torch.manual_seed(0)
    model = build_open_clip(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tok = write_clip_tokenizer(tmp_path / "tokenizer", model_max_length=12)
    encoder = text_tower_to_hf(model, cfg, layers)
    encoder.save_pretrained(str(tmp_path / "text_encoder"))
    save_visual(model, cfg, tmp_path / "clip")
    scorer = ShapesCLIP(tmp_path / "clip", tmp_path)
    prompts = ["a large red circle on a blue background", "a small green star"]
    pixels = shapes.render_tensor([shapes.sample_scene(0, i) for i in range(2)])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        ids = tok(prompts, padding="max_length", max_length=12, return_tensors="pt").input_ids
        txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
        if layers == 0:  # what the U-Net reads: the embeddings through the final norm, nothing mixed
            states = model.ln_final(model.token_embedding(ids) + model.positional_embedding)
            assert torch.allclose(encoder(ids).last_hidden_state, states, atol=1e-5)
    assert torch.allclose(scorer.image_features(pixels), img, atol=1e-5)
    assert torch.allclose(scorer.text_features(prompts), txt, atol=1e-5)
    assert torch.allclose(scorer.score(pixels, prompts), 100 * (img * txt).sum(-1).clamp(min=0), atol=1e-3)
    # the recipe key builds the same kind of tower
    kind = type(build_open_clip(CLIPConfig(vision_resnet_layers=[1, 1, 1, 1], vision_width=8).open_clip_cfg()).visual)
    assert kind.__name__ == "ModifiedResNet"


def test_text_encoder_layers_out_of_range_is_an_error():
    model = build_open_clip(CFG)
    with pytest.raises(ValueError, match="3 is not between 0 and the tower's 2"):
        text_tower_to_hf(model, CFG, 3)


def test_resnet_tower_needs_four_stages():
    from finetune.clip import CLIPConfig

    with pytest.raises(ValueError, match="4 stages"):
        CLIPConfig(vision_resnet_layers=[1, 1]).open_clip_cfg()
