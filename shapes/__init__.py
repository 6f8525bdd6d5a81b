"""The shapes world (../shared/SHAPES.md) and everything that is about it rather than about diffusion:

    shapes.world     scenes, captions, the renderer and the detector (numpy and PIL)
    shapes.clip      the world's CLIP: open_clip model, its text tower as transformers' CLIPTextModel,
                     the image tower kept for CLIP score
    shapes.evaluate  ``ldm eval``: fixed prompts, the detector as judge, CLIP score
    shapes.demos     ``ldm demo textual-inversion|dreambooth``
    shapes.build     ``ldm build-shapes-model``: VAE, CLIP and U-Net from scratch, installed as the
                     embedded default model
    shapes.cli       those commands, plugged into ``ldm`` through the ``ldm.commands`` entry point

``world`` and ``clip`` sit just above ``ldm`` (the shapes-model trainings in ``finetune`` render from
them); the other modules sit on top of ``pipelines`` and ``finetune``.
"""
