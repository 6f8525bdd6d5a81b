"""--compile: the compiled U-Net and decoder give the eager images (to float tolerance)."""

import shutil

import pytest
import torch


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("regional", [False, True])
def test_compiled_pipeline_gives_the_eager_images(sd1_dir, regional):
    from pipelines.pipeline import Pipeline
    eager = Pipeline.from_pretrained(sd1_dir)
    compiled = Pipeline.from_pretrained(sd1_dir).compile(regional=regional)
    kw = dict(steps=3, seed=4, negative_prompt="a square", batch_size=2)
    a = eager.text_to_image("a red circle", **kw).pixels
    b = compiled.text_to_image("a red circle", **kw).pixels
    assert isinstance(compiled.model.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
