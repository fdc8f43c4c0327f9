"""Data stage: images -> WebDataset tar shards -> batches.

Entry point: ``fpdiff data shards`` (``main``), which writes shards from MNIST (IDX / keras .npz),
an image folder, a .npz or CIFAR-10 pickles (``shards``). Training, evaluation and the classifier
read those shards through one reader (``reader``: shard lists, tar iteration; ``decode``: a
sample's image and label) and the training loader adds an exactly-once, exactly-resumable sample
schedule per rank and worker (``loader``, ``schedule``). Uses: webdataset, ``pipeline.config``,
``pipeline.images``.
"""


def main(argv=None) -> int:
    from pipeline.data.shards import shards_main  # deferred: importing one module of the stage must not load its CLI
    return shards_main(argv)
