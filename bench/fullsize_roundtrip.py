"""Full-size single-file round trip of a real architecture, on random weights (no download needed).

    python bench/fullsize_roundtrip.py ARCH DTYPE      # e.g. sd1 float32, sdxl float16

Builds the networks of ARCH (sd1, sd2, sdxl, sdxl-refiner, ...) from the config shipped in
ldm/assets/configs with random weights, exports them as one original-layout .safetensors file in
/tmp/full, asks diffusers' own detector (infer_diffusers_model_type) what the file is, loads it back
with ldm.models.load_model (detection and the shipped config) and counts the weights that differ.
This checks the key mapping at the real depth (the tests use small layouts). Memory: about 3x the
model in DTYPE (SDXL in float16: about 15 GB peak); minutes, not part of the test run."""
import sys, time, torch, json
from pathlib import Path
from ldm.checkpoints import CONFIGS, to_single_file, detect
from ldm.models import Model, load_tokenizer
from ldm.schedule import NoiseSchedule
from diffusers import UNet2DConditionModel, AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
arch, dtype = sys.argv[1], getattr(torch, sys.argv[2])
d = CONFIGS / arch
t0 = time.time()
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(d / "unet"))).to(dtype)
vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(d / "vae"))).to(dtype)
encs = {}
for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
    if (d / name).is_dir():
        encs[name] = cls(CLIPTextConfig.from_pretrained(str(d / name))).to(dtype)
toks = {n: load_tokenizer(d / n) for n in ("tokenizer", "tokenizer_2") if (d / n).is_dir()}
index = json.loads((d / "model_index.json").read_text())
m = Model(unet, vae, encs.get("text_encoder"), toks.get("tokenizer"), NoiseSchedule.from_file(d / "scheduler" / "scheduler_config.json"),
          arch, d, text_encoder_2=encs.get("text_encoder_2"), tokenizer_2=toks.get("tokenizer_2"),
          requires_aesthetics_score=index.get("requires_aesthetics_score", False))
print("built", round(time.time() - t0), "s"); t0 = time.time()
f = to_single_file(m, Path("/tmp/full") / f"{arch}.safetensors")  # about 4-7 GB
print("exported", round(time.time() - t0), "s", f.stat().st_size // 2**20, "MiB")
from safetensors import safe_open
with safe_open(str(f), "pt") as s:
    keys = list(s.keys())
    shapes = {k: tuple(s.get_slice(k).get_shape()) for k in keys}
print("ours detect:", detect(keys, shapes))
fake = {k: torch.empty(0) if k not in shapes else torch.empty(shapes[k], device="meta") for k in keys}
print("diffusers infer_diffusers_model_type:", infer_diffusers_model_type(fake))
del fake
t0 = time.time()
from ldm.models import load_model
back = load_model(f, dtype=dtype)   # the shipped config, detected
print("loaded with the shipped config", round(time.time() - t0), "s, arch", back.arch)
bad = [k for k, v in unet.state_dict().items() if not torch.equal(v, back.unet.state_dict()[k])]
bad += [k for k, v in vae.state_dict().items() if not torch.equal(v, back.vae.state_dict()[k])]
for name, e in encs.items():
    sd2 = getattr(back, name).state_dict()
    bad += [k for k, v in e.state_dict().items() if not k.endswith("position_ids") and not torch.equal(v, sd2[k])]
print("weights that differ after the round trip:", len(bad), bad[:3])
