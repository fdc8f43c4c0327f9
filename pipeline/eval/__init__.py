"""Evaluation stage: FID / KID, bits/dim, reference statistics, the FPE residual and the score's
conservativity of a trained run.

Entry point: ``fpdiff eval {fid,bpd,ref-stats,fpe,conservativity}`` / ``python -m pipeline.eval`` / ``accelerate
launch -m pipeline.eval`` (``main``, in ``cli``, which also holds the trainer's hooks). One module per
metric: ``fid`` (samples -> features -> Fréchet / kernel distance), ``bpd`` (probability-flow ODE
likelihood), ``fpe`` (the score-FPE residual on test images), ``conservativity`` (the score's Jacobian asymmetry); ``features`` holds the feature
networks (clean-fid's Inception or a TorchScript file) and the distributed statistics; ``common``
the rank / device / batching pieces.
Uses: the math core, ``pipeline.data`` (test shards), ``pipeline.rundir`` (which weights to load).
"""


def main(argv=None) -> int:
    from pipeline.eval.cli import evaluate_main  # deferred: importing one module of the stage must not load its CLI
    return evaluate_main(argv)
