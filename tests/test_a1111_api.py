"""AUTOMATIC1111's HTTP API on a running ``ldm serve``, driven by a real A1111 client: the ``webuiapi``
package, as editor plug-ins and bots use it. The images must be the pipeline's own for the same
settings, and the answers shaped as A1111's (base64 images, info as a JSON string with seeds and
infotexts)."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

PROMPT = "a large red circle on a blue background"


@pytest.fixture(scope="module")
def api(tmp_path_factory, sd1_dir):
    models = tmp_path_factory.mktemp("models")
    (models / "tiny-sd1").symlink_to(sd1_dir)
    out = tmp_path_factory.mktemp("out")
    upscalers = tmp_path_factory.mktemp("upscalers")
    from ldm.tiny import random_upscaler

    random_upscaler(upscalers / "tiny-esrgan-4x.safetensors", "esrgan", scale=4, seed=5)
    random_upscaler(upscalers / "tiny-compact-2x.pth", "compact", scale=2, seed=6)  # a pickle: refused
    vaes = tmp_path_factory.mktemp("vaes")
    _brighter_vae(vaes / "brighter.safetensors")
    from ldm.checkpoints import vae_file
    from ldm.models import load_model

    vae_file(load_model(sd1_dir).vae, vaes / "sd1-vae.safetensors")  # another layout's: does not fit
    loras, embeds = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("embeds")
    import torch

    from ldm.embeddings import write_embeddings
    from ldm.tiny import random_lora

    random_lora("ldm/assets/shapes-model", loras, sdxl=False, seed=4, name="shapes-lora.safetensors")
    width = load_model("ldm/assets/shapes-model").text_encoder.config.hidden_size
    write_embeddings(embeds / "glow.safetensors", {"<glow>": torch.randn(1, width, generator=torch.Generator().manual_seed(0))})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    import torch

    # the server's threads are this process's: the images are compared bit for bit with in-process ones, and
    # `--threads auto` would take fewer on a busy machine (another order of float sums, a pixel level off)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port), "--models-dir",
                             str(models), "--output-dir", str(out), "--max-steps", "60", "--upscalers-dir",
                             str(upscalers), "--vae-dir", str(vaes), "--lora-dir", str(loras), "--embeddings-dir",
                             str(embeds),
                             "--threads", str(torch.get_num_threads())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
    client = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=8)
    client.proc, client.upscalers, client.vaes = proc, upscalers, vaes
    yield client
    proc.terminate()
    proc.wait(30)


def _brighter_vae(path):
    """The embedded model's VAE with its decoder's last bias raised (images come out brighter), as a VAE
    file in the original keys, as A1111's models/VAE holds them."""
    import torch

    from ldm.checkpoints import vae_file
    from ldm.models import load_model

    vae = load_model("ldm/assets/shapes-model").vae
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.3
    return vae_file(vae, path)


@pytest.fixture(scope="module")
def pipe():
    from pipelines.pipeline import Pipeline
    return Pipeline.from_pretrained("ldm/assets/shapes-model")


def test_samplers_and_schedulers_in_a1111_names(api):
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "UniPC", "LMS", "Heun", "DPM2", "LCM", "DDIM"} <= set(names)
    assert {s["label"] for s in api.get_schedulers()} >= {"Automatic", "Karras", "Exponential", "SGM Uniform"}


def test_txt2img_is_the_pipelines_image_with_a1111s_answer(api, pipe):
    r = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, steps=8, cfg_scale=5.0, width=64, height=64,
                    sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2)
    assert len(r.images) == 2 and r.image.size == (64, 64)
    assert r.info["all_seeds"] == [5, 6] and r.info["seed"] == 5
    assert r.info["sampler_name"] == "DPM++ 2M" and r.info["scheduler"] == "Karras"
    assert "Schedule type: Karras" in r.info["infotexts"][0] and r.parameters["prompt"] == PROMPT
    ours = pipe.text_to_image(PROMPT, negative_prompt="blurry", seed=5, steps=8, guidance_scale=5.0,
                              sampler="dpmpp-2m", schedule="karras", batch_size=2)
    for got, want in zip(r.images, ours.images):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    # png-info reads the parameters back, as A1111's PNG Info tab would
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]
    assert info.parameters["Sampler"] == "DPM++ 2M" and info.parameters["Seed"] == "5"


