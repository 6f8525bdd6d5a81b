"""The ldm command end to end on a tiny model (in-process, through main())."""

import json
import ast

import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.pngmeta import format_parameters, parse_parameters, read_parameters


def test_generate_writes_a_png_with_a1111_parameters(sd1_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    rc = main(["generate", "a large red circle on a blue background", "--model", str(sd1_dir), "--output", str(out),
               "--seed", "7", "--steps", "3", "--negative", "blurry", "--sampler", "euler", "--guidance", "5",
               "--quiet"])
    assert rc == 0 and out.is_file()
    with Image.open(out) as im:
        assert im.size == (64, 64)
    text = read_parameters(out)
    lines = text.split("\n")
    assert lines[0] == "a large red circle on a blue background"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2] == f"Steps: 3, Sampler: Euler, Schedule type: Uniform, CFG scale: 5.0, Seed: 7, Size: 64x64, Model: {sd1_dir.name}"
    p = parse_parameters(text)
    assert p["prompt"] == lines[0] and p["negative_prompt"] == "blurry" and p["Seed"] == "7"


def test_cli_image_equals_the_pipeline_image(sd1_dir, sd1_pipe, tmp_path):
    out = tmp_path / "a.png"
    main(["generate", "a star", "--model", str(sd1_dir), "--output", str(out), "--seed", "3", "--steps", "2", "--quiet"])
    expect = sd1_pipe.text_to_image("a star", steps=2, seed=3).images[0]
    with Image.open(out) as im:
        assert list(im.convert("RGB").getdata()) == list(expect.getdata())


def test_batch_output_dir_and_grid(sd1_dir, tmp_path):
    rc = main(["generate", "a star", "--model", str(sd1_dir), "--output-dir", str(tmp_path), "--batch-size", "3",
               "--seed", "10", "--steps", "2", "--grid", "--quiet"])
    assert rc == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["00000-10.png", "00000-11.png", "00000-12.png", "grid.png"]
    with Image.open(tmp_path / "grid.png") as g:
        assert g.size == (128, 128)
    assert "Seed: 12" in read_parameters(tmp_path / "00000-12.png")


def test_from_file_writes_each_prompt_and_a_rerun_skips_what_exists(sd1_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n# a comment\na blue square\n")
    out = tmp_path / "out"
    args = ["generate", "--from-file", str(prompts), "--model", str(sd1_dir), "--output-dir", str(out),
            "--seed", "1", "--steps", "2", "--quiet"]
    assert main(args) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-1.png", "00001-2.png"]
    assert read_parameters(files[1]).startswith("a blue square\n")
    mtimes = [f.stat().st_mtime_ns for f in files]
    files[1].unlink()
    assert main(args) == 0
    assert files[0].stat().st_mtime_ns == mtimes[0]  # kept, not regenerated
    assert files[1].is_file()


def test_img2img_and_inpaint_commands(sd1_dir, tmp_path):
    img = tmp_path / "in.png"
    Image.new("RGBA", (64, 64), (200, 20, 20, 128)).save(img)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    assert main(["img2img", "a star", "--model", str(sd1_dir), "--image", str(img), "--strength", "0.5",
                 "--steps", "4", "--output", str(tmp_path / "i2i.png"), "--seed", "0", "--quiet"]) == 0
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "i2i.png")
    assert main(["inpaint", "a star", "--model", str(sd1_dir), "--image", str(img), "--mask", str(mask),
                 "--steps", "2", "--output", str(tmp_path / "inp.png"), "--seed", "0", "--quiet"]) == 0
    assert (tmp_path / "inp.png").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--width", "65"], "--width must be a positive multiple of 8, got 65"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--guidance", "-2"], "--guidance must be a finite number from 0 to 100"),
    (["--guidance", "inf"], "--guidance must be a finite number from 0 to 100"),
    (["--guidance", "nan"], "--guidance must be a finite number from 0 to 100"),
    (["--batch-size", "2", "--output", "x.png"], "use --output-dir"),
    (["--guidance-rescale", "2"], "--guidance-rescale must be between 0 and 1, got 2.0"),
    (["--eta", "-1"], "--eta must be between 0 and 1, got -1.0"),
    (["--sampler", "euler", "--eta", "0.5"], "--eta applies to the ddim, euler-a, dpmpp-2m-sde, dpmpp-sde samplers, not euler"),
    (["--sampler", "ddim", "--s-noise", "0.5"], "--s-noise applies to the euler-a, dpmpp-2m-sde, dpmpp-sde samplers, not ddim"),
    (["--sampler", "euler-a", "--s-noise", "1.5"], "--s-noise must be between 0 and 1.1, got 1.5"),
    (["--output", "x.jpg"], "give a name ending in .png"),
])
def test_bad_arguments_exit_2_with_a_message(sd1_dir, capsys, extra, message):
    assert main(["generate", "a star", "--model", str(sd1_dir), "--quiet"] + extra) == 2
    assert message in capsys.readouterr().err


