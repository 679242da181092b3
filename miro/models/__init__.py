"""MIRO model core: the RIN backbone, the flow convention, preconditioning, loss and sampler.

Public API::

    from miro.models import MiroModel, RIN, get_config, flow_loss, LossConfig, euler_sample

The flow convention (gamma = signal level, v = eps - x0, Euler direction, CFG, shift, FLUX's
sigma) is stated once in :mod:`miro.models.flow`.
"""

from miro.models.configs import (
    CONFIG_NAMES,
    SHAPES_REWARD_KEYS,
    NetworkConfig,
    PreconditioningConfig,
    get_config,
)
from miro.models.flow import FlowPrecond, LossConfig, Scheduler, flow_loss, time_grid
from miro.models.model import MiroModel
from miro.models.rin import RIN
from miro.models.sampler import euler_sample

__all__ = [
    "CONFIG_NAMES",
    "SHAPES_REWARD_KEYS",
    "NetworkConfig",
    "PreconditioningConfig",
    "get_config",
    "FlowPrecond",
    "LossConfig",
    "Scheduler",
    "flow_loss",
    "time_grid",
    "MiroModel",
    "RIN",
    "euler_sample",
]