def test_random_seed_hires_fix_and_variation_seed(api):
    r = api.txt2img(prompt=PROMPT, seed=-1, steps=6, width=64, height=64, enable_hr=True, hr_scale=2,
                    denoising_strength=0.5, hr_upscaler=webuiapi.HiResUpscaler.Latent)
    assert r.image.size == (128, 128) and r.info["seed"] >= 0
    assert "Hires upscale: 2" in r.info["infotexts"][0]
    v = api.txt2img(prompt=PROMPT, seed=3, subseed=9, subseed_strength=0.25, steps=6, width=64, height=64)
    assert v.info["subseed"] == 9 and "Variation seed strength: 0.25" in v.info["infotexts"][0]


def test_img2img_and_inpainting(api, pipe):
    base = pipe.text_to_image(PROMPT, seed=1, steps=6).images[0]
    r = api.img2img(images=[base], prompt="a blue square", denoising_strength=0.5, seed=2, steps=8, width=64,
                    height=64, sampler_name="Euler")
    ours = pipe.image_to_image("a blue square", base, strength=0.5, seed=2, steps=8, sampler="euler",
                               guidance_scale=7.0)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(ours.images[0]))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    m = api.img2img(images=[base], mask_image=mask, mask_blur=0, prompt="a green star", denoising_strength=1.0, seed=2,
                    steps=8, width=64, height=64, sampler_name="Euler")
    out, src, inside = np.asarray(m.image.convert("RGB")), np.asarray(base), np.asarray(mask) == 255
    assert np.array_equal(out[~inside], src[~inside])  # outside the mask: the input's pixels, as A1111 pastes them
    assert np.abs(out[inside].astype(int) - src[inside]).mean() > 5
    # A1111's inpainting settings, as webuiapi sends them, give the pipeline's own image for the same settings
    r = api.img2img(images=[base], mask_image=mask, mask_blur=3, inpainting_fill=2, inpaint_full_res=False,
                    inpainting_mask_invert=1, initial_noise_multiplier=0.9, prompt="a green star", seed=2, steps=8,
                    denoising_strength=0.9, width=64, height=64, sampler_name="Euler")
    ours = pipe.inpaint("a green star", base, mask, mask_blur=3, inpaint_fill="latent-noise", mask_invert=True,
                        noise_multiplier=0.9, strength=0.9, seed=2, steps=8, sampler="euler", guidance_scale=7.0)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(ours.images[0]))
    assert "Masked content: latent noise" in r.info["infotexts"][0] and "Noise multiplier: 0.9" in r.info["infotexts"][0]


def test_bad_values_are_422_naming_a1111s_field(api):
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt=PROMPT, width=60, height=64, steps=4)
    assert e.value.args[0] == 422 and "width" in e.value.args[1]
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt=PROMPT, sampler_name="Nope", width=64, height=64, steps=4)
    assert e.value.args[0] == 422 and "sampler_name" in e.value.args[1]


def test_options_switch_models_and_override_settings(api):
    assert api.get_options()["sd_model_checkpoint"] == "shapes-model"
    titles = [m["title"] for m in api.get_sd_models()]
    assert titles == ["shapes-model", "tiny-sd1"]
    api.util_set_model("tiny-sd1")
    assert api.util_get_current_model() == "tiny-sd1"
    r = api.txt2img(prompt=PROMPT, seed=1, steps=3, width=64, height=64)
    assert r.info["sd_model_name"] == "tiny-sd1"
    api.set_options({"sd_model_checkpoint": "shapes-model"})
    r = api.txt2img(prompt=PROMPT, seed=1, steps=3, width=64, height=64,
                    override_settings={"sd_model_checkpoint": "tiny-sd1", "CLIP_stop_at_last_layers": 2})
    assert r.info["sd_model_name"] == "tiny-sd1" and r.info["clip_skip"] == 2
    assert api.get_options()["sd_model_checkpoint"] == "shapes-model"  # restored afterwards, as A1111 does


