"""torcheggroll: EGGROLL evolution strategies for PyTorch."""

from .compat import (
    TorchEggrollES,
    compute_es_gradient,
    generate_lora_noise,
    generate_noise_for_shapes,
    generate_standard_noise,
)
from .decode import PopulationDecoder
from .lowrank import LowRankFallbackError
from .noise import ParamNoise, draw_noise
from .optimizer import EggrollOptimizer
from .population import Population
from .scaling import width_scaled_groups
from .shaping import IdenticalLossesWarning, NonFiniteLossWarning

__version__ = "0.3.0"

__all__ = [
    "EggrollOptimizer",
    "IdenticalLossesWarning",
    "LowRankFallbackError",
    "NonFiniteLossWarning",
    "ParamNoise",
    "Population",
    "PopulationDecoder",
    "TorchEggrollES",
    "__version__",
    "compute_es_gradient",
    "draw_noise",
    "generate_lora_noise",
    "generate_noise_for_shapes",
    "generate_standard_noise",
    "width_scaled_groups",
]