def test_bad_files_exit_2_with_a_message(sd1_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    assert main(["img2img", "x", "--model", str(sd1_dir), "--image", str(broken)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good)
    small = tmp_path / "small.png"
    Image.new("L", (32, 32)).save(small)
    assert main(["inpaint", "x", "--model", str(sd1_dir), "--image", str(good), "--mask", str(small)]) == 2
    assert "--mask is 32x32 but the image is 64x64" in capsys.readouterr().err
    for s in ("0", "1.5"):
        assert main(["img2img", "x", "--model", str(sd1_dir), "--image", str(good), "--strength", s]) == 2
        assert "--strength must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_destinations_fail_before_any_work(tmp_path, capsys):
    """The model path does not exist: an error about the destination proves it was checked first."""
    missing_model = str(tmp_path / "no-model")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--output", "/proc/x.png"], "--output's folder '/proc' cannot be written"),
             (["--output-dir", str(a_file / "sub")], f"--output-dir {str(a_file / 'sub')!r} cannot be written"),
             (["--output-dir", str(a_file)], "is a file, not a folder")]
    for extra, message in cases:
        assert main(["generate", "a star", "--model", missing_model, "--quiet"] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n")
    assert main(["generate", "--from-file", str(prompts), "--model", missing_model, "--output-dir", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_binary_prompt_file_names_the_file_and_the_flag(sd1_dir, tmp_path, capsys):
    blob = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(blob)
    assert main(["generate", "--from-file", str(blob), "--model", str(sd1_dir), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--from-file {str(blob)!r} is not UTF-8 text" in err


def test_parameters_round_trip_with_commas_in_values():
    text = format_parameters("a, b", "c", steps=2, sampler="dpmpp-2m", guidance=1.0, seed=3, width=8, height=16,
                             model="my, model")
    p = parse_parameters(text)
    assert p["prompt"] == "a, b" and p["Sampler"] == "DPM++ 2M" and p["Model"] == "my, model" and p["Size"] == "8x16"


@pytest.mark.parametrize("content, message", [
    ('{"guidance_scale": "high"}', "guidance_scale must be a number from 0 to 100 (1 turns guidance off), got 'high'"),
    ('{"guidance_scale": NaN}', "not valid JSON (NaN is not a number JSON allows"),
    ('{"guidance_scale": 1e30}', "guidance_scale must be a finite number from 0 to 100"),
    ('{"steps": 2.5}', "steps must be a whole number >= 1, got 2.5"),
    ('{"sampler": "pndm-prk"}', "sampler must be one of ddim"),
])
def test_a_bad_sampling_json_value_is_a_clear_error(sd1_dir, tmp_path, capsys, content, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sd1_dir, model)
    (model / "sampling.json").write_text(content)
    assert main(["generate", "a star", "--model", str(model), "--output", str(tmp_path / "x.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{model / 'sampling.json'}: {message}" in err and "Traceback" not in err


def test_generate_uses_the_models_sampling_defaults(sd1_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sd1_dir, model)
    (model / "sampling.json").write_text('{"steps": 2, "guidance_scale": 3.0}')
    out = tmp_path / "one.png"
    assert main(["generate", "a star", "--model", str(model), "--output", str(out), "--seed", "1", "--quiet"]) == 0
    assert "Steps: 2, Sampler: DDIM, CFG scale: 3.0" in read_parameters(out)
    assert main(["generate", "a star", "--model", str(model), "--output", str(out), "--seed", "1", "--quiet",
                 "--steps", "3", "--guidance", "1"]) == 0
    assert "Steps: 3, Sampler: DDIM, CFG scale: 1.0" in read_parameters(out)


@pytest.mark.parametrize("command", [["train-vae"], ["textual-inversion", "--data-dir", "nowhere"], ["distill"],
                                     ["demo", "textual-inversion"]])
def test_training_commands_check_their_output_dir_first(tmp_path, capsys, command):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(command + ["--output-dir", str(a_file / "sub"), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {str(a_file / 'sub')!r} cannot be written" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,shown,allowed", [
    (["generate", "--help"], "--negative", ()),
    (["serve", "--help"], "--models-dir", ()),
    (["edit", "--help"], "--cross-replace", ()),
    (["--help"], "textual-inversion", ("finetune", "shapes")),  # the plug-ins name their commands
    (["dreambooth", "--help"], "--instance-data-dir", ("finetune", "shapes")),  # flags typed from the recipe
    (["distill", "--help"], "--guidance-scale", ("finetune", "shapes")),
])
def test_help_imports_no_torch_training_server_or_data_code(argv, shown, allowed):
    """`ldm --help` and every command's --help answer without PyTorch (about 1.3 s to import here),
    and a core command loads no plug-in: no training modules, shapes world, fastapi, peft, datasets,
    transformers or diffusers (a training command's help reads its recipe class from finetune.config)."""
    import subprocess
    import sys

    code = (f"import sys\nfrom pipelines.cli import main\ntry:\n    main({argv!r})\n"
            "except SystemExit:\n    pass\n"
            "heavy = ('torch', 'fastapi', 'uvicorn', 'peft', 'datasets', 'finetune', 'shapes', 'transformers', "
            "'diffusers')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown in out.stdout  # the help was printed
    loaded = ast.literal_eval(out.stderr.strip().splitlines()[-1])
    assert set(loaded) <= set(allowed), out.stderr
    if argv == ["--help"]:
        assert "build-shapes-model" in out.stdout and "dreambooth" in out.stdout  # it lists them all


def test_threads_auto_takes_a_core_per_idle_one(monkeypatch):
    """--threads auto: PyTorch's own (a thread per core) on an idle machine, one core fewer per other
    process ready to run, at least one; a number as given; 0 refused."""
    import os

    from pipelines import processes
    cores = os.cpu_count() or 1
    monkeypatch.setattr(processes, "runnable_others", lambda: 0)
    assert processes.choose_threads("auto") is None
    monkeypatch.setattr(processes, "runnable_others", lambda: cores + 3)
    assert processes.choose_threads("auto") == 1
    monkeypatch.setattr(processes, "runnable_others", lambda: None)  # not Linux: PyTorch's own
    assert processes.choose_threads("auto") is None
    monkeypatch.setattr(processes, "runnable_others", lambda: 1)
    assert processes.choose_threads("auto") == max(1, cores - 1)
    assert processes.choose_threads("3") == 3 and processes.choose_threads("default") is None
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        processes.choose_threads("0")


def test_console_script_leaves_one_shot_commands_at_once_with_their_exit_status(sd1_dir, tmp_path):
    """`ldm generate` through the console script: the image is whole and equals the one main() writes in
    this process (up to rounding), the exit status is main's (0, or 2 with the message printed), and a command that is
    not one-shot (here `ldm serve --help`) still exits through sys.exit."""
    import subprocess
    import sys

    import numpy as np

    from ldm.images import load_image

    def start(*argv):
        code = f"import sys\nsys.argv = ['ldm', *{list(argv)!r}]\nfrom pipelines.cli import entry\nentry()\n"
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path)

    def console(*argv):
        return finish(start(*argv))

    def finish(proc):
        out, err = proc.communicate(timeout=240)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    common = ["a red circle", "--model", str(sd1_dir), "--steps", "2", "--seed", "5", "--width", "64", "--height", "64"]
    # the failing command runs beside the good one (each process is mostly its imports, on one core)
    bad = start("generate", *common[:-4], "--width", "60", "--output", str(tmp_path / "bad.png"))
    out = console("generate", *common, "--output", str(tmp_path / "console.png"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "console.png")
    assert main(["generate", *common, "--output", str(tmp_path / "inproc.png")]) == 0
    # the same image up to float rounding: beside the other process, --threads auto may run it on one thread
    console_px, inproc_px = (np.asarray(load_image(tmp_path / f), dtype=int) for f in ("console.png", "inproc.png"))
    assert np.abs(console_px - inproc_px).max() <= 2
    bad = finish(bad)
    assert bad.returncode == 2 and "multiple of 8" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad.png").exists()
    assert console("serve", "--help").returncode == 0


def test_a_training_command_says_where_each_checkpoint_landed(tmp_path, caplog):
    """One line per checkpoint naming its final directory; accelerate's INFO lines about the
    temporary directory it writes first stay out of the terminal."""
    out = tmp_path / "vae"
    with caplog.at_level("INFO"):
        assert main(["train-vae", "--max-steps", "2", "--output-dir", str(out), "--quiet", "--checkpoint-every", "1",
                     "--set", "batch_size=2", "--set", "scale_images=8", "--set", "validation_every=0"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if "checkpoint saved" in m] == [
        f"step {n}: checkpoint saved to {out / f'checkpoint-{n}'}" for n in (1, 2)]
    assert not [m for m in lines if ".tmp-" in m]


@pytest.mark.parametrize("file, edit, message", [
    ("unet/config.json", {"cross_attention_dim": "512"}, "unet/config.json: cross_attention_dim must be a whole number"),
    ("model_index.json", {"unet": 12345}, "model_index.json: unet must be [library, class]"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": "many"},
     "scheduler/scheduler_config.json: num_train_timesteps must be a whole number, got 'many'"),
    ("model_index.json", None, "model_index.json: not valid JSON"),
    ("vae/config.json", {"scaling_factor": "big"}, "vae/config.json: scaling_factor must be a number"),
])
def test_a_bad_model_config_is_a_one_line_error(sd1_dir, tmp_path, capsys, file, edit, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sd1_dir, model)
    target = model / file
    if edit is None:
        target.write_text("{not json")
    else:
        target.write_text(json.dumps({**json.loads(target.read_text()), **edit}))
    assert main(["generate", "a star", "--model", str(model), "--output", str(tmp_path / "x.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{model / file.split('/')[0]}" in err and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("device, message", [
    ("banana", "--device 'banana' is not a device name PyTorch knows"),
    ("cuda" if not __import__("torch").cuda.is_available() else "cuda:99", "--device cuda"),
])
def test_a_device_this_machine_lacks_is_a_clear_error(tmp_path, capsys, device, message):
    for argv in (["generate", "a red circle", "--output", str(tmp_path / "x.png")],
                 ["serve", "--output-dir", str(tmp_path / "s")], ["eval", "--output-dir", str(tmp_path / "e")]):
        assert main(argv + ["--device", device]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_an_image_that_cannot_take_its_name_takes_another_and_nothing_is_lost(tmp_path, capsys, caplog):
    """Issue 52 (22): a folder where an image's file goes made a traceback, lost the batch's other images
    and left a .tmp; --from-file skipped that prompt as done."""
    out = tmp_path / "out"
    (out / "00000-2.png").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        assert main(["generate", "a red circle", "--batch-size", "3", "--seed", "1", "--steps", "2",
                     "--output-dir", str(out), "--quiet"]) == 0
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == ["00000-1.png", "00000-2-1.png", "00000-3.png"], files
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert not list(out.glob(".*tmp"))


def test_exclusive_writes_and_stale_temporaries(tmp_path):
    import os
    import time

    from PIL import Image

    from pipelines.outputs import check_output_dir
    from pipelines.pngmeta import save_png

    img = Image.new("RGB", (8, 8))
    a = save_png(img, tmp_path / "x.png", "a", exclusive=True)
    b = save_png(img, tmp_path / "x.png", "b", exclusive=True)  # a second server, the same second
    assert (a.name, b.name) == ("x.png", "x-1.png")
    stale, fresh = tmp_path / ".y.png.123-abcd.tmp", tmp_path / ".z.png.456-ef01.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    check_output_dir(tmp_path)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--seen", "-1"], "--seen must be 0 or more, got -1"),
    (["eval", "--seen", "0", "--heldout", "0"], "leave nothing to judge"),
    (["generate", "--from-file", "{dir}"], "--from-file '{dir}' is a folder"),
    (["img2img", "a red circle", "--image", "{dir}", "--output", "{dir}/x.png"], "'{dir}' is a folder"),
    (["convert", "missing.safetensors", "{dir}/out"], "'missing.safetensors' does not exist; give a model directory"),
])
def test_smaller_bad_inputs_name_the_problem(tmp_path, capsys, argv, message):
    argv = [a.format(dir=tmp_path) for a in argv]
    if argv[0] == "eval":
        argv += ["--output-dir", str(tmp_path / "e")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(dir=tmp_path) in err and "Traceback" not in err, err