def _while_sampling(api, when, **payload):
    """Start a txt2img of ``payload`` in a thread; return once ``when(progress)`` holds (60 s at most), with
    the thread and a dict that gets the answer under "r"."""
    done = {}
    t = threading.Thread(target=lambda: done.update(r=api.txt2img(prompt=PROMPT, width=64, height=64, **payload)))
    t.start()
    deadline = time.time() + 60
    while not when(p := api.get_progress()):
        assert time.time() < deadline
        time.sleep(0.02)
    return t, done, p


def test_progress_and_interrupt(api):
    # (the job before may still be current a moment, loading its model back after override_settings)
    t, done, p = _while_sampling(api, lambda p: p["state"]["sampling_step"] > 0 and p["state"]["sampling_steps"] == 180,
                                 seed=1, steps=60, batch_size=4, n_iter=3)
    assert 0 < p["progress"] < 1
    api.interrupt()
    t.join(60)
    assert not t.is_alive() and done["r"].images == []


def test_skip_drops_the_running_batch_and_the_job_goes_on(api):
    """A1111's skip: the batch being sampled is dropped; the job's next batches (n_iter) are made and
    answered, with their own seeds."""
    t, done, _ = _while_sampling(api, lambda p: 0 < p["state"]["sampling_step"] < 40,  # the first batch samples
                                 seed=10, steps=40, batch_size=2, n_iter=3)
    api.skip()
    t.join(120)
    assert not t.is_alive()
    assert len(done["r"].images) == 4 and done["r"].info["all_seeds"] == [12, 13, 14, 15]


def test_hires_strength_zero_and_hr_resize_values(api, pipe):
    """A1111's own test sends enable_hr with denoising_strength 0: the upscaled image, no second pass; a
    resize target below the first pass or negative is a 422 naming it, never a 500."""
    r = api.txt2img(prompt=PROMPT, seed=3, steps=4, width=64, height=64, enable_hr=True, hr_scale=2,
                    hr_upscaler="Lanczos", denoising_strength=0, sampler_name="Euler")
    first = pipe.text_to_image(PROMPT, seed=3, steps=4, sampler="euler", guidance_scale=7.0).images[0]
    assert r.image.size == (128, 128)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(first.resize((128, 128), Image.LANCZOS)))
    for x, y in ((-8, 0), (32, 0), (0, 40)):
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, enable_hr=True, hr_resize_x=x, hr_resize_y=y)
        assert e.value.args[0] == 422 and ("hr_resize_x" if x else "hr_resize_y") in e.value.args[1]


def test_plms_and_the_lists_clients_read_at_start(api, pipe):
    r = api.txt2img(prompt=PROMPT, seed=4, steps=5, width=64, height=64, sampler_name="PLMS")
    ours = pipe.text_to_image(PROMPT, seed=4, steps=5, sampler="plms", guidance_scale=7.0).images[0]
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(ours))
    assert "Sampler: PLMS" in r.info["infotexts"][0]
    base = api.baseurl
    for path, check in (("upscalers", lambda v: [(u["name"], u["scale"]) for u in v][3:] == [
                            ("tiny-compact-2x", None), ("tiny-esrgan-4x", 4)]  # (the pickle: not read)
                            and [u["name"] for u in v][:3] == ["None", "Lanczos", "Nearest"]),
                        ("latent-upscale-modes", lambda v: v == [{"name": "Latent"}]),
                        ("memory", lambda v: v["ram"]["total"] > v["ram"]["free"] > 0 and "cuda" in v),
                        ("cmd-flags", lambda v: v["api"] is True and "/" not in json.dumps(v)),
                        ("prompt-styles", lambda v: v == []), ("face-restorers", lambda v: v == []),
                        ("hypernetworks", lambda v: v == []), ("loras", lambda v: [x["name"] for x in v] == ["shapes-lora"]),
                        ("embeddings", lambda v: list(v["loaded"]) == ["<glow>"] and v["skipped"] == {})):
        got = httpx.get(f"{base}/{path}", timeout=30)
        assert got.status_code == 200 and check(got.json()), (path, got.text)


