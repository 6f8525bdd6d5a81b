"""Model upscalers (ldm.upscalers): files of real architectures read through spandrel, safely; tiling
against one untiled pass; A1111's way to a scale; the hires fix and `ldm upscale` with them."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.tiny import random_upscaler
from ldm.upscalers import UpscalerError, load_upscaler, run_tiled, upscale, upscaler_files


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("upscalers")
    random_upscaler(d / "compact-2x.safetensors", "compact", scale=2, seed=1)
    random_upscaler(d / "sub" / "esrgan-4x.safetensors", "esrgan", scale=4, seed=2)
    random_upscaler(d / "old-2x.pth", "compact", scale=2, seed=3)
    return d


@pytest.mark.parametrize("arch, scale", [("esrgan", 4), ("compact", 2), ("swinir", 2)])
def test_tiles_equal_one_untiled_pass(tmp_path, arch, scale):
    """Two convolutional architectures and a windowed-attention one: tiles of 40 px overlapping by 16 over
    a 70 x 90 image (3 x 4 tiles, the last ones longer) give the untiled pass's pixels."""
    net = load_upscaler(random_upscaler(tmp_path / f"{arch}.safetensors", arch, scale=scale))
    assert (net.architecture.name.lower().replace("realesrgan ", ""), net.scale) == (
        {"esrgan": "esrgan", "compact": "compact", "swinir": "swinir"}[arch], scale)
    x = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    whole = run_tiled(net, x, tile=1024)
    with torch.no_grad():
        direct = net(x).clamp(0, 1)
    torch.testing.assert_close(whole, direct, rtol=0, atol=1e-6)  # one tile: the network itself
    tiled = run_tiled(net, x, tile=40, overlap=16)
    assert tiled.shape == (1, 3, 70 * scale, 90 * scale)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=2e-6)
    assert (tiled - whole).abs().max() < 2e-6 < (run_tiled(net, x, tile=40, overlap=0) - whole).abs().max() or \
        arch != "esrgan"  # no overlap: the cuts show (the check can fail)


def test_a_scale_is_reached_as_a1111_does(tmp_path):
    """A 4x network asked for 2x: one pass, then Lanczos down to the size; asked for 8x: two passes."""
    net = load_upscaler(random_upscaler(tmp_path / "e.safetensors", "esrgan", scale=4))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    once = Image.fromarray((run_tiled(net, x)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    assert np.array_equal(np.asarray(upscale(net, image, (40, 48))), np.asarray(once.resize((40, 48), Image.LANCZOS)))
    assert np.array_equal(np.asarray(upscale(net, image, (80, 96))), np.asarray(once))
    assert upscale(net, image, (160, 192)).size == (160, 192)


def test_files_are_read_safely(folder, tmp_path):
    assert sorted(upscaler_files(folder)) == ["compact-2x", "esrgan-4x", "old-2x"]
    with pytest.raises(UpscalerError, match="pickle checkpoint.*--allow-pickle"):
        load_upscaler(folder / "old-2x.pth")
    assert load_upscaler(folder / "old-2x.pth", allow_pickle=True).scale == 2
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UpscalerError, match="no architecture spandrel knows"):
        load_upscaler(tmp_path / "odd.safetensors")
    with pytest.raises(UpscalerError, match="does not exist"):
        load_upscaler(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def pipe(folder):
    from pipelines.pipeline import Pipeline

    p = Pipeline.from_pretrained("ldm/assets/shapes-model")
    p.upscalers_dir = folder
    return p


def test_hires_fix_with_a_model_upscaler(pipe, folder):
    """At hires strength 0 the result is the first pass's image through the network; at 0.5 it is that
    image to image (composed by hand from the plain calls); the PNG names the upscaler as A1111 does."""
    from pipelines.pngmeta import parse_parameters

    kw = dict(steps=6, seed=3)
    first = pipe.text_to_image("a red circle", **kw).images[0]
    net = load_upscaler(folder / "sub" / "esrgan-4x.safetensors")
    big = upscale(net, first, (128, 128))
    r0 = pipe.text_to_image("a red circle", hires_scale=2, hires_strength=0, hires_upscaler="esrgan-4x", **kw)
    assert np.abs(np.asarray(r0.images[0], dtype=int) - np.asarray(big, dtype=int)).max() <= 1
    r = pipe.text_to_image("a red circle", hires_scale=2, hires_strength=0.5, hires_upscaler="esrgan-4x", **kw)
    by_hand = pipe.image_to_image("a red circle", big, strength=0.5, **kw)
    assert np.abs(r.pixels.numpy() - by_hand.pixels.numpy()).max() < 2 / 255
    assert parse_parameters(pipe.infotexts(r)[0])["Hires upscaler"] == "esrgan-4x"
    with pytest.raises(ValueError, match="upscaler 'old-2x' is a pickle file"):
        pipe.text_to_image("x", hires_scale=2, hires_upscaler="old-2x")
    with pytest.raises(ValueError, match="no upscaler 'nope'; available: latent, lanczos, compact-2x, esrgan-4x, old-2x"):
        pipe.text_to_image("x", hires_scale=2, hires_upscaler="nope")


def test_ldm_upscale(folder, tmp_path, capsys):
    from pipelines.cli import main

    def ldm(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 26, 3), dtype=np.uint8))
    image.save(tmp_path / "in.png")
    code, err = ldm("upscale", tmp_path / "in.png", "--upscaler", "compact-2x", "--upscalers-dir", folder, "--scale", 3,
                    "--tile", 24, "--tile-overlap", 16, "--output", tmp_path / "out.png", "--device", "cpu")
    assert code == 0, err
    net = load_upscaler(folder / "compact-2x.safetensors")
    ref = upscale(net, image, (78, 90))  # one tile: the untiled pass (two passes of 2x, then Lanczos down)
    out = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"), dtype=int)
    diff = np.abs(out - np.asarray(ref, dtype=int))  # (the network reaches 6 px: under half the overlap)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # (a level of float rounding where it falls on .5)
    code, err = ldm("upscale", tmp_path / "in.png", "--upscaler", folder / "old-2x.pth", "--output", tmp_path / "b.png")
    assert code == 2 and "pickle file (.pth), refused by default" in err
    code, err = ldm("upscale", tmp_path / "in.png", "--upscaler", folder / "old-2x.pth", "--allow-pickle",
                    "--output", tmp_path / "b.png", "--device", "cpu")
    assert code == 0 and Image.open(tmp_path / "b.png").size == (52, 60)
    code, err = ldm("upscale", tmp_path / "in.png", "--upscaler", "x4", "--upscalers-dir", folder, "--output",
                    tmp_path / "c.png")
    assert code == 2 and "no upscaler 'x4'; available: latent, lanczos, compact-2x" in err
