"""ControlNet at generation (ldm.control): our images against diffusers' ControlNet pipelines on tiny
random weights (every ControlNet weight re-drawn, zero convolutions included, so the control acts),
the modes, the preprocessors, the command line and the errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.locate import embedded_controlnet
from ldm.models import ModelError, load_model
from pipelines.pipeline import Pipeline
from pipelines.request import Request

PROMPT = "a red circle"


def random_controlnet(model_dir: Path, out: Path, seed: int) -> Path:
    from diffusers import ControlNetModel

    unet = load_model(model_dir).unet
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    with torch.no_grad():
        for p in cn.parameters():
            p.normal_(0, 0.1)
    cn.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def nets(sd1_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cn")
    return random_controlnet(sd1_dir, d / "a", 0), random_controlnet(sd1_dir, d / "b", 1)


@pytest.fixture(scope="module")
def control_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(((rng.random((64, 64, 3)) > 0.5) * 255).astype(np.uint8)) for _ in range(2)]


def _np(pixels):
    return pixels.permute(0, 2, 3, 1).numpy()


def _reference(cls, model_dir, controlnet):
    from diffusers import ControlNetModel, DDIMScheduler

    if isinstance(controlnet, (list, tuple)):
        controlnet = [ControlNetModel.from_pretrained(c) for c in controlnet]
    else:
        controlnet = ControlNetModel.from_pretrained(controlnet)
    ref = cls.from_pretrained(model_dir, controlnet=controlnet, safety_checker=None) if "XL" not in cls.__name__ \
        else cls.from_pretrained(model_dir, controlnet=controlnet)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("unit", [dict(weight=0.7), dict(weight=1.2, start=0.2, end=0.8), dict(mode="control")])
def test_text_to_image_with_a_controlnet_matches_diffusers(sd1_dir, nets, control_images, unit):
    from diffusers import StableDiffusionControlNetPipeline

    ref = _reference(StableDiffusionControlNetPipeline, sd1_dir, nets[0])
    gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    expect = ref(PROMPT, image=control_images[0], num_inference_steps=6, guidance_scale=5.0, generator=gens,
                 num_images_per_prompt=2, controlnet_conditioning_scale=unit.get("weight", 1.0),
                 control_guidance_start=unit.get("start", 0.0), control_guidance_end=unit.get("end", 1.0),
                 guess_mode=unit.get("mode") == "control", output_type="np", height=64, width=64).images
    ours = Pipeline.from_pretrained(sd1_dir)
    got = _np(ours.generate(Request(PROMPT, steps=6, guidance=5.0, seed=3, batch_size=2, sampler="ddim",
                                    controls=[{"model": str(nets[0]), "image": control_images[0], **unit}])).pixels)
    plain = _np(ours.text_to_image(PROMPT, steps=6, guidance_scale=5.0, seed=3, batch_size=2, sampler="ddim").pixels)
    assert np.abs(got - plain).max() > 2e-2  # the control acts
    assert np.abs(got - expect).max() <= 2 / 255


def test_two_controlnets_at_once_match_diffusers_multicontrolnet(sd1_dir, nets, control_images):
    from diffusers import StableDiffusionControlNetPipeline

    ref = _reference(StableDiffusionControlNetPipeline, sd1_dir, list(nets))
    expect = ref(PROMPT, image=control_images, num_inference_steps=5, guidance_scale=4.0,
                 generator=[torch.Generator().manual_seed(7)], controlnet_conditioning_scale=[0.8, 0.5],
                 control_guidance_start=[0.0, 0.3], control_guidance_end=[1.0, 0.9], output_type="np",
                 height=64, width=64).images
    units = [{"model": str(nets[0]), "image": control_images[0], "weight": 0.8},
             {"model": str(nets[1]), "image": control_images[1], "weight": 0.5, "start": 0.3, "end": 0.9}]
    got = _np(Pipeline.from_pretrained(sd1_dir).generate(Request(PROMPT, steps=5, guidance=4.0, seed=7, sampler="ddim",
                                                                   controls=units)).pixels)
    assert np.abs(got - expect).max() <= 2 / 255


def test_image_to_image_with_a_controlnet_matches_diffusers(sd1_dir, nets, control_images, monkeypatch):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    init = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    ref = _reference(StableDiffusionControlNetImg2ImgPipeline, sd1_dir, nets[0])
    expect = ref(PROMPT, image=init, control_image=control_images[0], strength=0.7, num_inference_steps=10,
                 guidance_scale=5.0, generator=[torch.Generator().manual_seed(2)], output_type="np",
                 controlnet_conditioning_scale=0.8).images  # (this pipeline's default; ours is 1)
    got = _np(Pipeline.from_pretrained(sd1_dir).generate(Request(
        PROMPT, kind="img2img", image=init, strength=0.7, steps=10, guidance=5.0, seed=2, sampler="ddim",
        controls=[{"model": str(nets[0]), "image": control_images[0], "weight": 0.8}])).pixels)
    assert np.abs(got - expect).max() <= 2 / 255


def test_sdxl_with_a_controlnet_matches_diffusers(sdxl_dir, tmp_path, control_images):
    from diffusers import StableDiffusionXLControlNetPipeline

    net = random_controlnet(sdxl_dir, tmp_path / "xl", 2)
    ref = _reference(StableDiffusionXLControlNetPipeline, sdxl_dir, net)
    ours = Pipeline.from_pretrained(sdxl_dir)
    w, h = ours.default_size()
    image = control_images[0].resize((w, h))
    expect = ref(PROMPT, image=image, num_inference_steps=4, guidance_scale=5.0, height=h, width=w,
                 generator=[torch.Generator().manual_seed(4)], controlnet_conditioning_scale=0.9,
                 output_type="np").images
    got = _np(ours.generate(Request(PROMPT, steps=4, guidance=5.0, seed=4, sampler="ddim",
                                    controls=[{"model": str(net), "image": image, "weight": 0.9}])).pixels)
    assert np.abs(got - expect).max() <= 2 / 255
    with pytest.raises(ModelError, match=r"was made for another model \(text width 32.* than this sdxl model \(SDXL"):
        ours.load_controlnet(_sd1_net(tmp_path))


def _sd1_net(tmp_path):
    from ldm.tiny import build_checkpoint

    d = build_checkpoint(tmp_path / "sd1", "sd1", seed=5)
    return random_controlnet(d, tmp_path / "sd1cn", 0)


def test_prompt_mode_scales_each_residual_as_a1111(sd1_dir, nets, control_images):
    from ldm.control import SOFT_INJECTION, Unit, residuals

    pipe = Pipeline.from_pretrained(sd1_dir)
    net = pipe.load_controlnet(nets[0])
    image = torch.from_numpy(np.asarray(control_images[0], dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x, ctx = torch.randn(2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 77, net.config.cross_attention_dim)}
    plain, mid = residuals(Unit(net, image, 0.6), x, 500.0, ctx)
    soft, soft_mid = residuals(Unit(net, image, 0.6, mode="prompt"), x, 500.0, ctx)
    k = len(plain)
    for i, (a, b) in enumerate(zip(plain, soft)):
        torch.testing.assert_close(b, a * SOFT_INJECTION ** (k - i))
    torch.testing.assert_close(soft_mid, mid)


def test_preprocessors_and_resize_modes():
    import cv2

    from ldm.control import fit, preprocess

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8))
    canny = np.asarray(preprocess(img, "canny"))
    assert (canny[..., 0] == cv2.Canny(np.asarray(img.convert("RGB")), 100, 200)).all()  # A1111's: on RGB
    grey = np.asarray(img.convert("L"))
    assert (np.asarray(preprocess(img, "threshold"))[..., 0] == np.where(grey > 127, 255, 0)).all()
    assert (np.asarray(preprocess(img, "invert")) == 255 - np.asarray(img)).all()
    for mode in ("just-resize", "crop-and-resize", "resize-and-fill"):
        assert fit(img, 64, 64, mode).size == (64, 64)
    filled = np.asarray(fit(img, 64, 64, "resize-and-fill"))
    assert filled[:5].max() == 0 and filled[-5:].max() == 0  # black margins above and below a wide image


@pytest.mark.parametrize("unit, field, message", [
    ({"weight": float("nan")}, "control_weight", "must be a number >= 0, got nan"),
    ({"weight": -1.0}, "control_weight", "must be a number >= 0"),
    ({"start": 0.8, "end": 0.3}, "control_start", "must be below control_end"),
    ({"preprocessor": "depth"}, "control_preprocessor", "must be one of none, canny, threshold, invert"),
    ({"mode": "strict"}, "control_mode", "must be one of balanced, prompt, control"),
    ({"image": None}, "control_image", "required"),
    ({"model": "/no/such/controlnet"}, "controlnet", "is neither a ControlNet directory"),
    ({"preprocessor": "canny", "canny_low": 150.0, "canny_high": 50.0}, "control_canny_low", "must not be above"),
    ({"canny_high": -3.0}, "control_canny_high", "must be between 0 and 1000, got -3.0"),
])
def test_bad_units_are_named_before_any_work(nets, control_images, unit, field, message):
    u = {"model": str(nets[0]), "image": control_images[0], **unit}
    problems = dict(Request(PROMPT, controls=[u]).validate())
    assert field in problems and message in problems[field], problems


def test_the_command_line_runs_a_controlnet_as_the_python_api(sd1_dir, nets, control_images, tmp_path, capsys):
    from pipelines.cli import main

    control_images[0].save(tmp_path / "map.png")
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "--model", str(sd1_dir), "--controlnet", str(nets[0]), "--control-image",
                 str(tmp_path / "map.png"), "--control-weight", "0.6", "--control-end", "0.7", "--steps", "4",
                 "--seed", "9", "--sampler", "ddim", "--output", str(out), "--quiet"]) == 0
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    api = Pipeline.from_pretrained(sd1_dir).generate(Request(PROMPT, steps=4, seed=9, sampler="ddim", controls=[
        {"model": str(nets[0]), "image": tmp_path / "map.png", "weight": 0.6, "end": 0.7}])).images[0]
    assert np.abs(got - np.asarray(api, dtype=np.int16)).max() <= 1
    assert main(["generate", PROMPT, "--model", str(sd1_dir), "--controlnet", str(nets[0]), "--controlnet",
                 str(nets[1]), "--control-image", str(tmp_path / "map.png"), "--output", str(out), "--quiet"]) == 2
    assert "got 1 --control-image for 2 --controlnet" in capsys.readouterr().err
    assert main(["control-preview", str(tmp_path / "map.png"), "--control-preprocessor", "canny", "--output",
                 str(tmp_path / "edges.png")]) == 0
    assert Image.open(tmp_path / "edges.png").size == (64, 64)


def test_png_parameters_record_each_unit_as_a1111(sd1_dir, nets, control_images):
    from pipelines.pngmeta import parse_parameters

    pipe = Pipeline.from_pretrained(sd1_dir)
    res = pipe.generate(Request(PROMPT, steps=2, seed=1, controls=[
        {"model": str(nets[0]), "image": control_images[0], "weight": 0.5, "preprocessor": "threshold",
         "start": 0.1, "mode": "control"}]))
    unit = parse_parameters(pipe.infotexts(res)[0])["ControlNet 0"]
    assert unit == ("Module: threshold, Model: a, Weight: 0.5, Resize Mode: just-resize, Guidance Start: 0.1, "
                    "Guidance End: 1, Control Mode: ControlNet is more important")


def test_controls_over_http_equal_the_python_api(tmp_path, control_images):
    import base64
    import io

    import httpx
    from test_serve import Server, post

    from ldm.models import default_model_path
    from pipelines.serve import Limits

    folder = tmp_path / "controlnets"
    random_controlnet(default_model_path(), folder / "silhouette", 3)
    buf = io.BytesIO()
    control_images[0].save(buf, format="PNG")
    unit = {"model": "silhouette", "image": base64.b64encode(buf.getvalue()).decode(), "weight": 0.7, "end": 0.8}
    s = Server(tmp_path / "out", Limits(max_side=64, max_steps=20), controlnet_dir=folder)
    try:
        own = ["shapes"] if embedded_controlnet("shapes") else []  # the embedded model's own, when installed
        assert httpx.get(s.url + "/api/models").json()["controlnets"] == own + ["silhouette"]
        r = post(s, "/api/txt2img", {"prompt": "a large red star on a blue background", "steps": 4, "seed": 5,
                                     "controls": [unit]})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=np.int16)
        api = Pipeline.from_pretrained(default_model_path()).generate(Request(
            "a large red star on a blue background", steps=4, seed=5, controls=[
                {"model": folder / "silhouette", "image": control_images[0], "weight": 0.7, "end": 0.8}])).images[0]
        assert np.abs(got - np.asarray(api, dtype=np.int16)).max() <= 1
        bad = post(s, "/api/txt2img", {"prompt": "a star", "controls": [{**unit, "model": "/etc"}]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "controls"
        bad = post(s, "/api/txt2img", {"prompt": "a star", "controls": [{**unit, "weight": -1.0}]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "control_weight", bad.text
        # a T2I-Adapter in the same folder (as A1111 lists both) is a unit of the same field
        random_adapter(default_model_path(), folder / "sketch", 4)
        ad = {"model": "sketch", "image": unit["image"], "weight": 0.6, "preprocessor": "invert"}
        r = post(s, "/api/txt2img", {"prompt": "a large red star on a blue background", "steps": 4, "seed": 5,
                                     "controls": [ad]})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=np.int16)
        inverted = Image.fromarray(255 - np.asarray(control_images[0].convert("RGB")))
        api = Pipeline.from_pretrained(default_model_path()).generate(Request(
            "a large red star on a blue background", steps=4, seed=5, adapters=[
                {"model": folder / "sketch", "image": inverted, "weight": 0.6}])).images[0]
        assert np.abs(got - np.asarray(api, dtype=np.int16)).max() <= 1
        bad = post(s, "/api/txt2img", {"prompt": "a star", "controls": [{**ad, "end": 0.5}]})
        assert bad.status_code == 422 and "T2I-Adapter" in bad.json()["detail"][0]["message"], bad.text
    finally:
        s.stop()


def test_inpainting_with_a_controlnet_matches_diffusers(sd1_dir, nets, control_images, monkeypatch):
    """An ordinary checkpoint (the kept region blended back at every step) with a ControlNet, against
    diffusers' StableDiffusionControlNetInpaintPipeline; a mask on the 8-pixel latent cells."""
    from diffusers import StableDiffusionControlNetInpaintPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 16:56] = 255
    ref = _reference(StableDiffusionControlNetInpaintPipeline, sd1_dir, nets[0])
    expect = ref(PROMPT, image=image, mask_image=Image.fromarray(mask), control_image=control_images[0],
                 strength=1.0, num_inference_steps=6, guidance_scale=5.0, height=64, width=64,
                 controlnet_conditioning_scale=0.9, generator=[torch.Generator().manual_seed(3)],
                 output_type="pil").images[0]
    # the original laid back over the result (diffusers' own apply_overlay; ours at mask_blur 0), as A1111 does
    expect = np.asarray(ref.image_processor.apply_overlay(Image.fromarray(mask), image, expect), np.float32)[None] / 255
    got = _np(Pipeline.from_pretrained(sd1_dir).generate(Request(
        PROMPT, kind="inpaint", image=image, mask=Image.fromarray(mask), strength=1.0, steps=6, guidance=5.0,
        seed=3, sampler="ddim", mask_blur=0,
        controls=[{"model": str(nets[0]), "image": control_images[0], "weight": 0.9}])).pixels)
    assert np.abs(got - expect).max() <= 2 / 255


