"""The shapes CLIP: its open_clip text tower converted to a transformers CLIPTextModel computes the
same hidden states and pooled features; the real CLIP BPE ids are used by both."""

import torch

from ldm.clip import build_open_clip, text_tower_to_hf
from ldm.tokenizer import write_clip_tokenizer

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
