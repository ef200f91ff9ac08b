from .energy_model import EnergyModel, EnergyModelOutput
from .initializer_unet import InitializerOutput, InitializerUNet
from .mlp import EnergyMLP, InitializerMLP

__all__ = ["EnergyMLP", "EnergyModel", "EnergyModelOutput", "InitializerMLP", "InitializerOutput", "InitializerUNet"]
