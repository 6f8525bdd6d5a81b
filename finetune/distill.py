"""Guidance distillation and progressive distillation: a student that samples in a few steps with
one U-Net pass per step.

- **Guidance distillation** (Meng et al. 2023, "On distillation of guided diffusion models", stage
  one): a copy of the teacher's U-Net that also takes the guidance scale w as an input (diffusers'
  ``time_cond_proj_dim``, ldm.guidance.guidance_embedding) learns, for w drawn from a range, the
  teacher's classifier-free-guided prediction (two passes) in one pass.
- **Progressive distillation** (Salimans & Ho 2022, Alg. 2): a student of N steps starts from its
  teacher's weights; at a student level t_i its target is where two deterministic DDIM steps of the
  teacher land (t_i -> t_i - 1/2N -> t_i - 1/N), turned into the x-space estimate that one student
  DDIM step would need (ldm.process.ddim_x0_for); the loss is max(SNR, 1) * |x_hat - x_target|^2.
  After each halving the student becomes the teacher. The first halving may instead learn from the
  base teacher's own guidance at the student's w (``first_halving_teacher: base``), over k of its
  DDIM steps a student step (``first_halving_substeps``): the shapes recipe's 4-step student then
  learns the teacher at 16 steps, as good as at 64, rather than at 8 (docs/distillation.md).

The noise schedule (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
flawed"). A Stable-Diffusion schedule does not reach zero SNR and its "leading" spacing starts a
4-step sampler at t = 751, far below the noise it is given. Rescaling the schedule to zero terminal
SNR would change what the teacher was trained on, so instead the students use "trailing" spacing
(every sampler starts at the last training timestep, t = 999) with the final step landing on the
clean sample (``set_alpha_to_one``), and at that first level a student is trained on pure noise,
exactly what the sampler starts from, rather than on q(x_999 | x_0). The students predict v (or x,
``prediction_type: sample``): an epsilon-predicting student cannot make a large first step, since
x0 = (x - sigma eps) / alpha amplifies its error by 1 / alpha ~ 15 at t = 999. The saved scheduler
config records the spacing and the parameterisation, so diffusers' DDIMScheduler reads them too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ldm.denoiser import make_denoiser, unet_net
from ldm.guidance import guidance_embedding, guidance_input_dim, guided
from ldm.models import Model, ModelError, check_model_dir, load_model, read_sampling_defaults
from ldm.process import ddim_step, ddim_x0_for, q_sample, to_x0, truncated_snr_weight
from ldm.schedule import NoiseSchedule, spaced_timesteps
from ldm.text import size_ids
from shapes import world as shapes

from .common import TextCache, sample_grid, save_model
from .config import ConfigError, DistillConfig
from .loop import Objective, TrainingError, train

log = logging.getLogger(__name__)

GUIDANCE_STAGE = "guidance"
STUDENT_PREDICTIONS = ("v_prediction", "sample")
STAGE_FILE = "distillation.json"
HALVING_TEACHERS = ("chain", "base")
CHAIN_FILE = "chain.json"


def check_steps(from_steps: int, to_steps: int) -> int:
    """The number of halvings from ``from_steps`` to ``to_steps``; an error unless it is a whole one."""
    if to_steps < 1 or from_steps < 1:
        raise ConfigError(f"step counts must be >= 1, got from_steps={from_steps}, to_steps={to_steps}")
    k, n = 0, from_steps
    while n > to_steps and n % 2 == 0:
        n //= 2
        k += 1
    if n != to_steps:
        valid, m = [from_steps], from_steps
        while m % 2 == 0:
            m //= 2
            valid.append(m)
        raise ConfigError(f"to_steps={to_steps} is not from_steps={from_steps} divided by a power of two; "
                          f"choose one of {', '.join(map(str, valid[1:] or valid))}")
    return k


def student_schedule(schedule: NoiseSchedule, prediction_type: str) -> NoiseSchedule:
    """The teacher's betas with the students' choices: trailing spacing, a clean last level, and v (or x)."""
    return dataclasses.replace(schedule, prediction_type=prediction_type, timestep_spacing="trailing",
                               set_alpha_to_one=True)


def student_grid(schedule: NoiseSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps,) descending trailing timesteps and (steps + 1,) levels alpha_bar, the last 1 (clean)."""
    ts = spaced_timesteps(steps, schedule.num_train_timesteps, "trailing")
    levels = [schedule.alpha_bar(t) for t in ts] + [1.0]
    return torch.tensor(ts, dtype=torch.long), torch.tensor(levels, dtype=torch.float32)


