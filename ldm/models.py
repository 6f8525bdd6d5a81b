"""Loading Stable-Diffusion-layout models (diffusers' directory format), safely.

A model directory holds model_index.json and the parts unet/, vae/, text_encoder/, tokenizer/ and
scheduler/, weights as safetensors. SD 1.x (epsilon, 768-wide text) and SD 2.x (v-prediction,
1024-wide text) differ only in what those files say, which is read, not assumed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .locate import EMBEDDED_MODEL, ModelError, default_model_path  # noqa: F401 (their home is ldm.locate)
from .schedule import NoiseSchedule

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# SDXL adds a second text encoder and tokenizer; its refiner has only the second
OPTIONAL_PARTS = ("text_encoder_2", "tokenizer_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}



# A model directory may say how it is best sampled (a distilled student its step count, a small model
# its guidance scale) in sampling.json at its root, beside model_index.json; diffusers ignores the file.
# What the user passes wins; then the model's file; then these, the Stable Diffusion habits.
SAMPLING_FILE = "sampling.json"
SAMPLING_DEFAULTS = {"sampler": "ddim", "steps": 30, "guidance_scale": 7.5}


def read_sampling_defaults(path: str | os.PathLike) -> dict:
    """The sampling defaults of model directory ``path``: SAMPLING_DEFAULTS updated by its sampling.json,
    each value checked (a ModelError names the file, the key and what it should be)."""
    file = Path(path) / SAMPLING_FILE
    if not file.is_file():
        return dict(SAMPLING_DEFAULTS)
    try:
        values = json.loads(file.read_text(), parse_constant=_no_constant)
    except ValueError as exc:
        raise ModelError(f"{file}: not valid JSON ({exc}); fix or delete it") from exc
    unknown = sorted(set(values) - set(SAMPLING_DEFAULTS)) if isinstance(values, dict) else ["(not an object)"]
    if unknown:
        raise ModelError(f"{file}: unknown key(s) {', '.join(unknown)}; it may hold {', '.join(SAMPLING_DEFAULTS)}")
    for key, value in values.items():
        problem = _sampling_value_problem(key, value)
        if problem:
            raise ModelError(f"{file}: {key} {problem}, got {value!r}; fix or delete it")
    return {**SAMPLING_DEFAULTS, **values}


def _no_constant(name: str):
    """JSON's non-standard NaN / Infinity, which Python's reader takes by default: refused."""
    raise ValueError(f"{name} is not a number JSON allows")


def _sampling_value_problem(key: str, value) -> str | None:
    from .samplers import SAMPLERS, parse_sampler

    if key == "sampler":
        try:
            parse_sampler(value)
        except (ValueError, AttributeError):  # an unknown name, or not a string
            return f"must be one of {', '.join(SAMPLERS)} (or A1111's name for one)"
    if key == "steps" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return "must be a whole number >= 1"
    if key == "guidance_scale":
        from .guidance import scale_problem
        return scale_problem(value)
    return None


RECIPES_DIR = "recipes"  # a model directory's recommended training recipes: recipes/<command>.yaml


def model_recipe(path: str | os.PathLike | None, command: str) -> Path | None:
    """The recipe model ``path`` recommends for training command ``command`` (``recipes/<command>.yaml``
    beside its sampling.json, as the embedded model carries its own), or None when it has none; the
    embedded model when ``path`` is None. A recipe is a YAML mapping of recipe keys, checked as any
    recipe is when the command builds it."""
    base = EMBEDDED_MODEL if path is None else Path(path).expanduser()
    file = base / RECIPES_DIR / f"{command}.yaml"
    return file if base.is_dir() and file.is_file() else None


def write_sampling_defaults(path: str | os.PathLike, **values) -> Path:
    """Write the given defaults (keys of SAMPLING_DEFAULTS) into ``path``/sampling.json."""
    unknown = sorted(set(values) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sampling default(s) {', '.join(unknown)}; choose from {', '.join(SAMPLING_DEFAULTS)}")
    file = Path(path) / SAMPLING_FILE
    file.write_text(json.dumps(values, indent=2) + "\n")
    return file


@dataclass
class Model:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: NoiseSchedule
    name: str
    path: Path
    sampling_defaults: dict = field(default_factory=lambda: dict(SAMPLING_DEFAULTS))  # see read_sampling_defaults
    text_encoder_2: torch.nn.Module | None = None  # SDXL: OpenCLIP bigG, CLIPTextModelWithProjection
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = False     # SDXL base: an empty negative prompt is zeros, not encoded ""
    requires_aesthetics_score: bool = False        # SDXL refiner: the added conditions end in an aesthetic score
    vae_file: Path | None = None                   # the VAE that replaced the model's own (load_model's vae)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def is_sdxl(self) -> bool:
        """SDXL's U-Net takes the pooled text embedding and size numbers as added conditions."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def arch(self) -> str:
        if self.is_sdxl:
            return "sdxl-refiner" if self.requires_aesthetics_score else "sdxl"
        return "sd2" if self.schedule.prediction_type == "v_prediction" else "sd1"

    def text_encoders(self) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, encoder) pairs whose states the U-Net reads, in order."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(t, e) for t, e in pairs if e is not None]

    @property
    def is_inpainting(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def native_size(self) -> int:
        """The side, in pixels, the U-Net was built for (its sample size times the VAE's factor)."""
        return self.unet.config.sample_size * self.vae_factor

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


CPU_BF16_ENV = "LDM_CPU_BF16"  # 1 / 0: take the CPU as having native bf16 units, or not (tests; odd CPUs)


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16, as PyTorch's CPU capability
    reports them), and why: where it does, bf16 matrix products are faster than fp32; elsewhere
    PyTorch emulates them, slower. ``LDM_CPU_BF16=0/1`` overrides the reading."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{CPU_BF16_ENV}={forced}"
    units = [name for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    return (True, f"{' and '.join(units)} units") if units else (False, "no native bf16 units (AMX, AVX512-BF16)")


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``auto`` (or None) is fp16 on CUDA, bf16 on a CPU with native bf16 units (cpu_bf16), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.float16
        return torch.bfloat16 if kind == "cpu" and cpu_bf16()[0] else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


def _weights(part_dir: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in part_dir.iterdir() if p.is_file()]
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    return safe, pickled


def check_model_dir(path: Path, allow_pickle: bool = False) -> dict[str, bool]:
    """Check that ``path`` is a complete model directory; return, per weighted part, whether it
    loads from safetensors. Raises ModelError naming what is missing or unsafe."""
    if not path.exists():
        raise ModelError(f"model directory {str(path)!r} does not exist; give --model a diffusers-format "
                         "Stable Diffusion directory (model_index.json, unet/, vae/, text_encoder/, "
                         "tokenizer/, scheduler/)")
    if not path.is_dir():
        raise ModelError(f"--model {str(path)!r} is a file but not a checkpoint; give a diffusers-format directory "
                         "or a single-file checkpoint (.safetensors; .ckpt / .pt with --allow-pickle)")
    missing = [p for p in model_parts(path) if not (path / p).is_dir()]
    check_configs(path)
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if not (path / "scheduler" / "scheduler_config.json").is_file() and "scheduler" not in missing:
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise ModelError(f"model directory {str(path)!r} is incomplete: missing {', '.join(missing)}")
    use_safe = {}
    for part in [p for p in WEIGHT_PARTS if p in model_parts(path)]:
        safe, pickled = _weights(path / part)
        if safe:
            use_safe[part] = True
        elif pickled:
            if not allow_pickle:
                raise ModelError(
                    f"{part}/ holds only pickle weights ({pickled[0].name}); loading pickle can run arbitrary "
                    "code, so it is refused by default. Convert the model to safetensors, or pass "
                    "--allow-pickle (allow_pickle=True) if you trust where the file came from")
            log.warning("loading pickle weights from %s (allowed explicitly)", pickled[0])
            use_safe[part] = False
        else:
            raise ModelError(f"model directory {str(path)!r} is incomplete: {part}/ has no weights "
                             "(expected a .safetensors file)")
    return use_safe


def read_index(path: Path) -> dict:
    """model_index.json of a model directory ({} when there is none); a file that is not a JSON object
    of parts is a ModelError naming it."""
    file = path / "model_index.json"
    if not file.is_file():
        return {}
    index = _read_json(file)
    for key, value in index.items():
        if key not in PARTS + OPTIONAL_PARTS:  # _class_name, requires_safety_checker, ...: not ours to judge
            continue
        if value is not None and not (isinstance(value, list) and len(value) == 2 and
                                      all(v is None or isinstance(v, str) for v in value)):
            raise ModelError(f"{file}: {key} must be [library, class] (e.g. [\"diffusers\", "
                             f"\"UNet2DConditionModel\"]) or null, got {value!r}; fix the file")
    return index


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{file}: not valid JSON ({exc}); fix or replace the file") from None
    if not isinstance(value, dict):
        raise ModelError(f"{file}: must be a JSON object of settings, got {type(value).__name__}")
    return value


_INT, _NUM, _STR, _BOOL = "a whole number", "a number", "a string", "true or false"
_INTS = "a whole number or a list of them"
# The config keys a part's loading relies on, with what each must be; a wrong one is a ModelError
# naming the file and key, before diffusers or transformers meet it
CONFIG_KEYS = {
    "unet/config.json": {"sample_size": _INTS, "in_channels": _INT, "out_channels": _INT, "layers_per_block": _INTS,
                         "cross_attention_dim": _INTS, "block_out_channels": "a list of whole numbers",
                         "attention_head_dim": _INTS, "norm_num_groups": _INT, "time_cond_proj_dim": _INT,
                         "addition_time_embed_dim": _INT, "projection_class_embeddings_input_dim": _INT,
                         "transformer_layers_per_block": _INTS},
    "vae/config.json": {"in_channels": _INT, "out_channels": _INT, "latent_channels": _INT, "sample_size": _INTS,
                        "block_out_channels": "a list of whole numbers", "layers_per_block": _INT,
                        "norm_num_groups": _INT, "scaling_factor": _NUM, "shift_factor": _NUM},
    "text_encoder/config.json": {"hidden_size": _INT, "num_hidden_layers": _INT, "num_attention_heads": _INT,
                                 "intermediate_size": _INT, "max_position_embeddings": _INT, "vocab_size": _INT,
                                 "projection_dim": _INT},
    "scheduler/scheduler_config.json": {"num_train_timesteps": _INT, "beta_start": _NUM, "beta_end": _NUM,
                                        "beta_schedule": _STR, "prediction_type": _STR, "steps_offset": _INT,
                                        "rescale_betas_zero_snr": _BOOL, "timestep_spacing": _STR},
}
CONFIG_KEYS["text_encoder_2/config.json"] = CONFIG_KEYS["text_encoder/config.json"]


def _fits(value, kind: str) -> bool:
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if value is None:
        return True  # diffusers' own "not set"
    if kind == _INT:
        return whole(value)
    if kind == _INTS:
        return whole(value) or isinstance(value, list) and all(whole(v) for v in value)
    if kind == "a list of whole numbers":
        return isinstance(value, list) and all(whole(v) for v in value)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    return isinstance(value, bool)


def check_configs(path: Path) -> None:
    """Every part config of model directory ``path`` readable and its known keys of the right type;
    a ModelError naming the file and the key otherwise (a wrong value used to be a traceback)."""
    for name, keys in CONFIG_KEYS.items():
        file = path / name
        if not file.is_file():
            continue
        config = _read_json(file)
        for key, kind in keys.items():
            if key in config and not _fits(config[key], kind):
                raise ModelError(f"{file}: {key} must be {kind}, got {config[key]!r}; fix the file")


def model_parts(path: Path) -> list[str]:
    """The parts a model directory has: model_index.json's non-empty entries (an SDXL refiner has no
    first text encoder), else the Stable Diffusion set."""
    index = read_index(path)
    if not index:
        return list(PARTS)
    present = [k for k in PARTS + OPTIONAL_PARTS if isinstance(index.get(k), list) and index[k][0] is not None]
    return present or list(PARTS)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id ("org/name") fetched to the local cache."""
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return path  # a local path (check_model_dir says so if it does not exist)
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(text, allow_patterns=["*.json", "*.txt", "*.safetensors", "tokenizer/*"])
    except Exception as exc:  # no network, unknown repo, gated repo
        raise ModelError(f"{text!r} is not a local directory and could not be fetched from the hub "
                         f"({type(exc).__name__}: {exc}); download it elsewhere and pass its directory") from exc
    return Path(local)


SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
               attention: str = "auto", config: str | os.PathLike | None = None,
               vae: str | os.PathLike | None = None) -> Model:
    """Load a Stable Diffusion model (SD 1.x, 2.x, SDXL base or refiner): a diffusers-format directory,
    or one single-file checkpoint in the original (A1111 / ComfyUI) layout (ldm.checkpoints; ``config``
    a diffusers directory of the same layout, by default the one shipped for the detected architecture).

    ``dtype``: auto (fp16 on CUDA; on a CPU bf16 where it has native bf16 units, else fp32), fp32, fp16 or
    bf16; the text encoder shares it, the VAE too except where auto chose bf16 on a CPU: the VAE stays fp32
    there (bf16 decoding moved 16 of the embedded model's images by up to 12.4/255, mean 0.26/255, to save
    0.02 s of the 1.1 s a batch of 16 takes: docs/benchmarks.md).
    ``attention``: auto (xformers when installed and on CUDA, else PyTorch's scaled-dot-product
    attention), sdpa, or xformers. ``vae`` replaces the model's VAE (ldm.checkpoints.load_vae).
    """
    path = resolve_model_path(name_or_path)
    vae_file = None if vae is None else Path(vae)  # what the PNG records (``vae`` names the module below)
    torch_dtype = resolve_dtype(dtype, device)
    device = torch.device(device)
    vae_dtype = torch_dtype
    if device.type == "cpu" and torch_dtype == torch.float16:
        log.warning("fp16 on the CPU is slow and some operations lack fp16 kernels; fp32 or bf16 is better there")
    if device.type == "cpu":
        native, why = cpu_bf16()
        if dtype in (None, "auto"):
            log.info("dtype auto on this CPU: %s (%s)%s", "bf16" if native else "fp32", why,
                     "; the VAE in fp32" if native else "")
            vae_dtype = torch.float32  # bf16 decoding costs fidelity (see above)
        elif torch_dtype == torch.bfloat16 and not native:
            log.warning("bf16 on a CPU with %s is emulated and slower than fp32", why)
    arch = None
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        loaded, config_dir, arch = _single_file(path, config, allow_pickle, torch_dtype, vae_dtype)
    else:
        loaded, config_dir = _directory(path, allow_pickle, torch_dtype, vae_dtype), path
    if vae is not None:
        from .checkpoints import CheckpointError, load_vae

        try:
            loaded["vae"] = load_vae(vae, loaded["vae"], allow_pickle=allow_pickle, dtype=vae_dtype)
        except (CheckpointError, OSError, ValueError) as exc:
            raise ModelError(str(exc)) from None
    unet, vae = loaded["unet"], loaded["vae"]
    encoders = [loaded[p] for p in ("text_encoder", "text_encoder_2") if p in loaded]
    schedule = NoiseSchedule.from_file(config_dir / "scheduler" / "scheduler_config.json")
    for m in (unet, vae, *encoders):
        m.to(device).eval().requires_grad_(False)
    set_attention(unet, vae, attention, device)
    text_width = sum(e.config.hidden_size for e in encoders)
    cross = unet.config.cross_attention_dim
    if text_width != cross:
        raise ModelError(f"model {str(path)!r}: the text encoder(s) are {text_width} wide but the U-Net attends to "
                         f"{cross}-wide text; the parts do not belong together")
    if arch is not None and arch.startswith("sd2") and config is None:  # 512-base (epsilon) or 768-v: the weights say
        from .checkpoints import predicts_v

        v = predicts_v(unet, text_width, schedule.num_train_timesteps - 1)
        schedule = NoiseSchedule(**{**schedule.to_config(), "prediction_type": "v_prediction" if v else "epsilon"})
        log.info("%s: SD 2.x predicting %s", path.name, schedule.prediction_type)
    # the name PNG metadata and the studio show: the directory's (or file's) own name, a hub id as given;
    # not model_index.json's _name_or_path, which diffusers sets to wherever the pipeline was loaded from
    if not Path(name_or_path).expanduser().exists():
        name = str(name_or_path)
    else:
        name = path.resolve().stem if path.is_file() else path.resolve().name
    index = read_index(config_dir)
    sampling = read_sampling_defaults(path) if path.is_dir() else dict(SAMPLING_DEFAULTS)
    return Model(unet, vae, loaded.get("text_encoder"), loaded.get("tokenizer"), schedule, name, path,
                 sampling, text_encoder_2=loaded.get("text_encoder_2"), tokenizer_2=loaded.get("tokenizer_2"),
                 force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
                 requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
                 vae_file=vae_file)


def _directory(path: Path, allow_pickle: bool, torch_dtype, vae_dtype) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    use_safe = check_model_dir(path, allow_pickle)
    parts = model_parts(path)
    encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    loaded = {}
    try:
        loaded["unet"] = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=use_safe["unet"],
                                                              torch_dtype=torch_dtype)
        loaded["vae"] = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=use_safe["vae"],
                                                      torch_dtype=vae_dtype)
        for part, cls in encoders.items():
            if part in parts:
                loaded[part] = cls.from_pretrained(path / part, use_safetensors=use_safe[part], dtype=torch_dtype)
        for part in ("tokenizer", "tokenizer_2"):
            if part in parts:
                loaded[part] = load_tokenizer(path / part)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"could not load the model in {str(path)!r}: {exc}") from exc
    return loaded


def _single_file(path: Path, config, allow_pickle: bool, torch_dtype, vae_dtype) -> tuple[dict, Path]:
    from .checkpoints import CheckpointError, load_single_file

    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise ModelError(f"config {str(config)!r} is not a diffusers model directory (no model_index.json)")
    if config is not None:
        check_configs(Path(config))
    try:
        loaded, arch, config_dir = load_single_file(path, config=config, allow_pickle=allow_pickle,
                                                    dtype=torch_dtype, vae_dtype=vae_dtype)
        for part in ("tokenizer", "tokenizer_2"):
            if (config_dir / part).is_dir():
                loaded[part] = load_tokenizer(config_dir / part)
    except CheckpointError as exc:
        raise ModelError(str(exc)) from None
    return loaded, config_dir, arch


def load_tokenizer(directory: Path):
    """A CLIP tokenizer directory, or a shipped config's ``tokenizer_spec.json`` (context length and pad
    token), whose files are written once from open_clip's vocabulary into the user's cache."""
    from transformers import CLIPTokenizer

    spec = directory / "tokenizer_spec.json"
    if not spec.is_file():
        return CLIPTokenizer.from_pretrained(directory)
    from .tokenizer import write_clip_tokenizer

    s = json.loads(spec.read_text())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-toolkit" / "tokenizers"
    # "-bpe": vocab.json and merges.txt only (see write_clip_tokenizer); caches of older versions kept one
    target = cache / f"clip-{s['model_max_length']}-{'bang' if s['pad_token'] == '!' else 'eot'}-bpe"
    if not (target / "tokenizer_config.json").is_file():  # written aside, then renamed: whole or not at all
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        write_clip_tokenizer(tmp, model_max_length=s["model_max_length"], pad_token=s["pad_token"])
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return CLIPTokenizer.from_pretrained(target)


def set_attention(unet, vae, attention: str, device: torch.device) -> str:
    """Choose the attention kernel; returns the one in use."""
    if attention not in ("auto", "sdpa", "xformers"):
        raise ModelError(f"unknown attention {attention!r}; choose auto, sdpa or xformers")
    want_x = attention == "xformers" or (attention == "auto" and device.type == "cuda")
    if want_x:
        try:
            import xformers  # noqa: F401
            if device.type != "cuda":
                raise RuntimeError("xformers needs a CUDA device")
            unet.enable_xformers_memory_efficient_attention()
            vae.enable_xformers_memory_efficient_attention()
            return "xformers"
        except (ImportError, RuntimeError, ModuleNotFoundError) as exc:
            if attention == "xformers":
                raise ModelError(f"xformers attention was asked for but is not usable: {exc}") from exc
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    return "sdpa"



