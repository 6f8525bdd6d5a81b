"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): the deep blocks of a
U-Net change slowly from one sampling step to the next, so they are computed on every ``interval``-th
network evaluation only; in between, only the shallow branch (the first ``depth`` down blocks and the
last ``depth`` up blocks, with the input and output layers) runs, on the deep features cached at the
last full evaluation. ``depth`` 0 is the shallowest branch: no whole level runs, only the last layer
of the last up block (its resnet and attention) on the skip from the input convolution, with the
input and output layers; every down block and that up block's other layers are cached too. The
caching replaces modules of a diffusers ``UNet2DConditionModel`` (whole blocks, and at depth 0 the
last up block's other layers) by their cached output for the partial evaluations, so the U-Net's own
forward (SDXL's added conditions, inpainting channels, guidance inputs) runs unchanged.
"""

from __future__ import annotations

from typing import Callable


class DeepCache:
    """Wraps a network function ``net(x, t, context)`` of ``unet`` so that every ``interval``-th call
    computes the whole U-Net (caching its deep blocks' outputs) and the calls between reuse them.
    ``interval`` 1 is the plain network. One instance serves one sampling run (its cache is that
    run's); the U-Net is left as it was after every call."""

    def __init__(self, unet, interval: int, depth: int = 1):
        n_up = len(unet.up_blocks)
        if interval < 1:
            raise ValueError(f"the cache interval must be >= 1, got {interval}")
        if not 0 <= depth < n_up:
            raise ValueError(f"the cache depth must be between 0 and {n_up - 1} for this U-Net "
                             f"({n_up} resolution levels), got {depth}")
        self.interval = interval
        # in the order the forward calls them: deeper down blocks, the middle, the deeper up blocks
        self.deep = [*unet.down_blocks[depth:], unet.mid_block, *unet.up_blocks[:n_up - max(depth, 1)]]
        if depth == 0:  # and the last up block's layers but its last (which reads conv_in's skip)
            last = unet.up_blocks[-1]
            attentions = getattr(last, "attentions", None) or [None] * len(last.resnets)
            self.deep += [m for pair in zip(last.resnets[:-1], attentions[:-1]) for m in pair if m is not None]
        self.calls = 0
        self.full_calls = 0
        self._cache: list | None = None
        self._batch = 0  # the batch size the cache was made at

    def _full(self, run):
        outputs = [None] * len(self.deep)
        hooks = [m.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
                 for i, m in enumerate(self.deep)]
        try:
            result = run()
        finally:
            for h in hooks:
                h.remove()
        self._cache = outputs
        self.full_calls += 1
        return result

    def _partial(self, run):
        for m, out in zip(self.deep, self._cache):
            m.forward = lambda *args, _out=out, **kwargs: _out
        try:
            return run()
        finally:
            for m in self.deep:
                del m.forward  # back to the class's forward

    def wrap(self, net: Callable) -> Callable:
        def cached_net(x, t, context):
            i = self.calls
            self.calls += 1
            if self.interval == 1:
                return net(x, t, context)
            if i % self.interval == 0 or self._cache is None or self._batch != x.shape[0]:
                self._batch = x.shape[0]
                return self._full(lambda: net(x, t, context))
            return self._partial(lambda: net(x, t, context))
        return cached_net
