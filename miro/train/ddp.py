"""DDP with a static graph that also works under gradient accumulation.

``static_graph=True`` is the published setting (``DDPStrategy(static_graph=True, ...)``, miro_facts):
:func:`miro.models.flow_loss` builds the same autograd graph every step (the self-conditioning
pass runs under ``no_grad`` and is masked; dropout is ``torch.where``), and the parameters it
never uses (``logvar_proj`` without reweighting) are found once instead of by a graph walk after
every forward (``find_unused_parameters``).

PyTorch records the static graph on the first backward that synchronises. Lightning runs the
micro-batches of an accumulation window inside ``DistributedDataParallel.no_sync()``, so with
``accumulate_grad_batches > 1`` the very first backward is unsynchronised, and DDP then fails with
``expect_autograd_hooks_ INTERNAL ASSERT FAILED`` in ``reducer.cpp`` (pytorch/pytorch#143580,
huggingface/accelerate#3679; reproduced here on torch 2.13 with gloo).
The fix under review upstream (pytorch/pytorch#187732) also describes the second half of the bug:
once past the assert, a static-graph reducer whose first iteration ran under ``no_sync`` stops
all-reducing from the second iteration on.

:class:`StaticGraphDDPStrategy` therefore lets every micro-batch of the first optimizer step after
the model is wrapped synchronise (each backward then all-reduces the gradient accumulated so far;
all-reduce is linear, so the step's gradient is the same average), and uses ``no_sync`` from the
second step on, when the graph is recorded.
"""

from __future__ import annotations

from contextlib import contextmanager

from lightning.pytorch.strategies import DDPStrategy


class StaticGraphDDPStrategy(DDPStrategy):
    """``DDPStrategy(static_graph=True)`` whose first optimizer step synchronises every micro-batch."""

    def __init__(self, **kwargs):
        super().__init__(static_graph=True, **kwargs)
        self._first_step: int | None = None  # the global step at which this process's DDP model started

    @contextmanager
    def block_backward_sync(self):
        step = int(self.lightning_module.trainer.global_step)
        if self._first_step is None:
            self._first_step = step
        if step == self._first_step:  # the graph is not recorded yet: synchronise (see the module docstring)
            yield None
            return
        with super().block_backward_sync():
            yield None
