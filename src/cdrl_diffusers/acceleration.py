"""Speed features kept out of Algorithm 2: reduced precision, ``torch.compile`` and CUDA graphs.

They follow the ecosystem's habits instead of per-call flags:

- Reduced precision: ``pipe.to(torch.bfloat16)`` (the networks run in bf16), or a ``torch.autocast`` context around
  the call. In both, the Langevin state, the quadratic recovery term, the noise and the Tweedie step stay float32:
  the networks' outputs and gradients are cast to float32 before they enter Eq. 5 and Eq. 18. The training step
  takes ``precision`` (``precision_context``), the way Accelerate's ``mixed_precision`` does.
- ``torch.compile``: compile the model, ``pipe.energy_model = fold_spectral_norm(pipe.energy_model)`` then
  ``pipe.energy_model.compile()``. Folding first gives the compiler plain weights instead of a parametrisation.
- CUDA graphs: ``pipe.enable_cuda_graph()`` replays the EBM's forward and input-gradient pass from one graph
  (``CUDAGraphEnergyGradient``), which removes the per-kernel launch cost of the ~100-layer network.

docs/performance.md gives the measured speed and sample quality of each.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn.utils import parametrize

from .guidance import StackedTerms
from .sampling import energy_gradient

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(precision: str | None, device: torch.device | str) -> AbstractContextManager:
    """Autocast for the network evaluations of a training step; the chain state stays float32.

    ``None`` keeps the caller's setting (e.g. Accelerate's ``--mixed_precision``); ``"fp32"`` disables autocast;
    ``"bf16"`` and ``"fp16"`` run convolutions and matrix products in that dtype.
    """
    if precision is None:
        return nullcontext()
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {tuple(PRECISIONS)} or None, got {precision!r}.")
    device_type = torch.device(device).type
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=PRECISIONS[precision], cache_enabled=False)


def fold_spectral_norm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` whose spectrally normalised weights are plain tensors (App. A.1).

    The copy is the same architecture built with ``use_spectral_norm=False`` and holds W / sigma(W) as its weights,
    so it computes the same f_hat without a parametrisation, which is what ``torch.compile`` traces best. It is a
    snapshot: fold again after the weights change. A model without parametrisations is returned unchanged.
    """
    if not any(parametrize.is_parametrized(module) for module in model.modules()):
        return model
    config = getattr(model, "config", {})
    if "use_spectral_norm" not in config:
        raise ValueError(
            f"`model` must have a `use_spectral_norm` config option to be folded, got {type(model).__name__}."
        )
    folded = type(model).from_config(config, use_spectral_norm=False)
    sources = dict(model.named_modules())
    with torch.no_grad(), parametrize.cached():
        for name, module in folded.named_modules():
            for key, value in [*module._parameters.items(), *module._buffers.items()]:
                if value is not None:
                    value.copy_(getattr(sources[name], key))
    return folded.to(device=model.device, dtype=model.dtype).eval()


class CUDAGraphEnergyGradient:
    """``energy_gradient`` replayed from one CUDA graph: the forward and input-gradient pass of the guided EBM.

    Captured at the first call (after two warm-up passes on a side stream) and replayed at every later Langevin
    step and level of one sampling call. The chain state and log-SNR are copied into static buffers; the noise and
    the Langevin update stay outside the graph, so random streams are those of the eager path. Use it inside one
    ``frozen`` context (the graph reads the cached spectral-norm weights) and consume each returned gradient before
    the next call: it is a static buffer.

    Args:
        energy_model: the EBM f_hat on a CUDA device.
        terms: the guidance terms of the sampling call.
        sample: a chain state of the call's shape, dtype and device.
    """

    def __init__(self, energy_model: nn.Module, terms: StackedTerms, sample: torch.Tensor):
        self.energy_model = energy_model
        self.terms = terms
        self.static_sample = torch.zeros_like(sample)
        self.static_logsnr = torch.zeros(sample.shape[0], device=sample.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def _evaluate(self) -> torch.Tensor:
        return energy_gradient(self.energy_model, self.static_sample, self.static_logsnr, self.terms)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._evaluate()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._evaluate()

    def __call__(self, sample: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        self.static_sample.copy_(sample)
        self.static_logsnr.copy_(logsnr.expand(sample.shape[0]))
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.output
