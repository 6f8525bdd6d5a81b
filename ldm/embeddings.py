"""Textual-inversion embeddings (Gal et al. 2022): new words for a frozen text encoder.

A concept of ``n`` vectors is the token ``T`` plus ``T_1`` .. ``T_{n-1}`` added to the tokenizer, one
embedding row each; a prompt naming ``T`` is expanded to ``T T_1 .. T_{n-1}`` before tokenising
(``ldm.text.expand_concepts``). This is diffusers' convention, so files move between the two.

Formats read and written:
- diffusers: ``learned_embeds.safetensors`` (or ``.bin``) holding ``{token: tensor[n, dim]}``;
- AUTOMATIC1111: a ``.pt`` holding ``{"string_to_param": {"*": tensor[n, dim]}, "name": token, ...}``,
  and its safetensors form ``{"emb_params": tensor[n, dim]}``;
- SDXL (AUTOMATIC1111, ComfyUI, Civitai): ``{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}``, one
  set of rows per text encoder, the concept named after the file.
Pickle files (``.pt``, ``.bin``) are read with ``torch.load(weights_only=True)``, which builds only
tensors and plain containers and runs no code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import ModelError

A1111_KEY = "string_to_param"


def vector_tokens(token: str, n: int) -> list[str]:
    """The tokenizer entries of a concept of ``n`` vectors: T, T_1, ..., T_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


SDXL_KEYS = ("clip_l", "clip_g")


def read_embeddings(path: str | os.PathLike, token: str | None = None) -> dict[str, torch.Tensor | dict]:
    """``{token: tensor[n, dim]}`` from a diffusers or A1111 embedding file, or for an SDXL file
    ``{token: {"clip_l": tensor, "clip_g": tensor}}``; ``token`` renames a file's single concept (A1111
    and SDXL files are named by their ``name`` entry, else the file name)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"embedding file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from .identify import identify
        kind = identify(path)  # from the header: a model's weights are named, not read as 49,408 words
        if kind.kind != "embedding":
            raise ModelError(f"{path} is {kind.description}, not a textual-inversion embedding")
        try:
            data = load_file(str(path))
        except Exception as exc:  # a truncated or foreign file
            raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path} could not be read as an embedding file (read safely, with "
                             f"weights_only=True): {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise ModelError(f"{path} holds no embedding (expected {{token: tensor}} or A1111's string_to_param)")
    if A1111_KEY in data:
        params = data[A1111_KEY]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelError(f"{path}: string_to_param should hold one tensor, found {len(params)}")
        name = data.get("name") if isinstance(data.get("name"), str) else path.stem
        embeds = {name: next(iter(params.values()))}
    elif set(data) == {"emb_params"}:
        embeds = {path.stem: data["emb_params"]}
    elif set(data) == set(SDXL_KEYS):
        rows = {k: (v[None] if v.ndim == 1 else v).detach().float().cpu() for k, v in data.items()}
        if rows["clip_l"].shape[0] != rows["clip_g"].shape[0]:
            raise ModelError(f"{path}: clip_l has {rows['clip_l'].shape[0]} vectors but clip_g "
                             f"{rows['clip_g'].shape[0]}; an SDXL embedding has as many for each encoder")
        return {token or _stored_token(path) or path.stem: rows}
    else:
        embeds = dict(data)
    bad = [k for k, v in embeds.items() if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2)]
    if bad:
        raise ModelError(f"{path}: entry {bad[0]!r} is not a [n, dim] tensor")
    from .identify import MAX_EMBEDDING_VECTORS
    big = [k for k, v in embeds.items() if v.ndim == 2 and v.shape[0] > MAX_EMBEDDING_VECTORS]
    if big or len(embeds) > 16:
        what = f"{big[0]!r} has {embeds[big[0]].shape[0]} rows" if big else f"it holds {len(embeds)} tensors"
        raise ModelError(f"{path} is not a textual-inversion embedding ({what}; an embedding holds a few concepts "
                         f"of at most {MAX_EMBEDDING_VECTORS} vectors): is it a model's weights?")
    embeds = {k: (v[None] if v.ndim == 1 else v).detach().float().cpu() for k, v in embeds.items()}
    if token is not None:
        if len(embeds) != 1:
            raise ModelError(f"{path} holds {len(embeds)} concepts ({', '.join(embeds)}); a token name can "
                             "rename only a file of one")
        embeds = {token: next(iter(embeds.values()))}
    return embeds


def _stored_token(path: Path) -> str | None:
    """The token an SDXL embedding file names in its metadata (ldm textual-inversion writes it)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("token")


def write_embeddings(path: str | os.PathLike, embeds: dict[str, torch.Tensor]) -> Path:
    """diffusers' format, ``{token: tensor[n, dim]}`` as safetensors, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in embeds.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def write_a1111(path: str | os.PathLike, token: str, vectors: torch.Tensor, step: int | None = None,
                checkpoint: str | None = None) -> Path:
    """AUTOMATIC1111's ``.pt`` layout (string_to_token, string_to_param, name, step), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"string_to_token": {"*": 265}, A1111_KEY: {"*": vectors.detach().float().cpu().clone()},
                "name": token, "step": step or 0, "sd_checkpoint": None, "sd_checkpoint_name": checkpoint},
               str(tmp))
    os.replace(tmp, path)
    return path


def add_concept(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> list[int]:
    """Add ``token`` with the rows ``vectors`` (n, dim) to the tokenizer and the text encoder's input
    embeddings; returns the new token ids. Refuses a token the vocabulary already has and a width
    that is not the text encoder's."""
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[-1] != width:
        raise ModelError(f"the embedding for {token!r} is {vectors.shape[-1]} wide but this model's text encoder "
                         f"is {width} wide: it was trained for another model family (768: SD 1.x, 1024: SD 2.x, "
                         "clip_l 768 + clip_g 1280: SDXL); use an embedding made for this model")
    names = vector_tokens(token, vectors.shape[0])
    taken = [t for t in names if t in tokenizer.get_vocab()]
    if taken:
        raise ModelError(f"the token {taken[0]!r} is already in the tokenizer's vocabulary; choose another name "
                         f"(for example {'<' + token + '>' if not token.startswith('<') else token[:-1] + '-2>'})")
    added = tokenizer.add_tokens(names)
    if added != len(names):
        raise ModelError(f"could not add {names} to the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[ids] = vectors.to(emb.device, emb.dtype)
    return ids
