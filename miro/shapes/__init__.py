"""The Shapes world: a GenEval-like toy world with exact rewards, run offline on 2 CPU cores.

- :mod:`~miro.shapes.world` — vocabulary and geometry (classes, GenEval colours, relations,
  resolution, minimum object size, the no-overlap rule).
- :mod:`~miro.shapes.scene` — seeded scenes from GenEval metadata; clutter, cut objects.
- :mod:`~miro.shapes.render` — anti-aliased numpy rendering (supersample, box filter).
- :mod:`~miro.shapes.captions` — captions <-> GenEval metadata (templates of the six GenEval
  categories plus freer phrasings, and a parser).
- :mod:`~miro.shapes.imperfections` — web-like caption and image defects at configurable rates.
- :mod:`~miro.shapes.detector` — the exact classical-CV detector.
- :mod:`~miro.shapes.rewards` — the ``shapes_*`` reward scorers.
- :mod:`~miro.shapes.dataset` — webdataset shards of samples (``miro shapes make-dataset``).
- :mod:`~miro.shapes.eval` — ShapesEval (prompt set, generation, scoring).

Nothing heavy is imported here; import the submodule you need.
"""