def _original_layout(state: dict, unet_config: dict) -> dict:
    """A diffusers ControlNet's weights in the original layout of lllyasviel's files (control_model.
    input_blocks..., zero_convs, input_hint_block, middle_block_out), written with this project's own
    U-Net key mapping (ldm.checkpoints), so that reading it back goes through diffusers' converter: two
    independent mappings that must agree."""
    from ldm.checkpoints import _unet_key

    layers = unet_config["layers_per_block"]
    up_attn = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    out = {}
    for key, value in state.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            part, _, tail = rest.rpartition(".")
            index = 0 if part == "conv_in" else 2 * (len(blocks) + 1) if part == "conv_out" else \
                2 * (int(part.split(".")[1]) + 1)
            name = f"input_hint_block.{index}.{tail}"
        elif key.startswith("controlnet_down_blocks."):
            name = f"zero_convs.{key.split('.')[1]}.0.{key.split('.')[-1]}"
        elif key.startswith("controlnet_mid_block."):
            name = f"middle_block_out.0.{key.split('.')[-1]}"
        else:
            name = _unet_key(key, layers, up_attn)
        out["control_model." + name] = value.contiguous()
    return out


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_single_file_controlnets_load_to_the_same_weights(sd1_dir, nets, tmp_path, layout):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    ref = ControlNetModel.from_pretrained(nets[0])
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if layout == "original":
        state = _original_layout(state, dict(load_model(sd1_dir).unet.config))
        assert all(k.startswith("control_model.") for k in state) and not any("down_blocks" in k for k in state)
    file = tmp_path / f"control_{layout}.safetensors"
    save_file(state, str(file))
    pipe = Pipeline.from_pretrained(sd1_dir)
    loaded = pipe.load_controlnet(file).state_dict()
    want = ref.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    with pytest.raises(ModelError, match="does not fit this model's U-Net"):
        save_file({k: v[..., :1].contiguous() if v.ndim > 1 else v for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
        pipe.load_controlnet(tmp_path / "bad.safetensors")


def test_a1111_controlnet_units_from_webuiapi_equal_the_python_api(tmp_path, control_images):
    """A1111's ControlNet extension API as its clients speak it (webuiapi's ControlNetUnit in
    alwayson_scripts; /controlnet/model_list, module_list, detect): the unit's image equals the Python
    API's for the same settings."""
    webuiapi = pytest.importorskip("webuiapi")
    from test_serve import Server

    from ldm.control import preprocess
    from ldm.models import default_model_path
    from pipelines.a1111 import control_units
    from pipelines.serve import Limits
    from shapes import world as shapes

    folder = tmp_path / "controlnets"
    random_controlnet(default_model_path(), folder / "silhouette", 3)
    s = Server(tmp_path / "out", Limits(max_side=64, max_steps=20), controlnet_dir=folder)
    try:
        host, port = s.url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="DDIM", steps=4)
        assert api.controlnet_model_list() == (["shapes"] if embedded_controlnet("shapes") else []) + ["silhouette"]
        assert "canny" in api.controlnet_module_list()
        unit = webuiapi.ControlNetUnit(image=control_images[0], module="threshold", model="silhouette [0123abcd]",
                                       weight=0.6, guidance_start=0.1, guidance_end=0.9, control_mode=2,
                                       resize_mode="Just Resize")
        r = api.txt2img(prompt="a large red star on a blue background", seed=5, steps=4, cfg_scale=5, width=64,
                        height=64, eta=0, controlnet_units=[unit],  # (webuiapi's eta is 1: DDIM would be stochastic)
                        alwayson_scripts={})  # a dict of our own: webuiapi puts the units into its shared default
                                              # one, where every later call of the process would send them
        api_image = Pipeline.from_pretrained(default_model_path()).generate(Request(
            "a large red star on a blue background", steps=4, seed=5, guidance=5.0, sampler="ddim", controls=[
                {"model": folder / "silhouette", "image": control_images[0], "weight": 0.6, "start": 0.1, "end": 0.9,
                 "mode": "control", "preprocessor": "threshold"}])).images[0]
        got = np.asarray(r.image.convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.asarray(api_image, dtype=np.int16)).max() <= 1
        assert "ControlNet 0" in r.info["infotexts"][0]
        units = control_units([{"image": "x", "model": "silhouette", "module": "canny", "threshold_a": 50,
                                "threshold_b": 150}, {"image": "x", "model": "silhouette", "module": "canny",
                                                      "threshold_a": -1}], {"silhouette": None}, None)
        assert (units[0]["canny_low"], units[0]["canny_high"]) == (50, 150) and "canny_low" not in units[1]
        maps = api.controlnet_detect([control_images[0]], module="invert")
        assert len(maps.images) == 1 and maps.images[0].size == control_images[0].size
        star = shapes.render(shapes.Scene("large", "red", "star", "blue", 30, 10, 12))  # canny at A1111's thresholds
        maps = api.controlnet_detect([star], module="canny", threshold_a=50, threshold_b=150)
        assert np.array_equal(np.asarray(maps.images[0].convert("RGB")), np.asarray(preprocess(star, "canny", (50, 150))))
        bad = webuiapi.ControlNetUnit(image=control_images[0], model="nope")
        with pytest.raises(RuntimeError, match=r"422.*args\[0\]\.model: no ControlNet"):
            api.txt2img(prompt="a star", steps=2, width=64, height=64, controlnet_units=[bad], alwayson_scripts={})
    finally:
        s.stop()


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from diffusers import T2IAdapter

    channels = list(load_model(model_dir).unet.config.block_out_channels)
    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=8,
                         adapter_type="full_adapter")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    adapter.save_pretrained(out)
    return out


