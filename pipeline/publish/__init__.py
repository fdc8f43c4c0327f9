"""Publishing stage: weights in and out of fpdiff.

Entry points: ``fpdiff push`` (``hub``: upload a run's export to the Hugging Face Hub in the
background, load a model back from a Hub repo) and ``fpdiff import score-sde`` (``score_sde_import``:
a score_sde_pytorch / FP-Diffusion checkpoint as an fpdiff run). ``export`` writes a run's export
folder (EMA weights as safetensors, config, model card). Uses: huggingface_hub, safetensors,
``pipeline.rundir``.
"""


def main(argv=None) -> int:
    from pipeline.publish.hub import push_main  # deferred: importing one module of the stage must not load its CLI
    return push_main(argv)
