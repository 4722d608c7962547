"""gatelab: gated computation for PyTorch.

Routers return a :class:`~gatelab.routing.Routing`; dispatchers, losses, telemetry and
model edits consume it. See ``docs/architecture.md``.
"""

from .experts import ExpertBank, ExpertWeights
from .layers import MoE, SharedExpert
from .parallel import parallelize
from .routing import ROUTERS, Routing

__version__ = "0.1.0"

__all__ = [
    "ROUTERS",
    "ExpertBank",
    "ExpertWeights",
    "MoE",
    "Routing",
    "SharedExpert",
    "__version__",
    "parallelize",
]