def test_a_t2i_adapter_matches_diffusers_and_runs_from_the_command_line(sd1_dir, control_images, tmp_path):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    from pipelines.cli import main

    adapter = random_adapter(sd1_dir, tmp_path / "adapter", 0)
    ref = StableDiffusionAdapterPipeline.from_pretrained(sd1_dir, adapter=T2IAdapter.from_pretrained(adapter),
                                                         safety_checker=None)
    from diffusers import DDIMScheduler
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expect = ref(PROMPT, image=control_images[0], num_inference_steps=6, guidance_scale=5.0, height=64, width=64,
                 generator=[torch.Generator().manual_seed(i) for i in (3, 4)], num_images_per_prompt=2,
                 adapter_conditioning_scale=0.8, output_type="np").images
    ours = Pipeline.from_pretrained(sd1_dir)
    req = dict(steps=6, guidance=5.0, seed=3, batch_size=2, sampler="ddim")
    got = _np(ours.generate(Request(PROMPT, **req, adapters=[{"model": str(adapter), "image": control_images[0],
                                                               "weight": 0.8}])).pixels)
    plain = _np(ours.generate(Request(PROMPT, **req)).pixels)
    assert np.abs(got - plain).max() > 2e-2 and np.abs(got - expect).max() <= 2 / 255
    # the command line: --adapter DIR --adapter-image IMG --adapter-weight W
    control_images[0].save(tmp_path / "map.png")
    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--model", str(sd1_dir), "--adapter", str(adapter), "--adapter-image",
                 str(tmp_path / "map.png"), "--adapter-weight", "0.8", "--steps", "6", "--guidance", "5",
                 "--seed", "3", "--batch-size", "2", "--sampler", "ddim", "--output-dir", str(out), "--quiet"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    cli = np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.int16)
    assert np.abs(cli - np.round(got[0] * 255).astype(np.int16)).max() <= 1
    problems = dict(Request(PROMPT, adapters=[{"model": str(adapter), "image": None, "weight": -1.0}]).validate())
    assert "required" in problems["adapter_image"] and "must be a number >= 0" in problems["adapter_weight"]


