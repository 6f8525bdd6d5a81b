"""--compile: the compiled U-Net and decoder give the eager images (to float tolerance).

Inductor's C++ code generation is the slow part (76 s for the whole tiny U-Net here, 5 min on a busy
machine), so it runs once, on the regional compile (the repeated blocks and the decoder); the whole
U-Net's graph is traced by the same dynamo and AOT-autograd front with the aot_eager backend."""

import shutil

import pytest
import torch


@pytest.mark.parametrize("regional, backend", [
    pytest.param(True, "inductor", marks=pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None,
        reason="torch.compile's inductor on the CPU needs a C++ compiler")),
    (False, "aot_eager"),
])
def test_compiled_pipeline_gives_the_eager_images(sd1_dir, regional, backend):
    from pipelines.pipeline import Pipeline
    eager = Pipeline.from_pretrained(sd1_dir)
    compiled = Pipeline.from_pretrained(sd1_dir).compile(regional=regional, backend=backend)
    kw = dict(steps=3, seed=4, negative_prompt="a square", batch_size=2)
    a = eager.text_to_image("a red circle", **kw).pixels
    b = compiled.text_to_image("a red circle", **kw).pixels
    assert isinstance(compiled.model.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)
    if not regional:
        assert isinstance(compiled.model.unet, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
