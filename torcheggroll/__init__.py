"""torcheggroll: EGGROLL evolution strategies for PyTorch."""

from .lowrank import LowRankFallbackError
from .noise import ParamNoise, draw_noise
from .optimizer import EggrollOptimizer
from .population import Population
from .shaping import NonFiniteLossWarning

__version__ = "0.2.0"

__all__ = [
    "EggrollOptimizer",
    "LowRankFallbackError",
    "NonFiniteLossWarning",
    "ParamNoise",
    "Population",
    "__version__",
    "draw_noise",
]