def test_settings_are_kept_read_back_used_and_checked(api, sd1_dir):
    from pipelines.pipeline import Pipeline

    base = api.baseurl
    try:
        r = httpx.post(f"{base}/options", json={"CLIP_stop_at_last_layers": 2, "eta_ancestral": 0.5,
                                                "samples_format": "jpg", "show_progressbar": False}, timeout=30)
        assert r.status_code == 200, r.text
        got = api.get_options()
        assert (got["CLIP_stop_at_last_layers"], got["eta_ancestral"], got["samples_format"],
                got["show_progressbar"]) == (2, 0.5, "jpg", False)
        assert got["ldm_settings_ignored"] == ["send_seed", "send_size", "show_progressbar"]
        assert "eta_ddim" in got["ldm_settings_used"] and got["send_seed"] is True  # A1111's UI default, read first
        bad = httpx.post(f"{base}/options", json={"CLIP_stop_at_last_layers": "two", "eta_ddim": 3,
                                                  "samples_format": "tiff"}, timeout=30)
        assert bad.status_code == 422
        assert all(k in bad.text for k in ("CLIP_stop_at_last_layers", "eta_ddim", "samples_format"))
        assert api.get_options()["eta_ddim"] == 0.0  # a refused POST changes nothing
        # the settings in use: clip skip 2 and Euler a's eta 0.5 where the request gives none; a JPEG answered
        # with its parameters in EXIF, which png-info reads
        on_sd1 = {"override_settings": {"sd_model_checkpoint": "tiny-sd1"}}  # (the embedded encoder has no layer to skip)
        raw = httpx.post(f"{base}/txt2img", json={"prompt": PROMPT, "seed": 6, "steps": 4, "width": 64,
                                                  "height": 64, "sampler_name": "Euler a", **on_sd1}, timeout=60)
        assert raw.status_code == 200, raw.text
        raw = raw.json()
        data = base64.b64decode(raw["images"][0])
        assert data[:3] == b"\xff\xd8\xff"  # JPEG
        info = httpx.post(f"{base}/png-info", json={"image": raw["images"][0]}, timeout=30).json()
        assert "Clip skip: 2" in info["info"] and info["parameters"]["Seed"] == "6"
        httpx.post(f"{base}/options", json={"samples_format": "png"}, timeout=30)
        # (no eta in the payload: webuiapi would send its own 1.0, which wins over the setting, as in A1111)
        r = httpx.post(f"{base}/txt2img", json={"prompt": PROMPT, "seed": 6, "steps": 4, "width": 64, "height": 64,
                                                "sampler_name": "Euler a", **on_sd1}, timeout=60).json()
        got = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
        ours = Pipeline.from_pretrained(sd1_dir).text_to_image(PROMPT, seed=6, steps=4, sampler="euler-a", eta=0.5,
                                                               clip_skip=2, guidance_scale=7.0).images[0]
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(ours))
    finally:
        httpx.post(f"{base}/options", json={"CLIP_stop_at_last_layers": 1, "eta_ancestral": 1.0,
                                            "samples_format": "png"}, timeout=30)


def test_extras_upscale_one_image(api, pipe):
    """/sdapi/v1/extra-single-image (A1111's extras tab) with its filter upscalers, as webuiapi calls it."""
    image = pipe.text_to_image(PROMPT, seed=2, steps=3).images[0]
    r = api.extra_single_image(image=image, upscaler_1="Lanczos", upscaling_resize=2)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(image.resize((128, 128), Image.LANCZOS)))
    r = api.extra_single_image(image=image, upscaler_1="Nearest", resize_mode=1, upscaling_resize_w=96,
                               upscaling_resize_h=64, upscaling_crop=True)
    assert r.image.size == (96, 64)
    expect = image.resize((96, 96), Image.NEAREST).crop((0, 16, 96, 80))
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(expect))
    assert np.array_equal(np.asarray(api.extra_single_image(image=image).image.convert("RGB")), np.asarray(image))
    bad = httpx.post(f"{api.baseurl}/extra-single-image", json={"image": "x", "upscaler_1": "ESRGAN_4x"}, timeout=30)
    assert bad.status_code == 422 and "no upscaler 'ESRGAN_4x'" in bad.text