def nested_grids(schedule: NoiseSchedule, steps: int, substeps: int = 2):
    """The student's N-step grid and the teacher's (substeps x N)-step grid, checked to be nested (every
    substeps-th point of the teacher's is the student's)."""
    ts, ab = student_grid(schedule, steps)
    tts, tab = student_grid(schedule, substeps * steps)
    if not torch.equal(tts[0::substeps], ts):
        raise ConfigError(f"the {substeps * steps}-step grid does not contain the {steps}-step grid on a schedule "
                          f"of {schedule.num_train_timesteps} timesteps; choose step counts that divide it evenly")
    return ts, ab, tts, tab


def add_guidance_input(unet, dim: int):
    """A copy of ``unet`` that also takes the guidance scale (``time_cond_proj_dim`` = ``dim``), with the
    new projection zero so that it starts as the teacher's conditional branch."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ModelError(f"could not add a guidance input to the teacher's U-Net (missing {missing}, "
                         f"unexpected {unexpected})")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.to(unet.device)


class DistillData:
    """The training set, encoded once and shared by every stage: latents (N, 4, h, w) and, per image,
    a caption (data_dir) or a scene whose partial caption is drawn per batch (the shapes world)."""

    def __init__(self, cfg: DistillConfig, model: Model, progress: bool = True):
        self.scenes, self.captions = None, None
        if cfg.data_dir is None:
            self.scenes = [shapes.sample_scene(cfg.seed, i) for i in range(cfg.num_images)]
            self.latents = shapes.encode_scenes(model.vae, self.scenes, model.device, progress=progress)
        else:
            from .data import encode_views, read_image_folder, training_resolution

            data = read_image_folder(cfg.data_dir)
            self.captions = list(data["caption"])
            missing = [Path(p).name for p, c in zip(data["path"], self.captions) if not c]
            if missing:
                raise ConfigError(f"data_dir {cfg.data_dir}: {len(missing)} image(s) have no caption file "
                                  f"(e.g. {missing[0]} needs {Path(missing[0]).stem}.txt); distillation is "
                                  f"text-conditioned, so every image needs its caption")
            res = training_resolution(model, cfg.resolution)
            self.latents = encode_views(model, data, res, center_crop=True, random_flip=False,
                                        progress=progress)[:, 0]

    def __len__(self):
        return self.latents.shape[0]

    def prompts(self, idx: list[int], rng: np.random.Generator, dropout: float) -> list[str]:
        if self.captions is not None:
            return [self.captions[i] for i in idx]
        return [shapes.partial_caption(self.scenes[i], rng, dropout) for i in idx]


class DistillObjective(Objective):
    """One stage: the guidance stage (``steps`` None) or a halving to a ``steps``-step student."""

    name = "distill"

    def __init__(self, cfg: DistillConfig, teacher_dir, steps: int | None, *, guidance_input: bool,
                 teacher_scale: float, data: DistillData | None = None, init_dir=None, substeps: int = 2):
        self.cfg, self.teacher_dir, self.steps = cfg, Path(teacher_dir), steps
        self.substeps = substeps  # the teacher's DDIM steps per student step (2: a halving)
        # where the student starts when it is not the teacher's copy (a halving taught by the base
        # teacher starts from the guidance student)
        self.init_dir = None if init_dir is None else Path(init_dir)
        self.guidance_input = guidance_input  # the student takes w as an input
        self.teacher_scale = teacher_scale    # the teacher's fixed w when the student does not take it
        self.data = data
        self.name = GUIDANCE_STAGE if steps is None else f"distill-{steps}"

    def setup(self, accelerator):
        cfg = self.cfg
        self.device = accelerator.device
        self.teacher = load_model(self.teacher_dir, device=self.device, dtype="fp32")
        t = self.teacher
        self.teacher_w_input = guidance_input_dim(t.unet) is not None
        if self.data is None:
            self.data = DistillData(cfg, t, progress=self.progress)
        self.text = TextCache(t)
        self.uncond = self.text([""])  # the unconditional branch's context, (1, L, D) ...
        if t.is_sdxl and t.force_zeros_for_empty_prompt:  # ... zeros for SDXL base, as generation has it
            self.uncond = {k: torch.zeros_like(v) for k, v in self.uncond.items()}
        side = self.data.latents.shape[-1] * t.vae_factor
        self.size_row = size_ids(t, side, side) if t.is_sdxl else None  # square training images
        # the guidance stage keeps the teacher's parameterisation (its student starts as the teacher's
        # conditional branch exactly); the halvings predict v or x
        self.schedule = student_schedule(t.schedule, t.schedule.prediction_type if self.steps is None
                                         else cfg.prediction_type)
        if self.steps is not None:
            self.ts, self.ab, self.tts, self.tab = nested_grids(self.schedule, self.steps, self.substeps)
        if self.init_dir is not None:
            student = load_model(self.init_dir, device=self.device, dtype="fp32").unet
        elif self.guidance_input and not self.teacher_w_input:
            student = add_guidance_input(t.unet, cfg.guidance_embedding_dim)
        else:
            student = copy.deepcopy(t.unet)
        self.w_dim = guidance_input_dim(student)
        return {"unet": student.requires_grad_(True).train()}

    def batch(self, index, generator, rank, world):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index, rank, 47])
        b = cfg.batch_size
        idx = torch.randint(0, len(self.data), (b,), generator=generator)
        out = {"latents": self.data.latents[idx], "noise": torch.randn(self.data.latents[idx].shape, generator=generator),
               "hidden": self.text(self.data.prompts(idx.tolist(), rng, cfg.attribute_dropout))}
        if self.size_row is not None:
            out["hidden"]["time_ids"] = torch.tensor([self.size_row] * b, dtype=torch.float32)
        lo, hi = cfg.guidance_range
        out["w"] = lo + (hi - lo) * torch.rand(b, generator=generator)
        if self.steps is None:  # the guidance stage: any training timestep
            out["t"] = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=generator)
        else:                   # progressive: a level of the student's grid, 0 being the sampler's first
            out["i"] = torch.randint(0, self.steps, (b,), generator=generator)
        return out

    def _teacher_x0(self, z, t, ab, hidden, w):
        """The teacher's x0 estimate at per-sample timesteps ``t`` and levels ``ab`` (B, 1, 1, 1):
        guided by CFG at w (two passes), or given w as an input when it is itself guidance-distilled."""
        t_ = self.teacher
        cond = dict(hidden)  # encoder_hidden_states, and SDXL's text_embeds and time_ids
        if self.teacher_w_input:
            cond["timestep_cond"] = guidance_embedding(w, guidance_input_dim(t_.unet)).to(z.device)
            fn = guided(unet_net(t_.unet), cond, None, 1.0)
        else:
            scale = w if self.guidance_input else torch.full_like(w, self.teacher_scale)
            n = z.shape[0]
            uncond = {k: v.to(z.device).expand(n, *v.shape[1:]) for k, v in self.uncond.items()}
            if "time_ids" in hidden:
                uncond["time_ids"] = hidden["time_ids"]
            fn = guided(unet_net(t_.unet), cond, uncond, scale.view(-1, 1, 1, 1).to(z.device))
        return make_denoiser(fn, t_.schedule.prediction_type)(z, t, ab)

    def targets(self, batch: dict):
        """(z_t, t, alpha_bar_t, x-space target) of a batch; the teacher runs without gradients."""
        x0, noise = batch["latents"].to(self.device), batch["noise"].to(self.device)
        hidden = {k: v.to(self.device) for k, v in batch["hidden"].items()}
        w = batch["w"].to(self.device)
        with torch.no_grad():
            if self.steps is None:
                t = batch["t"].to(self.device)
                ab = self.teacher.schedule.alphas_cumprod.to(self.device)[t].view(-1, 1, 1, 1)
                z = q_sample(x0, noise, ab)
                return z, t, ab, self._teacher_x0(z, t, ab, hidden, w)
            i = batch["i"].to(self.device)
            view, k = (-1, 1, 1, 1), self.substeps
            t, ab_t = self.ts.to(self.device)[i], self.ab.to(self.device)[i].view(view)
            ab_s = self.ab.to(self.device)[i + 1].view(view)
            tts, tab = self.tts.to(self.device), self.tab.to(self.device)
            # the sampler's first level gets what the sampler starts from: pure noise
            z = torch.where((i == 0).view(view), noise, q_sample(x0, noise, ab_t))
            z_j = z  # k deterministic teacher steps t -> ... -> s on its finer grid (its point k i is t)
            for j in range(k):
                a, b = tab[k * i + j].view(view), tab[k * i + j + 1].view(view)
                z_j = ddim_step(z_j, self._teacher_x0(z_j, tts[k * i + j], a, hidden, w), a, b)
            return z, t, ab_t, ddim_x0_for(z, z_j, ab_t, ab_s)

    def loss(self, batch, modules, generator):
        z, t, ab, target = self.targets(batch)
        kwargs = {}
        if self.w_dim is not None:
            kwargs["timestep_cond"] = guidance_embedding(batch["w"], self.w_dim).to(self.device)
        ctx = {k: v.to(self.device) for k, v in batch["hidden"].items()}
        if "text_embeds" in ctx:
            kwargs["added_cond_kwargs"] = {"text_embeds": ctx["text_embeds"], "time_ids": ctx["time_ids"]}
        pred = modules["unet"](z, t, ctx["encoder_hidden_states"], **kwargs).sample
        x_hat = to_x0(pred.float(), z, ab, self.schedule.prediction_type)
        per = (x_hat - target).pow(2).mean(dim=(1, 2, 3)) * truncated_snr_weight(ab).view(-1)
        return per.mean(), {}

    def student_defaults(self) -> dict:
        """The student's sampling.json: its step count, and its default w (1 when the teacher's
        guidance is baked in without a w input)."""
        w = self.teacher_scale if (self.guidance_input or self.teacher_w_input) else 1.0
        return {"sampler": "ddim", "steps": self.steps or self.cfg.from_steps, "guidance_scale": w}

    def as_model(self, unet) -> Model:
        return dataclasses.replace(self.teacher, unet=unet, schedule=self.schedule, name=self.name,
                                   path=Path(self.cfg.output_dir), sampling_defaults=self.student_defaults())

    def validate(self, step, modules):
        return sample_grid(self.as_model(modules["unet"]), self.cfg.validation_prompts, seed=self.cfg.seed,
                           batch_size=4, trained=[modules["unet"]], cols=4)

    def save(self, directory: Path, modules):
        save_model(directory, self.as_model(modules["unet"]), sampling_defaults=self.student_defaults())
        cfg = self.cfg
        info = {"stage": self.name, "teacher": str(self.teacher_dir),
                "student_init": str(self.init_dir or self.teacher_dir),
                "teacher_steps": None if self.steps is None else self.substeps * self.steps,
                "steps": self.student_defaults()["steps"],
                "prediction_type": self.schedule.prediction_type, "timestep_spacing": "trailing",
                "guidance_input": self.w_dim is not None,
                "guidance_range": list(cfg.guidance_range) if self.w_dim is not None else None,
                "teacher_guidance": None if self.w_dim is not None else self.teacher_scale,
                "training_steps": cfg.max_steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate}
        (Path(directory) / STAGE_FILE).write_text(json.dumps(info, indent=2))


def stage_complete(directory: Path) -> bool:
    return (directory / "model_index.json").is_file() and (directory / "train_summary.json").is_file()


def plan(cfg: DistillConfig) -> tuple[list[tuple[str, int | None, int]], dict]:
    """The chain's stages as (directory name, student steps or None for the guidance stage, optimiser
    steps), and what was read from the teacher; errors for a bad teacher or step counts."""
    from .data import base_model_path

    teacher = Path(base_model_path(cfg.teacher))
    try:
        check_model_dir(teacher)
    except ModelError as exc:
        raise ModelError(f"--teacher: {exc}") from None
    halvings = check_steps(cfg.from_steps, cfg.to_steps)
    if cfg.prediction_type not in STUDENT_PREDICTIONS:
        raise ConfigError(f"prediction_type {cfg.prediction_type!r}: a few-step student predicts v or x "
                          f"(Salimans & Ho 2022, sec. 4); use one of {', '.join(STUDENT_PREDICTIONS)}")
    if len(cfg.guidance_range) != 2 or not 0 <= cfg.guidance_range[0] <= cfg.guidance_range[1]:
        raise ConfigError(f"guidance_range must be two scales lo <= hi, got {cfg.guidance_range}")
    if cfg.first_halving_teacher not in HALVING_TEACHERS:
        raise ConfigError(f"first_halving_teacher {cfg.first_halving_teacher!r}: use one of "
                          f"{', '.join(HALVING_TEACHERS)}")
    if not cfg.stage_steps or min(cfg.stage_steps) < 1:
        raise ConfigError(f"stage_steps must list at least one positive step count, got {cfg.stage_steps}")
    default_w = read_sampling_defaults(teacher)["guidance_scale"]
    scale = default_w if cfg.guidance_scale is None else cfg.guidance_scale
    index = json.loads((teacher / "unet" / "config.json").read_text())
    teacher_w_input = index.get("time_cond_proj_dim") is not None
    guide = cfg.guidance_distillation
    if guide is None:
        guide = scale != 1.0 and not teacher_w_input
    if guide and teacher_w_input:
        raise ConfigError(f"the teacher {teacher} already takes the guidance scale as an input; "
                          "leave guidance_distillation off")
    stages = [(GUIDANCE_STAGE, None, cfg.guidance_steps)] if guide else []
    n = cfg.from_steps
    for k in range(halvings):
        n //= 2
        stages.append((f"steps-{n}", n, cfg.stage_steps[min(k, len(cfg.stage_steps) - 1)]))
    return stages, {"teacher": teacher, "guidance_scale": scale, "guidance_input": guide or teacher_w_input}


def distill(cfg: DistillConfig, *, progress: bool = True) -> dict:
    """The chain into ``cfg.output_dir``, which this run owns while it lasts (OwnFolder)."""
    from pipelines.outputs import OwnFolder, check_output_dir

    with OwnFolder(check_output_dir(cfg.output_dir), "distillation run"):
        return _distill(cfg, progress=progress)


def _distill(cfg: DistillConfig, *, progress: bool = True) -> dict:
    """Run the whole chain into ``cfg.output_dir``: the guidance stage (when the teacher is guided),
    then one halving per stage, each a model directory that ``ldm generate --model`` runs at its step
    count. A finished stage is kept on --resume and refused otherwise; an unfinished one resumes
    from its last checkpoint (--resume) or is refused (the loop's rule)."""
    from pipelines.outputs import check_output_dir, write_report

    out = check_output_dir(cfg.output_dir)
    stages, info = plan(cfg)
    for name, _, _ in stages:
        d = out / name
        if stage_complete(d) and not (cfg.resume or cfg.overwrite):
            raise TrainingError(f"{d} already holds a finished stage; pass --resume to keep it and continue the "
                                f"chain, or --overwrite to train it again")
    teacher, data, record = info["teacher"], None, []
    earlier = {}  # a kept stage keeps the wall time the run that trained it recorded
    if (out / CHAIN_FILE).is_file():
        earlier = {s["stage"]: s for s in json.loads((out / CHAIN_FILE).read_text()).get("stages", [])}
    t0 = time.perf_counter()
    for name, steps, max_steps in stages:
        d = out / name
        if stage_complete(d) and cfg.resume:
            log.info("%s is finished; kept", d)
            summary = json.loads((d / "train_summary.json").read_text())
            record.append({**earlier.get(name, {}), "stage": name, **summary, "kept": True})
            teacher = d
            continue
        stage_cfg = dataclasses.replace(cfg, output_dir=str(d), max_steps=max_steps)
        init, first = None, steps == cfg.from_steps // 2
        if cfg.first_halving_teacher == "base" and first and teacher != info["teacher"]:
            # the first halving after the guidance stage: the student starts as the guidance student
            # and its targets are DDIM steps of the base teacher's own guided prediction at its w
            teacher, init = info["teacher"], teacher
        obj = DistillObjective(stage_cfg, teacher, steps, guidance_input=info["guidance_input"],
                               teacher_scale=info["guidance_scale"], data=data, init_dir=init,
                               substeps=cfg.first_halving_substeps if first else 2)
        s0 = time.perf_counter()
        summary = train(obj, stage_cfg, progress=progress)
        data = obj.data  # encoded once, shared by the later stages
        record.append({"stage": name, "wall_seconds": time.perf_counter() - s0, **summary})
        teacher = d
    result = {"teacher": str(info["teacher"]), "stages": record, "wall_seconds": time.perf_counter() - t0,
              "final": str(teacher)}
    write_report(out, result, CHAIN_FILE)
    return result