def test_a_controlnet_with_hires_fix_compile_and_a_refiner(sd1_dir, sdxl_dir, refiner_dir, nets, control_images,
                                                            tmp_path):
    """The hires pass is controlled too (the map fitted to its size); a compiled pipeline (the whole U-Net
    traced, aot_eager) gives the eager images; an SDXL refiner stage runs without the base's ControlNet,
    which would not fit it."""
    unit = {"model": str(nets[0]), "image": control_images[0], "weight": 1.0}
    pipe = Pipeline.from_pretrained(sd1_dir)
    hires = dict(steps=4, seed=2, sampler="ddim", hires_scale=2.0, hires_strength=0.6)
    a = pipe.generate(Request(PROMPT, controls=[unit], **hires)).pixels
    b = pipe.generate(Request(PROMPT, **hires)).pixels
    assert a.shape[-1] == 128 and (a - b).abs().max() > 2e-2
    eager = pipe.generate(Request(PROMPT, steps=3, seed=1, sampler="ddim", controls=[unit])).pixels
    compiled = Pipeline.from_pretrained(sd1_dir).compile(backend="aot_eager")
    torch.testing.assert_close(compiled.generate(Request(PROMPT, steps=3, seed=1, sampler="ddim",
                                                         controls=[unit])).pixels, eager, rtol=0, atol=1e-4)
    base = Pipeline.from_pretrained(sdxl_dir)
    base.refiner = Pipeline.from_pretrained(refiner_dir)
    w, h = base.default_size()
    xl = {"model": str(random_controlnet(sdxl_dir, tmp_path / "xl", 5)), "image": control_images[0].resize((w, h))}
    out = base.generate(Request(PROMPT, steps=4, seed=0, sampler="ddim", refiner_start=0.5, controls=[xl]))
    assert out.settings.get("refiner") and "ControlNet 0" in base.infotexts(out)[0]