def test_model_upscalers_in_extras_and_hires(api, pipe):
    """--upscalers-dir's networks in the extras tab (one image, a batch) and as the hires fix's upscaler, as
    webuiapi sends them; each image equals ldm.upscalers' own on the same file; a pickle the server was not
    allowed and an unknown name are 422s naming them."""
    from ldm.upscalers import load_upscaler, upscale

    net = load_upscaler(api.upscalers / "tiny-esrgan-4x.safetensors")
    image = pipe.text_to_image(PROMPT, seed=2, steps=3).images[0]
    near = lambda a, b: np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # noqa: E731
    r = api.extra_single_image(image=image, upscaler_1="tiny-esrgan-4x", upscaling_resize=2)
    assert r.image.size == (128, 128) and near(r.image, upscale(net, image, (128, 128)))
    assert api.png_info(r.image).info == "Postprocess upscale by: 2, Postprocess upscaler: tiny-esrgan-4x"
    other = image.transpose(Image.FLIP_LEFT_RIGHT)
    r = api.extra_batch_images(images=[image, other], upscaler_1="tiny-esrgan-4x", upscaling_resize=4)
    assert [im.size for im in r.images] == [(256, 256)] * 2
    assert near(r.images[1], upscale(net, other, (256, 256)))
    r = api.txt2img(prompt=PROMPT, seed=3, steps=4, width=64, height=64, enable_hr=True, hr_scale=2,
                    hr_upscaler="tiny-esrgan-4x", denoising_strength=0, sampler_name="Euler")
    first = pipe.text_to_image(PROMPT, seed=3, steps=4, sampler="euler", guidance_scale=7.0).images[0]
    assert near(r.image, upscale(net, first, (128, 128)))
    assert "Hires upscaler: tiny-esrgan-4x" in r.info["infotexts"][0]
    for body in ({"image": "x", "upscaler_1": "tiny-compact-2x"}, {"imageList": [], "upscaler_1": "Lanczos"}):
        bad = httpx.post(f"{api.baseurl}/extra-{'single-image' if 'image' in body else 'batch-images'}", json=body,
                         timeout=30)
        assert bad.status_code == 422 and ("is a pickle file" in bad.text or "no image given" in bad.text), bad.text
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, enable_hr=True, hr_upscaler="R-ESRGAN 4x+")
    assert e.value.args[0] == 422 and "no upscaler 'R-ESRGAN 4x+'; available: latent, lanczos, tiny-compact-2x" \
        in e.value.args[1]


