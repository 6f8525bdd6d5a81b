"""The masked loss of textual inversion and DreamBooth (NAME.mask.png beside NAME.png, ``mask_weight``):
masks are read beside their images and never trained on as images, the weights have their closed
form, an all-white mask is exactly the plain loss, and a subject mask changes what is learnt."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import ConfigError, build
from finetune.data import mask_weights, read_image_folder
from finetune.dreambooth import DreamBoothConfig, DreamBoothObjective
from finetune.loop import train
from finetune.textual_inversion import TextualInversionConfig, TextualInversionObjective
from ldm.embeddings import read_embeddings
from shapes import world as shapes


def _image(color=(200, 40, 40), size=(64, 64)):
    return Image.new("RGB", size, color)


def test_masks_are_read_beside_their_images_and_never_trained_on(tmp_path, caplog):
    _image().save(tmp_path / "a.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 16, 8))
    mask.save(tmp_path / "a.mask.png")
    _image().save(tmp_path / "b.png")  # no mask
    _image(size=(64, 32)).save(tmp_path / "c.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "c.mask.png")  # another shape: c is skipped, named
    Image.new("L", (64, 64), 255).save(tmp_path / "lonely.mask.png")  # no image: a warning
    with caplog.at_level(logging.WARNING):
        data = read_image_folder(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in data["path"]] == ["a.png", "b.png"]
    assert np.array_equal(np.asarray(data[0]["mask"]), np.asarray(mask))
    assert data[1]["mask"] is None
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "c.png" in text and "64x64 but its image is 64x32" in text
    assert "lonely.mask.png has no image" in text


def test_a_mask_of_the_same_aspect_is_scaled_to_its_image(tmp_path):
    _image(size=(128, 128)).save(tmp_path / "a.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "a.mask.png")
    assert read_image_folder(tmp_path)[0]["mask"].size == (128, 128)


def test_the_weights_have_their_closed_form(tmp_path, caplog):
    _image().save(tmp_path / "a.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 16, 8))  # latent pixels (0, 0) and (0, 1) whole (8 px a latent pixel)
    mask.paste(255, (0, 8, 8, 12))  # half of latent pixel (1, 0)
    mask.save(tmp_path / "a.mask.png")
    _image().save(tmp_path / "b.png")
    data = read_image_folder(tmp_path)
    w = mask_weights(data, 64, center_crop=False, random_flip=True, latent_size=8, weight=3.0)
    assert w.shape == (2, 2, 1, 8, 8)
    raw = torch.ones(8, 8)
    raw[0, 0] = raw[0, 1] = 4.0
    raw[1, 0] = 2.5
    expected = raw / raw.mean()
    assert torch.allclose(w[0, 0, 0], expected, atol=1e-6)
    assert torch.allclose(w[0, 1, 0], expected.flip(-1), atol=1e-6)  # the mirrored view's mask is mirrored
    assert torch.equal(w[1], torch.ones(2, 1, 8, 8))  # no mask: uniform
    assert mask_weights(data, 64, False, True, 8, weight=0.0) is None
    (tmp_path / "a.mask.png").unlink()
    with caplog.at_level(logging.WARNING):
        assert mask_weights(read_image_folder(tmp_path), 64, False, False, 8, weight=3.0) is None
    assert "no image has a mask" in caplog.text


def test_a_negative_mask_weight_is_a_clear_error():
    with pytest.raises(ConfigError, match="mask_weight=-1.0"):
        build(TextualInversionConfig, dict(mask_weight=-1.0))


@pytest.fixture(scope="module")
def masked_dirs(tmp_path_factory):
    """The same three renders twice: with an all-white mask each, and with the shape's own mask."""
    out = {}
    for kind in ("white", "shape"):
        d = tmp_path_factory.mktemp(f"masked-{kind}")
        rng = np.random.default_rng(0)
        for i, bg in enumerate(["blue", "white", "black"]):
            scene = shapes.place(rng, "small", "orange", "star", bg)
            shapes.render(scene).save(d / f"{i}.png")
            m = Image.new("L", (64, 64), 255) if kind == "white" else shapes.render_mask(scene)
            m.save(d / f"{i}.mask.png")
        out[kind] = d
    return out


def _ti(sd1_dir, data_dir, out, **kw):
    cfg = build(TextualInversionConfig, dict(
        model=str(sd1_dir), data_dir=str(data_dir), output_dir=str(out), initializer_token="star", max_steps=3,
        batch_size=2, learning_rate=5e-2, random_flip=True, report_to="none", overwrite=True, **kw))
    obj = TextualInversionObjective(cfg)
    train(obj, cfg, progress=False)
    return obj, read_embeddings(out / "learned_embeds.safetensors")["<concept>"]


def test_textual_inversion_an_all_white_mask_is_the_plain_loss_a_subject_mask_is_not(sd1_dir, masked_dirs,
                                                                                     tmp_path):
    _, plain = _ti(sd1_dir, masked_dirs["white"], tmp_path / "p")
    obj, white = _ti(sd1_dir, masked_dirs["white"], tmp_path / "w", mask_weight=5.0)
    assert torch.equal(obj.weights, torch.ones_like(obj.weights))  # (1 + 5) / 6 everywhere
    assert torch.equal(plain, white)
    obj, shaped = _ti(sd1_dir, masked_dirs["shape"], tmp_path / "s", mask_weight=5.0)
    _, shape_plain = _ti(sd1_dir, masked_dirs["shape"], tmp_path / "sp")
    assert torch.equal(shape_plain, plain)  # the same renders: masks unused at weight 0
    assert obj.weights.shape == (3, 2, 1) + obj.latents.shape[-2:]
    assert obj.weights.max() > 1.5 and not torch.allclose(shaped, plain)


def _db(sd1_dir, data_dir, out, **kw):
    cfg = build(DreamBoothConfig, dict(
        model=str(sd1_dir), instance_data_dir=str(data_dir), output_dir=str(out), instance_prompt="a sks star",
        class_prompt="a star", with_prior_preservation=True, num_class_images=2, sample_batch_size=2,
        lora_rank=2, max_steps=2, batch_size=1, learning_rate=1e-2, report_to="none", overwrite=True, **kw))
    obj = DreamBoothObjective(cfg)
    train(obj, cfg, progress=False)
    return obj, {k: v.detach().clone() for k, v in obj.model.unet.state_dict().items() if "lora" in k}


def test_dreambooth_weights_instance_images_only(sd1_dir, masked_dirs, tmp_path):
    _, plain = _db(sd1_dir, masked_dirs["white"], tmp_path / "p")
    _, white = _db(sd1_dir, masked_dirs["white"], tmp_path / "w", mask_weight=4.0)
    assert plain.keys() == white.keys() and all(torch.equal(plain[k], white[k]) for k in plain)
    obj, shaped = _db(sd1_dir, masked_dirs["shape"], tmp_path / "s", mask_weight=4.0)
    batch = obj.batch(0, torch.Generator().manual_seed(0), 0, 1)
    assert batch["kinds"] == ["instance", "class"]
    assert batch["weight"][0].max() > 1.5 and torch.equal(batch["weight"][1], torch.ones_like(batch["weight"][1]))
    assert any(not torch.equal(plain[k], shaped[k]) for k in plain)
