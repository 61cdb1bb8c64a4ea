"""How a sampler tells a patched model which denoising step it is about to run.

A model patched by :func:`eoc_dit.apply_eoc` counts its forward calls itself, so third-party samplers
need nothing. Samplers of this package also *announce* each step: the patched model then knows the
step index, the run length and whether CFG is on without reading the timestep back from the device,
and it can check them against its schedule and prior. On an unpatched model this is a no-op.
"""

from __future__ import annotations

LISTENER_ATTR = "_eoc_step_listener"


def announce_step(model, step: int, num_steps: int, cfg: bool) -> None:
    """Announce that the next forward call of ``model`` is step ``step`` of ``num_steps``.

    ``cfg`` is True when the batch is [conditional; unconditional] halves (classifier-free guidance).
    """
    listener = getattr(model, LISTENER_ATTR, None)
    if listener is not None:
        listener(step, num_steps, cfg)
