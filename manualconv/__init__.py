"""manualconv: convolution and pooling layers whose backward pass is derived by hand.

    import manualconv
    conv = manualconv.Conv2d(3, 16, 3, padding=1)      # a drop-in torch.nn.Conv2d
    y = manualconv.functional.max_pool2d(conv(x), 2)  # torch.nn.functional's signature
    model = manualconv.convert(torchvision_model)     # every supported layer switched over
    manualconv.set_backend("reference")               # plain-tensor kernels instead of C++

Layers: API (functional, modules) → autograd Functions (autograd.py) → kernels ('cpp' from
csrc/ or 'reference' in reference.py, chosen by set_backend / use_backend).
"""

from . import functional, models, reference
from .backend import get_backend, set_backend, use_backend
from .convert import convert, revert
from .deltas import record_deltas
from .ops import cpu_capability  # the instruction set of the C++ kernels (MANUALCONV_CPU_CAPABILITY)
from .ops import tiles_outrun_blas  # whether the kernel choice favours the tiles (MANUALCONV_TILES_OUTRUN_BLAS)
from .ops import empty_cache, output_cache_info  # the C++ operators' CPU output cache (MANUALCONV_CPU_CACHE_MB)
from .recompute import get_recompute, set_recompute  # activations after batch norm rebuilt, not kept (MANUALCONV_RECOMPUTE)
from .modules import (
    AdaptiveAvgPool2d,
    AdaptiveMaxPool2d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    ConvTranspose2d,
    CrossEntropyLoss,
    Linear,
    MaxPool2d,
    ReLU,
    ScaledTanh,
    Sigmoid,
    Subsampling2d,
    Tanh,
)

from .modules import BatchNorm1d, BatchNorm2d, Dropout, Dropout2d, GroupNorm, LayerNorm  # normalisation, dropout

from .modules import ELU, GELU, Hardsigmoid, Hardswish, Hardtanh, LeakyReLU, LogSoftmax, ReLU6, SiLU, Softmax  # activations
from .capture import capture  # activations: functional capture

from .modules import refuse_torchscript as _refuse_torchscript

_refuse_torchscript()  # torch.jit.script of any manualconv module: a clear error (see modules.py)

__version__ = "0.1.0"  # the version's one home: pyproject.toml (hence wheels, pip) reads it from here
__all__ = [
    "functional", "models", "reference", "set_backend", "get_backend", "use_backend", "convert", "revert", "record_deltas",
    "Conv2d", "MaxPool2d", "AvgPool2d", "Conv1d", "ConvTranspose2d", "AdaptiveMaxPool2d", "AdaptiveAvgPool2d",
    "Linear", "ReLU", "Sigmoid", "Tanh", "ScaledTanh", "CrossEntropyLoss", "Subsampling2d",
]
__all__ += ["cpu_capability", "tiles_outrun_blas", "empty_cache", "output_cache_info", "set_recompute", "get_recompute"]
__all__ += ["BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "Dropout", "Dropout2d"]  # normalisation, dropout
__all__ += ["GELU", "SiLU", "ReLU6", "Hardtanh", "Hardswish", "Hardsigmoid", "LeakyReLU", "ELU", "Softmax", "LogSoftmax",
            "capture"]  # activations, functional capture
