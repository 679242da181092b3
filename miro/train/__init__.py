"""Training: Hydra-configured Lightning training of MIRO models, export to pipeline folders.

Public API::

    from miro.train.module import MiroLightningModule       # flow loss, EMA, LAMB/AdamW + warmup-cosine
    from miro.train.optim import Lamb, WarmupCosineDecayLR, param_groups
    from miro.train.ema import EMA
    from miro.train.convert import pipeline_from_checkpoint, convert   # .ckpt -> MiroPipeline / folder
    from miro.train.testbed import read_testbed, load_testbed
    from miro.train.cli import compose, build                # Hydra config -> (module, datamodule, trainer)

Commands: ``miro train experiment=<name> [overrides]``, ``miro convert CKPT OUT_DIR``,
``miro testbed precompute``. See ``docs/training.md``.
"""
