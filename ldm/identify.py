"""What a weights file is, read from its safetensors header alone (no tensor is loaded).

Commands that take a file of one kind (``--embedding``, ``--lora``, a LoRA to convert) ask here first,
so that a file of another kind is named as what it is instead of a traceback, a hang (a text
encoder's 49,408-row token table read as 49,408 new words) or a silent no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAX_EMBEDDING_VECTORS = 75  # one CLIP chunk; A1111 and diffusers embeddings hold 1 to a few dozen


@dataclass(frozen=True)
class FileKind:
    kind: str          # embedding | lora | checkpoint | unet | vae | text_encoder | training_state | unknown | unreadable
    description: str   # what to tell the user ("a LoRA (kohya's layout, SDXL)")


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's shape from a .safetensors file's header; None when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # not safetensors (a text file renamed, a pickle), or truncated
        return None


def _lora_arch(keys) -> str:
    second = any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)
    xl = second or any("add_embedding" in k or "lora_unet_input_blocks" in k or "label_emb" in k for k in keys)
    return "SDXL" if xl else "SD 1.x / 2.x"


def identify(path: str | Path) -> FileKind:
    """What the file at ``path`` holds."""
    shapes = tensor_shapes(path)
    if shapes is None:
        return FileKind("unreadable", "not a readable .safetensors file")
    keys = list(shapes)
    if not keys:
        return FileKind("unknown", "an empty .safetensors file")
    if any("lora" in k.lower() for k in keys):
        layout = "kohya's layout" if any(k.startswith("lora_") for k in keys) else "diffusers' layout"
        return FileKind("lora", f"a LoRA ({layout}, {_lora_arch(keys)})")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return FileKind("checkpoint", "a whole Stable Diffusion checkpoint (single file)")
    if all("/" in k for k in keys):
        return FileKind("training_state", "a training run's state (a checkpoint folder's modules.safetensors); its "
                                          "results are in the run's output folder")
    if any(k.startswith(("text_model.", "embeddings.token_embedding.", "token_embedding.")) for k in keys):
        return FileKind("text_encoder", f"a text encoder's weights ({len(keys)} tensors, e.g. {keys[0]!r})")
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "time_embedding.")) for k in keys):
        return FileKind("unet", f"a U-Net's weights ({len(keys)} tensors)")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "quant_conv.", "post_quant_conv."))
           for k in keys):
        return FileKind("vae", f"a VAE's weights ({len(keys)} tensors)")
    small = all(len(s) in (1, 2) and (len(s) == 1 or s[0] <= MAX_EMBEDDING_VECTORS) for s in shapes.values())
    if small and len(keys) <= 16 and not any(re.search(r"\.(weight|bias)$", k) for k in keys):
        return FileKind("embedding", "a textual-inversion embedding")
    return FileKind("unknown", f"weights of an unknown kind ({len(keys)} tensors, e.g. {keys[0]!r} "
                               f"{list(shapes[keys[0]])})")


def lora_mismatches(shapes: dict[str, tuple[int, ...]], model) -> tuple[int, int, str | None]:
    """How many of a diffusers-layout LoRA's layers do not fit ``model`` (a module it names is missing,
    or takes another number of inputs), of how many, and one example; (0, 0, None) for other layouts."""
    pattern = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(?:lora\.down|lora_A|lora_down)\.weight$")
    parts = {"unet": model.unet, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
    total, bad, example = 0, 0, None
    for key, shape in shapes.items():
        m = pattern.match(key)
        if m is None:
            continue
        total += 1
        part, module = parts.get(m.group(1)), m.group(2)
        target = None
        for name in (module, "text_model." + module):  # older text-encoder LoRAs leave out text_model.
            try:
                target = part.get_submodule(name) if part is not None else None
                break
            except AttributeError:
                continue
        width = getattr(target, "in_features", None) or getattr(target, "in_channels", None)
        if target is None or width is None or len(shape) < 2 or shape[1] != width:
            bad += 1
            if example is None:
                here = "is missing here" if target is None else f"takes {width} inputs here"
                example = f"{m.group(1)}.{m.group(2)} {here}, {shape[1] if len(shape) > 1 else '?'} in the LoRA"
    return bad, total, example
