"""Sampling stage: draw samples from a trained run with its EMA weights.

Entry point: ``fpdiff sample`` (``main``, in ``cli``): a PNG grid and an .npz of samples, with the
predictor-corrector or probability-flow ODE sampler of ``pipeline.sampling`` and the controllable
generation of ``pipeline.controllable`` (inpainting, colorization, class-conditional sampling with a
classifier from ``fpdiff classifier``). Uses: ``pipeline.rundir`` to find the weights.
"""


def main(argv=None) -> int:
    from pipeline.sample.cli import sample_main  # deferred: importing one module of the stage must not load its CLI
    return sample_main(argv)
