"""manualconv: convolution and pooling layers whose backward pass is derived by hand.

    import manualconv
    conv = manualconv.Conv2d(3, 16, 3, padding=1)      # a drop-in torch.nn.Conv2d
    y = manualconv.functional.max_pool2d(conv(x), 2)  # torch.nn.functional's signature
    manualconv.set_backend("reference")               # plain-tensor kernels instead of C++

Layers: API (functional, modules) → autograd Functions (autograd.py) → kernels ('cpp' from
csrc/ or 'reference' in reference.py, chosen by set_backend / use_backend).
"""

from . import functional, reference
from .backend import get_backend, set_backend, use_backend
from .modules import AvgPool2d, Conv2d, MaxPool2d

__version__ = "0.1.0"
__all__ = ["functional", "reference", "Conv2d", "MaxPool2d", "AvgPool2d", "set_backend", "get_backend", "use_backend"]