def test_sd_vae_and_s_noise_settings(api, pipe):
    """sd_vae switches among --vae-dir's VAEs (and back with Automatic), globally by /options or for one job by
    override_settings; s_noise scales Euler a's fresh noise, as A1111 takes it from its settings. Each image
    equals the pipeline's own with that VAE or s_noise; bad values are 422s naming them."""
    from ldm.checkpoints import load_vae

    base = api.baseurl
    assert httpx.get(f"{base}/sd-vae", timeout=30).json() == [
        {"model_name": "brighter.safetensors", "filename": "brighter.safetensors"},
        {"model_name": "sd1-vae.safetensors", "filename": "sd1-vae.safetensors"}]
    kw = dict(prompt=PROMPT, seed=8, steps=4, width=64, height=64, sampler_name="Euler")
    own = pipe.text_to_image(PROMPT, seed=8, steps=4, sampler="euler", guidance_scale=7.0)
    saved = pipe.model.vae
    try:
        pipe.model.vae = load_vae(api.vaes / "brighter.safetensors", saved)
        bright = pipe.decode_latents(own.latents, pipe.resolve(rq_request())).images[0]
    finally:
        pipe.model.vae = saved
    same = lambda a, b: np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))  # noqa: E731
    try:
        assert httpx.post(f"{base}/options", json={"sd_vae": "brighter.safetensors"}, timeout=60).status_code == 200
        assert api.get_options()["sd_vae"] == "brighter.safetensors"
        assert same(api.txt2img(**kw).image, bright)
        assert httpx.post(f"{base}/options", json={"sd_vae": "Automatic"}, timeout=60).status_code == 200
        assert same(api.txt2img(**kw).image, own.images[0])
        r = api.txt2img(**kw, override_settings={"sd_vae": "brighter.safetensors"})
        assert same(r.image, bright) and api.get_options()["sd_vae"] == "Automatic"  # for that job alone
        assert same(api.txt2img(**kw).image, own.images[0])
        for value, message in (("nope.safetensors", "no VAE 'nope.safetensors'; available: Automatic, None, bright"),
                               ("sd1-vae.safetensors", "does not fit this model")):
            bad = httpx.post(f"{base}/options", json={"sd_vae": value}, timeout=60)
            assert bad.status_code == 422 and message in bad.text, bad.text
        assert api.get_options()["sd_vae"] == "Automatic"
        # s_noise: A1111 reads it from its settings (webuiapi's payload s_noise=1 does not win)
        assert httpx.post(f"{base}/options", json={"s_noise": 0.5}, timeout=30).status_code == 200
        r = api.txt2img(**{**kw, "sampler_name": "Euler a"})
        ours = pipe.text_to_image(PROMPT, seed=8, steps=4, sampler="euler-a", eta=1.0, s_noise=0.5,
                                  guidance_scale=7.0)
        assert same(r.image, ours.images[0]) and "Sigma noise: 0.5" in r.info["infotexts"][0]
        assert same(api.txt2img(**kw).image, own.images[0])  # Euler takes no s_noise: unchanged
        bad = httpx.post(f"{base}/options", json={"s_noise": 2}, timeout=30)
        assert bad.status_code == 422 and "s_noise" in bad.text
    finally:
        httpx.post(f"{base}/options", json={"sd_vae": "Automatic", "s_noise": 1.0}, timeout=60)


def rq_request():
    from pipelines.request import Request

    return Request(prompt=PROMPT, seed=8, steps=4, sampler="euler", guidance=7.0)


