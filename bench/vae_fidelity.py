"""How faithfully a VAE carries the shapes world: encode/decode rendered scenes and judge the
reconstructions with the world's detector (the ceiling for any U-Net trained on its latents).

    python bench/vae_fidelity.py runs/shapes/vae [--n 200] [--scene-seed K]

Groups: seen and held-out pairs, all scenes (every colour and shape, teal and rings included: the
codec split), small orange stars (textual inversion's concept) and teal rings (DreamBooth's subject).
"""

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL

from ldm.images import to_pil
from shapes import world as shapes


def roundtrip(vae, scenes):
    x = shapes.render_tensor(scenes)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return to_pil(((y + 1) / 2).clamp(0, 1)), (y - x).abs().mean().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("vae_dir", help="a directory holding vae/ (or the vae folder itself)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--scene-seed", type=int, default=0,
                   help="added to each group's scene seed: other scenes, to choose a recipe on without "
                        "choosing it on the reported ones (default 0: the reported scenes)")
    a = p.parse_args()
    k = a.scene_seed
    try:
        vae = AutoencoderKL.from_pretrained(a.vae_dir, subfolder="vae").eval()
    except OSError:
        vae = AutoencoderKL.from_pretrained(a.vae_dir).eval()
    groups = {"seen": [shapes.sample_scene(123 + k, i, "seen") for i in range(a.n)],
              "heldout": [shapes.sample_scene(123 + k, i, "heldout") for i in range(a.n)],
              "all scenes": [shapes.sample_scene(321 + k, i, "codec") for i in range(a.n)],
              "small orange star": [shapes.sample_scene(7 + k, i, color="orange", shape="star", sizes=["small"])
                                    for i in range(a.n)],
              "teal ring": [shapes.sample_scene(5 + k, i, color="teal", shape="ring") for i in range(a.n)]}
    for name, scenes in groups.items():
        imgs, l1 = roundtrip(vae, scenes)
        reads = [shapes.detect(i) for i in imgs]
        ok = [(r.background, r.color, r.shape, r.size) == (s.background, s.color, s.shape, s.size)
              for s, r in zip(scenes, reads)]
        print(f"{name}: all-correct {np.mean(ok):.3f} of {len(ok)}, "
              + " ".join(f"{k} {np.mean([getattr(r, k) == getattr(s, k) for s, r in zip(scenes, reads)]):.3f}"
                         for k in ("size", "color", "shape", "background"))
              + f", L1 {l1:.4f}")
        if name in ("seen", "heldout", "all scenes"):  # where the misses are: all-correct per (size, shape) class
            classes = sorted({(s.size, s.shape) for s in scenes})
            print("  per class: " + ", ".join(
                f"{sz} {sh} {sum(o for s, o in zip(scenes, ok) if (s.size, s.shape) == (sz, sh))}"
                f"/{sum((s.size, s.shape) == (sz, sh) for s in scenes)}" for sz, sh in classes))


if __name__ == "__main__":
    main()
