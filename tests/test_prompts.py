"""Prompts as AUTOMATIC1111 reads them: emphasis, chunks, BREAK, prompt editing, alternation, clip skip.

The tables are A1111's own documented examples (the doctests of its prompt_parser.py); the encodings
are checked against the plain tokenisation, against diffusers (clip skip) and against diffusers with
the prompt switched mid-run by its step callback (prompt editing)."""

import numpy as np
import pytest
import torch

from ldm.prompts import chunk_tokens, parse_attention, prompt_schedule, text_at
from ldm.text import encode_prompts, encode_weighted

W = 1.1

ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", W), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", W)]),
    ("[unbalanced", [("unbalanced", 1 / W)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", W)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * W * W), (" ", W), ("on", 1.0), (" a ", W), ("hill", 0.55), (", sun, ", W),
      ("sky", W**4), (".", W)]),
    ("((word))", [("word", W * W)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word:1.0)", [("word", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", ATTENTION)
def test_emphasis_weights_as_a1111_documents_them(prompt, expected):
    got = parse_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


SCHEDULES = [  # A1111's doctests, 10 steps
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
]


@pytest.mark.parametrize("prompt,expected", SCHEDULES)
def test_prompt_editing_schedules_as_a1111_documents_them(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


HIRES_SCHEDULES = [  # A1111's doctests with a hires pass: 10 steps after a first pass of 10
    ("a [b:.5] c", [(10, "a b c")]),
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [b:c:15] d", [(5, "a b d"), (10, "a c d")]),  # an integer counts the first pass's steps first
    ("a [b:c:5] d", [(10, "a c d")]),
]


@pytest.mark.parametrize("prompt,expected", HIRES_SCHEDULES)
def test_prompt_editing_in_a_hires_pass_counts_the_first_pass_first(prompt, expected):
    assert prompt_schedule(prompt, 10, base_steps=10) == expected


def test_the_entry_in_force_at_each_step():
    sched = prompt_schedule("[a:b:4]", 10)  # A1111 counts sampler steps from 0: "a" for steps 0..4
    assert [sched[text_at(sched, s)][1] for s in range(10)] == ["a"] * 5 + ["b"] * 5


def toks(n, start=100):
    return list(range(start, start + n))


@pytest.mark.parametrize("pieces,lengths", [
    ([(toks(80), 1.0)], [75, 5]),                                   # a plain split at 75
    ([(toks(75), 1.0)], [75]),                                      # exactly one chunk
    ([(toks(60) + [7] + toks(20), 1.0)], [61, 20]),                 # back to the comma at 61 (14 tokens back)
    ([(toks(50) + [7] + toks(30), 1.0)], [75, 6]),                  # comma 25 tokens back: too far, plain split
    ([(toks(3), 1.0), ([], -1.0), (toks(2), 1.0)], [3, 2]),         # BREAK
    ([([], 1.0)], [0]),                                             # the empty prompt is one empty chunk
    ([(toks(150), 1.0)], [75, 75]),
])
def test_chunk_boundaries(pieces, lengths):
    chunks = chunk_tokens(pieces, 75, comma=7)
    assert [len(t) for t, _ in chunks] == lengths
    assert [t for c, _ in chunks for t in c] == [t for ids, w in pieces if w != -1 for t in ids]


def test_chunk_weights_follow_their_tokens():
    chunks = chunk_tokens([(toks(70), 1.0), (toks(10, 500), 1.5)], 75, comma=None)
    assert chunks[0][1] == [1.0] * 70 + [1.5] * 5 and chunks[1][1] == [1.5] * 5


@pytest.fixture(scope="module")
def shapes():
    from pipelines.pipeline import Pipeline
    return Pipeline.from_pretrained("ldm/assets/shapes-model")


def test_plain_and_unit_weight_prompts_encode_exactly_as_the_plain_tokenisation(shapes):
    m = shapes.model
    plain = encode_prompts(m.tokenizer, m.text_encoder, ["a red circle"])
    for p in ("a red circle", "a (red:1.0) circle", "a red circle BREAK"[:-6]):
        states, _ = encode_weighted(m.tokenizer, m.text_encoder, [p])
        assert torch.equal(states[0], plain)


def test_emphasis_scales_the_weighted_tokens_and_keeps_the_mean(shapes):
    m = shapes.model
    plain = encode_prompts(m.tokenizer, m.text_encoder, ["a red circle"])[0]
    (z,), _ = encode_weighted(m.tokenizer, m.text_encoder, ["a (red:1.5) circle"])
    z = z[0]
    red = 2  # <start> a red circle <end>
    ratio = z / plain
    scale = ratio[0].mean()  # the rescale factor: unweighted tokens are plain x scale
    torch.testing.assert_close(ratio[red], torch.full_like(ratio[red], 1.5 * float(scale)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.mean(), plain.mean(), rtol=1e-5, atol=1e-6)


def test_a_long_prompt_is_chunked_not_cut(shapes, caplog):
    """The embedded model's context is 20 tokens (18 per chunk): a 25-word prompt is two chunks, the
    first exactly the encoding of its first 18 words, and the words past it change the image."""
    m = shapes.model
    words = ["red"] * 18 + ["blue"] * 7
    (z,), _ = encode_weighted(m.tokenizer, m.text_encoder, [" ".join(words)])
    assert z.shape[1] == 40
    first = encode_prompts(m.tokenizer, m.text_encoder, [" ".join(words[:18])])
    second = encode_prompts(m.tokenizer, m.text_encoder, [" ".join(words[18:])])
    torch.testing.assert_close(z, torch.cat([first, second], 1))
    (zb,), _ = encode_weighted(m.tokenizer, m.text_encoder, ["red " * 3 + "BREAK " + "blue"])
    torch.testing.assert_close(zb, torch.cat([encode_prompts(m.tokenizer, m.text_encoder, ["red red red"]),
                                              encode_prompts(m.tokenizer, m.text_encoder, ["blue"])], 1))
    # a long prompt with a short negative runs (the negative is padded to two chunks with the empty prompt)
    a = shapes.text_to_image(" ".join(words), negative_prompt="green", steps=4, seed=1).pixels
    b = shapes.text_to_image(" ".join(words[:18]), negative_prompt="green", steps=4, seed=1).pixels
    assert (a - b).abs().max() > 1e-3
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


@pytest.mark.parametrize("kind,skip", [("sd1", 2), ("sd1", 3), ("sdxl", 2)])
def test_clip_skip_matches_diffusers(sd1_dir, sdxl_dir, kind, skip):
    """A1111's clip skip N is diffusers' clip_skip N - 1, for SD 1.x and SDXL alike. For SD 1.x diffusers'
    own clip_skip reads ``text_encoder.text_model``, which transformers 5 no longer has, so the test
    builds its embeddings the way diffusers' encode_prompt does (hidden_states[-(clip_skip + 1)] through
    the final layer norm) and hands them to the pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from pipelines.pipeline import Pipeline
    path = sd1_dir if kind == "sd1" else sdxl_dir
    cls = StableDiffusionPipeline if kind == "sd1" else StableDiffusionXLPipeline
    ref = cls.from_pretrained(path, **({"safety_checker": None} if kind == "sd1" else {}))
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(path)
    size = ours.model.native_size
    if kind == "sd1":
        def embed(text):
            ids = ref.tokenizer(text, padding="max_length", max_length=ref.tokenizer.model_max_length,
                                return_tensors="pt").input_ids
            hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-(skip - 1 + 1)]
            return ref.text_encoder.final_layer_norm(hidden)

        with torch.no_grad():
            texts = dict(prompt_embeds=embed("a red circle"), negative_prompt_embeds=embed("a square"))
    else:
        # diffusers' SDXL applies clip_skip to the prompt only (its negative always uses the penultimate
        # layer), so compare without a negative prompt: zeros on both sides (force_zeros_for_empty_prompt)
        assert ours.model.force_zeros_for_empty_prompt
        texts = dict(prompt="a red circle", clip_skip=skip - 1)
    expect = ref(**texts, num_inference_steps=4, guidance_scale=5.0, generator=[torch.Generator().manual_seed(2)],
                 output_type="np", height=size, width=size).images
    neg = "a square" if kind == "sd1" else ""
    got = ours.text_to_image("a red circle", negative_prompt=neg, steps=4, guidance_scale=5.0, seed=2,
                             sampler="ddim", clip_skip=skip).pixels.permute(0, 2, 3, 1).numpy()
    plain = ours.text_to_image("a red circle", negative_prompt=neg, steps=4, guidance_scale=5.0, seed=2,
                               sampler="ddim").pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expect).max() <= 2 / 255
    assert np.abs(plain - expect).max() > 4 / 255  # clip skip changes the image: the agreement means something


def test_prompt_editing_matches_diffusers_with_the_prompt_switched_by_its_step_callback(shapes):
    """[a red circle:a blue square:0.25] at 8 steps: the first prompt through sampler step 2 (A1111
    counts from 0 and switches after the entry's end, step 2), the second after; diffusers gets the
    same switch from its callback_on_step_end. The result differs from either prompt alone."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained("ldm/assets/shapes-model", safety_checker=None)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    second, neg = ref.encode_prompt("a blue square", "cpu", 1, True, "a triangle")

    def switch(pipe, i, t, kw):
        if i == 2:
            return {"prompt_embeds": torch.cat([neg, second])}
        return {}

    expect = ref("a red circle", negative_prompt="a triangle", num_inference_steps=8, guidance_scale=5.0,
                 generator=[torch.Generator().manual_seed(4)], output_type="np", callback_on_step_end=switch,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    got = shapes.text_to_image("[a red circle:a blue square:0.25]", negative_prompt="a triangle", steps=8,
                                 guidance_scale=5.0, seed=4, sampler="euler").pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expect).max() <= 2 / 255
    for alone in ("a red circle", "a blue square"):
        plain = shapes.text_to_image(alone, negative_prompt="a triangle", steps=8, guidance_scale=5.0, seed=4,
                                       sampler="euler").pixels.permute(0, 2, 3, 1).numpy()
        assert np.abs(plain - expect).max() > 4 / 255


def test_sdxl_reads_the_same_syntax_through_both_encoders(sdxl_dir):
    """On SDXL both encoders read the weights and chunks; the pooled embedding is the first chunk's; a
    unit weight is the plain prompt, and the plain prompt is diffusers' own encoding."""
    from diffusers import StableDiffusionXLPipeline

    from ldm.text import prompt_context
    from pipelines.pipeline import Pipeline
    m = Pipeline.from_pretrained(sdxl_dir).model
    plain, unit, weighted = prompt_context(m, ["a red circle", "a (red:1.0) circle", "a (red:1.4) circle"])
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    embeds, _, pooled, _ = ref.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(plain["encoder_hidden_states"], embeds)
    torch.testing.assert_close(plain["text_embeds"], pooled)
    assert torch.equal(unit["encoder_hidden_states"], plain["encoder_hidden_states"])
    assert not torch.allclose(weighted["encoder_hidden_states"], plain["encoder_hidden_states"])
    torch.testing.assert_close(weighted["text_embeds"], plain["text_embeds"])  # pooled: tokens, not weights
    L = m.tokenizer.model_max_length
    (long,) = prompt_context(m, [" ".join(["red"] * (L - 2) + ["blue"])])
    assert long["encoder_hidden_states"].shape[1] == 2 * L


def test_clip_skip_past_the_text_encoders_layers_is_a_clear_error(sd1_dir):
    """The tiny SD 1.x text encoder has 2 layers: A1111's clip skip 3 reads its embeddings, 4 does not exist."""
    from ldm.locate import ModelError
    from ldm.text import encode_weighted
    from pipelines.pipeline import Pipeline

    m = Pipeline.from_pretrained(sd1_dir).model
    layers = m.text_encoder.config.num_hidden_layers
    encode_weighted(m.tokenizer, m.text_encoder, ["a red circle"], clip_skip=layers + 1)
    with pytest.raises(ModelError, match=f"clip_skip {layers + 2}: this text encoder has {layers} layer"):
        encode_weighted(m.tokenizer, m.text_encoder, ["a red circle"], clip_skip=layers + 2)