def test_an_sdxl_t2i_adapter_matches_diffusers(sdxl_dir, control_images, tmp_path):
    """SDXL's adapter layout (full_adapter_xl: pixel-unshuffle by 16, one downsampling block) on the tiny SDXL
    U-Net, against diffusers' StableDiffusionXLAdapterPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionXLAdapterPipeline, T2IAdapter

    torch.manual_seed(5)
    channels = list(load_model(sdxl_dir).unet.config.block_out_channels)
    adapter = T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=16,
                         adapter_type="full_adapter_xl")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    adapter.save_pretrained(tmp_path / "xl-adapter")
    ref = StableDiffusionXLAdapterPipeline.from_pretrained(sdxl_dir, adapter=T2IAdapter.from_pretrained(tmp_path / "xl-adapter"))
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(sdxl_dir)
    w, h = ours.default_size()
    expect = ref(PROMPT, image=control_images[0].resize((w, h)), num_inference_steps=4, guidance_scale=5.0, height=h,
                 width=w, generator=[torch.Generator().manual_seed(4)], adapter_conditioning_scale=0.9,
                 output_type="np").images
    req = dict(steps=4, guidance=5.0, seed=4, sampler="ddim")
    got = _np(ours.generate(Request(PROMPT, **req, adapters=[{"model": str(tmp_path / "xl-adapter"),
                                                               "image": control_images[0], "weight": 0.9}])).pixels)
    plain = _np(ours.generate(Request(PROMPT, **req)).pixels)
    assert np.abs(got - plain).max() > 2e-2 and np.abs(got - expect).max() <= 2 / 255


@pytest.mark.skipif(embedded_controlnet("shapes") is None, reason="the embedded ControlNet is not installed")
def test_the_embedded_controlnet_places_shapes_through_the_command(tmp_path):
    """The embedded model's own ControlNet (ldm/assets/shapes-controlnet), by name: `ldm generate --controlnet
    shapes --control-image mask.png` draws the shape where the silhouette is, at a place and size the shapes
    world never uses (the detector's box against the silhouette's); and 8 free placements of the evaluation
    place at least 6 (the shipped one placed 0.914 of 128), where the same prompts without it place none."""
    from shapes import world
    from shapes.control_eval import condition_box, placement
    from pipelines.cli import main

    sc = world.Scene("large", "red", "star", "blue", 30, 4, 30)  # at the bottom left, in the corner
    world.render_condition(sc, "silhouette").save(tmp_path / "mask.png")
    assert main(["generate", "a large red star on a blue background", "--controlnet", "shapes", "--control-image",
                 str(tmp_path / "mask.png"), "--seed", "3", "--output", str(tmp_path / "out.png"), "--quiet"]) == 0
    r = world.detect(Image.open(tmp_path / "out.png").convert("RGB"))
    assert world.box_iou(r.box, condition_box(sc)) >= 0.8 and (r.color, r.background) == ("red", "blue")
    pipe = Pipeline.from_pretrained("ldm/assets/shapes-model")
    res = placement(pipe, "shapes", n=8, seed=1, batch_size=8, progress=False)
    assert res["controlled"]["placed"] >= 6 / 8 and res["uncontrolled"]["placed"] <= 1 / 8
