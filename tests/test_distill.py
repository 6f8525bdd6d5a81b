"""Guidance and progressive distillation (finetune/distill.py) on tiny random models: the teacher
target against a hand-written DDIM composition, the x-space target against one student step, the
truncated-SNR weight, the guidance input, resume, the saved directories and the bad inputs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ConfigError
from finetune.distill import DistillConfig, DistillObjective, add_guidance_input, check_steps, distill, student_grid
from finetune.loop import TrainingError
from ldm.guidance import guidance_embedding
from ldm.models import ModelError, load_model
from ldm.process import ddim_step, ddim_x0_for, truncated_snr_weight
from pipelines.pipeline import Pipeline


def _cfg(teacher, out, **kw):
    base = dict(teacher=str(teacher), output_dir=str(out), from_steps=4, to_steps=2, guidance_steps=2,
                stage_steps=[2], num_images=8, batch_size=2, checkpoint_every=0, report_to="none",
                validation_prompts=["a red circle"], guidance_range=[2.0, 6.0], guidance_embedding_dim=8)
    return DistillConfig(**{**base, **kw})


def _objective(teacher, tmp_path, steps, guidance_input=False, init_dir=None, substeps=2, **kw):
    cfg = _cfg(teacher, tmp_path / "o", **kw)
    obj = DistillObjective(cfg, teacher, steps, guidance_input=guidance_input, teacher_scale=3.0, init_dir=init_dir,
                           substeps=substeps)
    torch.manual_seed(0)
    obj.modules = obj.setup(SimpleNamespace(device=torch.device("cpu"), is_main_process=False))
    return obj


def test_ddim_x0_for_inverts_the_ddim_step():
    g = torch.Generator().manual_seed(0)
    z, zs = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ab_t = torch.tensor([0.004, 0.3, 0.9]).view(-1, 1, 1, 1)
    ab_s = torch.tensor([0.05, 0.6, 1.0]).view(-1, 1, 1, 1)
    x0 = ddim_x0_for(z, zs, ab_t, ab_s)
    assert torch.allclose(ddim_step(z, x0, ab_t, ab_s), zs, atol=1e-5)
    # and with floats: the closed form of DDIM eq. 12 at sigma = 0
    x = torch.randn(1, 4, 2, 2, generator=g)
    want = math.sqrt(0.5) * x + math.sqrt(0.5) * (z[:1] - math.sqrt(0.2) * x) / math.sqrt(0.8)
    assert torch.allclose(ddim_step(z[:1], x, 0.2, 0.5), want, atol=1e-6)


def test_truncated_snr_weight():
    ab = torch.tensor([0.01, 0.5, 0.9, 0.99])
    assert torch.allclose(truncated_snr_weight(ab), torch.tensor([1.0, 1.0, 9.0, 99.0]), rtol=1e-5)
    assert truncated_snr_weight(0.2) == 1.0 and truncated_snr_weight(0.8) == pytest.approx(4.0)


def test_grids_are_trailing_and_nested():
    from ldm.schedule import NoiseSchedule

    s = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ts, ab = student_grid(s, 4)
    assert ts.tolist() == [999, 749, 499, 249] and ab[-1] == 1.0
    assert ab[0] == pytest.approx(float(s.alphas_cumprod[999]))
    ts8, _ = student_grid(s, 8)
    assert torch.equal(ts8[0::2], ts)


def test_two_step_teacher_target_is_the_ddim_composition(sd1_dir, tmp_path):
    """The target by hand: the teacher (CFG at w, epsilon) takes two DDIM steps t -> t_mid -> t_s; the
    x-space target put back through one DDIM step from t lands where the two steps landed."""
    _check_two_step_targets(_objective(sd1_dir, tmp_path, steps=2))


# student 2 steps; the teacher's trailing grid at 4 steps (a halving) and at 8 (four steps a student step)
TEACHER_GRIDS = {2: {0: (999, 749, 499), 1: (499, 249, None)},
                 4: {0: (999, 874, 749, 624, 499), 1: (499, 374, 249, 124, None)}}


def _check_two_step_targets(obj, substeps=2):
    batch = obj.batch(0, torch.Generator().manual_seed(3), 0, 1)
    batch["i"] = torch.tensor([0, 1])  # the first level (pure noise) and the last (to clean)
    z, t, ab_t, target = obj.targets(batch)
    unet, sched = obj.teacher.unet, obj.teacher.schedule
    abc = sched.alphas_cumprod.double()
    for row in range(2):
        grid = TEACHER_GRIDS[substeps][row]
        a = [1.0 if tt is None else float(abc[tt]) for tt in grid]
        x0_data, noise = batch["latents"][row:row + 1], batch["noise"][row:row + 1]
        x = noise if row == 0 else math.sqrt(a[0]) * x0_data + math.sqrt(1 - a[0]) * noise
        assert torch.allclose(z[row:row + 1], x, atol=1e-6)
        hid = batch["hidden"]["encoder_hidden_states"][row:row + 1]
        unc = obj.uncond["encoder_hidden_states"]
        w = float(batch["w"][row]) if obj.guidance_input else 3.0

        def eps(x, tt):
            with torch.no_grad():
                e_u = unet(x, tt, encoder_hidden_states=unc).sample
                e_c = unet(x, tt, encoder_hidden_states=hid).sample
            return e_u + w * (e_c - e_u)

        x_s = x
        for j in range(substeps):  # the teacher's DDIM steps (eq. 12, eta 0) by hand
            e = eps(x_s, grid[j])
            x0 = (x_s - math.sqrt(1 - a[j]) * e) / math.sqrt(a[j])
            x_s = math.sqrt(a[j + 1]) * x0 + math.sqrt(1 - a[j + 1]) * e
        # one student DDIM step from z with the target lands on x_s
        a0, a2 = a[0], a[-1]
        one = math.sqrt(a2) * target[row:row + 1] + math.sqrt(1 - a2) * (x - math.sqrt(a0) * target[row:row + 1]) \
            / math.sqrt(1 - a0)
        assert x_s.abs().max() > 0.1
        assert torch.allclose(one, x_s, atol=2e-4), (one - x_s).abs().max()
        if grid[-1] is None:  # the last step lands on the clean sample: the target is the teacher's last x0
            assert torch.allclose(target[row:row + 1], x0, atol=2e-4)


def test_four_teacher_steps_a_student_step(sd1_dir, tmp_path):
    """first_halving_substeps 4: the target is where four teacher DDIM steps on the finer grid land."""
    _check_two_step_targets(_objective(sd1_dir, tmp_path, steps=2, substeps=4), substeps=4)


def test_the_first_halving_can_learn_from_the_base_teacher(sd1_dir, tmp_path):
    """first_halving_teacher: base. The first halving's student starts as the guidance student, and
    its targets are two DDIM steps of the base teacher's own CFG at each sample's w (not the guidance
    student's one-pass imitation of it)."""
    result = distill(_cfg(sd1_dir, tmp_path / "c", first_halving_teacher="base", first_halving_substeps=4),
                     progress=False)
    assert [s["stage"] for s in result["stages"]] == ["guidance", "steps-2"]
    info = json.loads((tmp_path / "c" / "steps-2" / "distillation.json").read_text())
    assert info["teacher"] == str(sd1_dir) and info["student_init"] == str(tmp_path / "c" / "guidance")
    assert info["teacher_steps"] == 8
    assert info["guidance_input"] and Pipeline.from_pretrained(tmp_path / "c" / "steps-2").model.unet.config \
        .time_cond_proj_dim == 8
    chained = json.loads((tmp_path / "c" / "guidance" / "distillation.json").read_text())
    assert chained["student_init"] == str(sd1_dir)

    obj = _objective(sd1_dir, tmp_path, steps=2, guidance_input=True, init_dir=tmp_path / "c" / "guidance")
    start = load_model(tmp_path / "c" / "guidance").unet.state_dict()
    got = obj.modules["unet"].state_dict()
    assert got.keys() == start.keys() and all(torch.equal(got[k], start[k]) for k in got)
    assert not obj.teacher_w_input  # the teacher runs two passes and mixes them at the batch's w
    _check_two_step_targets(obj)


def test_guidance_input_starts_as_the_conditional_branch_and_w_matters(sd1_dir, tmp_path):
    model = load_model(sd1_dir)
    student = add_guidance_input(model.unet, 8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hid = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.unet(x, 500, encoder_hidden_states=hid).sample
        got = student(x, 500, encoder_hidden_states=hid, timestep_cond=guidance_embedding(5.0, 8, 2)).sample
        assert torch.equal(ref, got)  # the w projection starts at zero
        student.time_embedding.cond_proj.weight.normal_(0, 0.5)  # as after training
        a = student(x, 500, encoder_hidden_states=hid, timestep_cond=guidance_embedding(1.0, 8, 2)).sample
        b = student(x, 500, encoder_hidden_states=hid, timestep_cond=guidance_embedding(5.0, 8, 2)).sample
    assert (a - b).abs().max() > 1e-3


def test_guidance_embedding_is_the_lcm_convention():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.0, 2.5, 8.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=16)
    assert torch.allclose(guidance_embedding(w, 16), ref, atol=1e-4)


def _unet_rows(pipe, **kw):
    rows = []
    hook = pipe.model.unet.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        res = pipe.text_to_image("a red circle", seed=0, **kw)
    finally:
        hook.remove()
    return res, rows


def test_chain_saves_models_that_generate_at_their_step_count(sd1_dir, tmp_path):
    result = distill(_cfg(sd1_dir, tmp_path / "c"), progress=False)
    assert [s["stage"] for s in result["stages"]] == ["guidance", "steps-2"]
    assert (tmp_path / "c" / "chain.json").is_file()
    student = Pipeline.from_pretrained(tmp_path / "c" / "steps-2")
    sched = json.loads((tmp_path / "c" / "steps-2" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"
    assert sched["set_alpha_to_one"] is True
    assert student.model.sampling_defaults["steps"] == 2
    assert student.model.unet.config.time_cond_proj_dim == 8
    res, rows = _unet_rows(student)
    assert rows == [1, 1]  # two steps, one pass each, no unconditional branch
    other, _ = _unet_rows(student, guidance_scale=1.5)
    assert not torch.equal(res.pixels, other.pixels)  # w reaches the model
    guid = Pipeline.from_pretrained(tmp_path / "c" / "guidance")
    assert guid.model.sampling_defaults["steps"] == 4 and guid.model.schedule.prediction_type == "epsilon"
    info = json.loads((tmp_path / "c" / "steps-2" / "distillation.json").read_text())
    assert info["teacher"] == str(tmp_path / "c" / "guidance")
    # a finished stage is never overwritten silently
    with pytest.raises(TrainingError, match="already holds a finished stage"):
        distill(_cfg(sd1_dir, tmp_path / "c"), progress=False)
    kept = distill(_cfg(sd1_dir, tmp_path / "c", resume=True), progress=False)
    assert all(s.get("kept") for s in kept["stages"])
    # a kept stage keeps the wall time of the run that trained it (chain.json is rewritten whole)
    assert [s["wall_seconds"] for s in kept["stages"]] == [s["wall_seconds"] for s in result["stages"]]
    assert json.loads((tmp_path / "c" / "chain.json").read_text())["stages"] == kept["stages"]


@pytest.mark.parametrize("guided", [False, True])
def test_student_matches_diffusers_on_its_saved_scheduler(sd1_dir, tmp_path, guided):
    """Without the guidance stage w is baked into a v-predicting student; with it the student takes w
    as an input (time_cond_proj_dim). Either way diffusers' StableDiffusionPipeline, reading the saved
    scheduler config (and, for the second, embedding w - 1 as its LCM support does, in one pass),
    samples it as we do."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    distill(_cfg(sd1_dir, tmp_path / "u", guidance_distillation=guided), progress=False)
    d = tmp_path / "u" / "steps-2"
    ours = Pipeline.from_pretrained(d)
    w = 4.0 if guided else 1.0
    if guided:
        assert ours.model.unet.config.time_cond_proj_dim == 8
    else:
        assert ours.model.sampling_defaults["guidance_scale"] == 1.0 and ours.model.unet.config.time_cond_proj_dim is None
    ref = StableDiffusionPipeline.from_pretrained(d, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    expect = ref("a red circle", num_inference_steps=2, guidance_scale=w,
                 generator=[torch.Generator().manual_seed(5)], output_type="np").images
    got = ours.text_to_image("a red circle", seed=5, guidance_scale=w).pixels.permute(0, 2, 3, 1).numpy()
    assert expect.std() > 0.02
    assert np.abs(got - expect).max() < 1e-3


def test_resume_equals_an_uninterrupted_chain(sd1_dir, tmp_path, monkeypatch):
    kw = dict(stage_steps=[4], checkpoint_every=2, ema_decay=0.9)
    distill(_cfg(sd1_dir, tmp_path / "a", **kw), progress=False)

    original = DistillObjective.after_step

    def interrupt(self, step, modules):
        original(self, step, modules)
        if self.steps == 2 and step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(DistillObjective, "after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(sd1_dir, tmp_path / "b", **kw), progress=False)
    monkeypatch.setattr(DistillObjective, "after_step", original)
    with pytest.raises(TrainingError, match="finished stage"):  # nothing is restarted silently
        distill(_cfg(sd1_dir, tmp_path / "b", **kw), progress=False)
    result = distill(_cfg(sd1_dir, tmp_path / "b", resume=True, **kw), progress=False)
    assert result["stages"][0].get("kept") and result["stages"][1]["steps"] == 2  # resumed from checkpoint-2
    a = load_file(tmp_path / "a" / "steps-2" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "steps-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, error, match", [
    (dict(to_steps=3), ConfigError, "not from_steps=4 divided by a power of two; choose one of 2, 1"),
    (dict(prediction_type="epsilon"), ConfigError, "predicts v or x"),
    (dict(guidance_range=[5.0, 2.0]), ConfigError, "guidance_range"),
    (dict(first_halving_substeps=1), ConfigError, "first_halving_substeps=1: must be >= 2"),
    (dict(first_halving_teacher="teacher"), ConfigError, "first_halving_teacher 'teacher': use one of chain, base"),
])
def test_bad_settings_are_clear_errors(sd1_dir, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        distill(_cfg(sd1_dir, tmp_path / "x", **kw), progress=False)


def test_a_teacher_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelError, match="--teacher: .*incomplete"):
        distill(_cfg(tmp_path / "notamodel", tmp_path / "x"), progress=False)
    assert check_steps(64, 4) == 4


def test_an_sdxl_teacher_distils_end_to_end_and_diffusers_runs_the_student(sdxl_dir, tmp_path):
    """Guidance then one halving with a tiny SDXL teacher: the student is an SDXL directory taking w as
    an input (time_cond_proj_dim), and StableDiffusionXLPipeline runs it to our image in one pass a step."""
    from diffusers import StableDiffusionXLPipeline

    result = distill(_cfg(sdxl_dir, tmp_path / "c"), progress=False)
    assert [s["stage"] for s in result["stages"]] == ["guidance", "steps-2"]
    student = Pipeline.from_pretrained(tmp_path / "c" / "steps-2")
    assert student.model.arch == "sdxl" and student.model.unet.config.time_cond_proj_dim == 8
    ours = student.text_to_image("a red circle", seed=4, guidance_scale=3.0).pixels
    ref = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "c" / "steps-2"))
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                 generator=torch.Generator().manual_seed(4)).images
    assert (ours - theirs).abs().max() <= 2 / 255


def test_the_first_halving_flags_reach_the_recipe(sd1_dir, tmp_path, capsys):
    from pipelines.cli import main

    rc = main(["distill", "--teacher", str(sd1_dir), "--output-dir", str(tmp_path / "x"),
               "--first-halving-teacher", "teacher", "--first-halving-substeps", "4", "--quiet"])
    assert rc == 2
    assert "first_halving_teacher 'teacher': use one of chain, base" in capsys.readouterr().err
    rc = main(["distill", "--teacher", str(sd1_dir), "--output-dir", str(tmp_path / "y"),
               "--first-halving-substeps", "1", "--quiet"])
    assert rc == 2 and "first_halving_substeps=1: must be >= 2" in capsys.readouterr().err
