"""Classifier stage: the time-dependent classifier p_t(y | x_t) of class-conditional sampling.

Entry point: ``fpdiff classifier --run-dir RUN`` (``main``, in ``train``): trains one on the run's shards
and writes ``RUN/classifier/``. The network and its folder format are core (``pipeline.models.classifier``),
so the sampling stage loads it without importing this stage. Uses: ``pipeline.data``, ``pipeline.sde``.
"""


def main(argv=None) -> int:
    from pipeline.classifier.train import classifier_main  # deferred: importing one module of the stage must not load its CLI
    return classifier_main(argv)
