"""Training stage: DSM + the FPE regularizer on one process or many.

Entry point: ``fpdiff train`` / ``python -m pipeline.train`` / ``accelerate launch -m pipeline.train``
(``main``). The loop (``loop``) reads top to bottom; it drives a backend (``backends``: single process,
DDP through Accelerate, DeepSpeed ZeRO 1/2), writes atomic checkpoints (``checkpoint``) and logs to
metrics.jsonl and wandb (``tracking``). ``classifier`` trains the time-dependent classifier of
class-conditional sampling (``fpdiff classifier``). Uses: the math core (``sde``, ``losses``,
``fpe``, ``sampling``, ``ema``), ``pipeline.data``, ``pipeline.eval`` (in-training FID / bits/dim),
``pipeline.publish`` (the export at the end of a run), ``pipeline.rundir``.
"""


def main(argv=None) -> int:
    from pipeline.train.loop import main as train_main
    return train_main(argv)