def test_webuiapi_calls_for_loras_settings_inpainting_and_upscalers(api, pipe):
    """Issue 54's acceptance: every webuiapi call for LoRA and embeddings, settings and lists, inpainting and
    upscalers answers as A1111 would (each checked for its answer's shape; the images' equality with the
    pipeline's is checked by the tests above). The count goes into docs/serve.md."""
    image = pipe.text_to_image(PROMPT, seed=2, steps=3).images[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    small = dict(steps=3, width=64, height=64, sampler_name="Euler")
    calls = {
        # 1. LoRA and embeddings
        "get_loras": (lambda: api.get_loras(), lambda v: v[0]["name"] == "shapes-lora"),
        "get_embeddings": (lambda: api.get_embeddings(), lambda v: "<glow>" in v["loaded"]),
        "refresh_checkpoints": (lambda: api.refresh_checkpoints(), lambda v: True),
        "txt2img <lora:...> and an embedding": (
            lambda: api.txt2img(prompt="<glow> a red circle <lora:shapes-lora:0.6>", seed=1, **small),
            lambda v: "Lora hashes" in v.info["infotexts"][0] and v.image.size == (64, 64)),
        # 2. settings and lists
        "get_options": (lambda: api.get_options(), lambda v: v["sd_vae"] == "Automatic"),
        "set_options": (lambda: api.set_options({"eta_ddim": 0.0, "s_noise": 1.0}), lambda v: True),
        "get_sd_vae": (lambda: api.get_sd_vae(), lambda v: v[0]["model_name"] == "brighter.safetensors"),
        "get_upscalers": (lambda: api.get_upscalers(), lambda v: "tiny-esrgan-4x" in [u["name"] for u in v]),
        "get_latent_upscale_modes": (lambda: api.get_latent_upscale_modes(), lambda v: v[0]["name"] == "Latent"),
        "get_cmd_flags": (lambda: api.get_cmd_flags(), lambda v: v["api"] is True),
        "get_memory": (lambda: api.get_memory(), lambda v: v["ram"]["total"] > 0),
        "get_prompt_styles": (lambda: api.get_prompt_styles(), lambda v: v == []),
        "get_face_restorers": (lambda: api.get_face_restorers(), lambda v: v == []),
        "get_hypernetworks": (lambda: api.get_hypernetworks(), lambda v: v == []),
        "get_realesrgan_models": (lambda: api.get_realesrgan_models(), lambda v: v == []),
        "get_samplers (PLMS)": (lambda: api.get_samplers(), lambda v: "PLMS" in [x["name"] for x in v]),
        "get_schedulers": (lambda: api.get_schedulers(), lambda v: len(v) >= 4),
        "get_scripts": (lambda: api.get_scripts(), lambda v: "txt2img" in v),
        "get_sd_models": (lambda: api.get_sd_models(), lambda v: len(v) == 2),
        "get_progress": (lambda: api.get_progress(), lambda v: "progress" in v),
        "util_get_model_names": (lambda: api.util_get_model_names(), lambda v: "tiny-sd1" in v),
        "util_get_sampler_names": (lambda: api.util_get_sampler_names(), lambda v: "PLMS" in v),
        "util_get_scheduler_names": (lambda: api.util_get_scheduler_names(), lambda v: "karras" in v),
        "util_get_current_model": (lambda: api.util_get_current_model(), lambda v: v == "shapes-model"),
        "util_set_model": (lambda: api.util_set_model("shapes-model"), lambda v: True),
        "util_wait_for_ready": (lambda: api.util_wait_for_ready(check_interval=0.1), lambda v: True),
        "png_info": (lambda: api.png_info(image), lambda v: True),
        "txt2img hires at strength 0": (
            lambda: api.txt2img(prompt=PROMPT, seed=3, enable_hr=True, hr_scale=2, denoising_strength=0,
                                hr_upscaler="Lanczos", **small), lambda v: v.image.size == (128, 128)),
        # 3. inpainting
        "img2img with a mask (A1111's inpainting fields)": (
            lambda: api.img2img(images=[image], mask_image=mask, prompt=PROMPT, seed=4, mask_blur=2, inpainting_fill=1,
                                inpaint_full_res=True, inpaint_full_res_padding=8, inpainting_mask_invert=0,
                                initial_noise_multiplier=1.0, denoising_strength=0.8, **small),
            lambda v: v.image.size == (64, 64)),
        # 4. upscalers
        "extra_single_image (model)": (
            lambda: api.extra_single_image(image=image, upscaler_1="tiny-esrgan-4x", upscaling_resize=2),
            lambda v: v.image.size == (128, 128)),
        "extra_batch_images (model, Lanczos)": (
            lambda: api.extra_batch_images(images=[image, image], upscaler_1="tiny-esrgan-4x", upscaler_2="Lanczos",
                                           extras_upscaler_2_visibility=0.5, upscaling_resize=2),
            lambda v: [im.size for im in v.images] == [(128, 128)] * 2),
        "txt2img hires with a model upscaler": (
            lambda: api.txt2img(prompt=PROMPT, seed=3, enable_hr=True, hr_scale=2, denoising_strength=0.5,
                                hr_upscaler="tiny-esrgan-4x", **small), lambda v: v.image.size == (128, 128)),
    }
    failed = {}
    for name, (call, check) in calls.items():
        try:
            if not check(call()):
                failed[name] = "unexpected answer"
        except Exception as exc:  # noqa: BLE001 (each call's failure is recorded, then all are reported)
            failed[name] = f"{type(exc).__name__}: {exc}"[:300]
    assert not failed, failed
    assert len(calls) == 32
