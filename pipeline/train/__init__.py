"""Training stage: DSM + the FPE regularizer on one process or many.

Entry point: ``fpdiff train`` / ``python -m pipeline.train`` / ``accelerate launch -m pipeline.train``
(``pipeline.app.train_main``, which hands the trainer its hooks into evaluation and publishing).
The loop (``loop``) reads top to bottom and calls one optimizer step (``step.TrainStep``, also what
the benchmarks time); it drives a backend (``backends``: single process, DDP through Accelerate,
DeepSpeed ZeRO 1/2), writes atomic checkpoints (``checkpoint``), starts fine-tunes from their source
(``init_source``) and logs to metrics.jsonl and wandb (``tracking``). Uses: the core (``sde``,
``losses``, ``fpe``, ``sampling``, ``ema``, ``rundir``) and ``pipeline.data``; never another stage.
"""
