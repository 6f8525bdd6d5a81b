"""A training run's resumable state, written as safetensors and JSON only.

A checkpoint folder holds, beside what the method itself saves:

    modules.safetensors      every trained module's weights, keys ``<module name>/<parameter>``
    optimizer.safetensors    the optimiser's tensors (``<param index>/<state key>``) ...
    optimizer.json           ... and the rest of its state (param groups, non-tensor entries)
    scheduler.json           the learning-rate schedule's position
    ema.safetensors          the EMA's shadow weights and its update count (when EMA is on)
    scaler.json              the fp16 loss scaler (when there is one)
    rng-<rank>.safetensors   each process's torch (and CUDA) generator state ...
    rng-<rank>.json          ... and Python's and NumPy's

Nothing here runs code when it is read: a crafted checkpoint can hold wrong numbers, not a program.
Checkpoints written by older versions (accelerate's ``save_state``: ``optimizer.bin``,
``random_states_0.pkl``, ``custom_checkpoint_0.pkl``) are pickles; they are read only when the
user passes ``--allow-pickle`` (:func:`is_legacy`, and the loop says so).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODULES = "modules.safetensors"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler.json"
EMA_FILE = "ema.safetensors"
SCALER = "scaler.json"


class StateError(ValueError):
    """A checkpoint's state does not fit this run (another model, a damaged file)."""


def is_legacy(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint of the older, pickled layout (no modules.safetensors)."""
    return not (directory / MODULES).is_file() and (any(directory.glob("*.pkl")) or any(directory.glob("*.bin")))


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


def _jsonable(value, where: str):
    """``value`` as JSON (tuples become lists, restored by :func:`_restore`); StateError otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"__tuple__": [_jsonable(v, where) for v in value]} if isinstance(value, tuple) else \
            [_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    raise StateError(f"{where}: cannot store a {type(value).__name__} as JSON")


def _restore(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_restore(v) for v in value["__tuple__"])
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


# --- optimiser: tensors to safetensors, the rest to JSON ----------------------------------------------
def save_optimizer(directory: Path, state: dict) -> None:
    tensors, rest = {}, {}
    for index, entries in state["state"].items():
        kept = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = _contiguous(value)
            else:
                kept[key] = _jsonable(value, f"optimizer state {index}.{key}")
        rest[str(index)] = kept
    save_file(tensors, str(directory / f"{OPTIMIZER}.safetensors"))
    (directory / f"{OPTIMIZER}.json").write_text(json.dumps(
        {"param_groups": _jsonable(state["param_groups"], "optimizer param_groups"), "state": rest,
         "tensor_keys": sorted(tensors)}))


def load_optimizer(directory: Path) -> dict:
    meta = json.loads((directory / f"{OPTIMIZER}.json").read_text())
    tensors = load_file(str(directory / f"{OPTIMIZER}.safetensors"))
    state: dict[int, dict] = {int(i): dict(_restore(v)) for i, v in meta["state"].items()}
    for name, t in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = t
    return {"state": state, "param_groups": _restore(meta["param_groups"])}


# --- random generators --------------------------------------------------------------------------------
def save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    save_file({k: _contiguous(v) for k, v in tensors.items()}, str(directory / f"rng-{rank}.safetensors"))
    (directory / f"rng-{rank}.json").write_text(json.dumps(
        {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}))


def load_rng(directory: Path, rank: int) -> None:
    tensors = load_file(str(directory / f"rng-{rank}.safetensors"))
    meta = json.loads((directory / f"rng-{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --- the whole state ----------------------------------------------------------------------------------
def save_state(directory: Path, *, rank: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
               ema=None, scaler=None) -> None:
    """Write the run's state into ``directory`` (which exists). Every process writes its own
    generators; the main process (rank 0) writes the rest."""
    directory = Path(directory)
    save_rng(directory, rank)
    if rank != 0:
        return
    weights = {f"{name}/{k}": _contiguous(v) for name, m in modules.items() for k, v in m.state_dict().items()}
    save_file(_dedupe(weights), str(directory / MODULES))
    save_optimizer(directory, optimizer.state_dict())
    (directory / SCHEDULER).write_text(json.dumps(_jsonable(scheduler.state_dict(), "scheduler state")))
    if ema is not None:
        state = ema.state_dict()
        save_file({f"shadow.{i}": _contiguous(s) for i, s in enumerate(state["shadow"])} |
                  {"updates": torch.tensor(state["updates"])}, str(directory / EMA_FILE))
    if scaler is not None:
        (directory / SCALER).write_text(json.dumps(_jsonable(scaler.state_dict(), "loss scaler state")))


def _dedupe(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): each gets its own copy."""
    seen, out = set(), {}
    for k, v in weights.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        out[k] = v.clone() if ptr is not None and ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    return out


def load_state(directory: Path, *, rank: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
               ema=None, scaler=None) -> None:
    """Read what :func:`save_state` wrote into the run's objects; StateError when it does not fit."""
    directory = Path(directory)
    weights = load_file(str(directory / MODULES))
    for name, m in modules.items():
        prefix = f"{name}/"
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            m.load_state_dict(own)
        except RuntimeError as exc:
            raise StateError(f"{directory / MODULES}: its {name!r} weights do not fit this run's model "
                             f"({str(exc).splitlines()[0]})") from None
    try:
        optimizer.load_state_dict(load_optimizer(directory))
    except (ValueError, KeyError) as exc:
        raise StateError(f"{directory}: the optimiser state does not fit this run ({exc})") from None
    scheduler.load_state_dict(_restore(json.loads((directory / SCHEDULER).read_text())))
    if ema is not None:
        f = directory / EMA_FILE
        if not f.is_file():
            raise StateError(f"{directory} holds no EMA state (ema.safetensors) but this run has ema_decay > 0; "
                             "resume with the run's own recipe")
        t = load_file(str(f))
        ema.load_state_dict({"shadow": [t[f"shadow.{i}"] for i in range(len(ema.shadow))],
                             "updates": int(t["updates"])})
    if scaler is not None and (directory / SCALER).is_file():
        scaler.load_state_dict(_restore(json.loads((directory / SCALER).read_text())))
    if (directory / f"rng-{rank}.safetensors").is_file():
        load_rng(directory, rank)
