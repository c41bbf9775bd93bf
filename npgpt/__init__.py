"""npgpt: a GPT built from first principles on NumPy (CPU) and CuPy (GPU).

    import npgpt
    x = npgpt.Tensor([[1.0, 2.0]], requires_grad=True)
    ((x * x).sum()).backward()      # x.grad == 2 x
"""
from . import backend
from .backend import use, get_array_module, to_numpy, seed
from .engine import Tensor, no_grad, enable_grad, is_grad_enabled
from . import ops
from .ops import concatenate, stack, split, where, masked_fill, exp, log, tanh, sqrt, relu, sum_to_shape
from .gradcheck import gradcheck, GradcheckError

__version__ = "0.1.0"

__all__ = ["backend", "use", "get_array_module", "to_numpy", "seed", "Tensor", "no_grad", "enable_grad",
           "is_grad_enabled", "ops", "concatenate", "stack", "split", "where", "masked_fill", "exp", "log",
           "tanh", "sqrt", "relu", "sum_to_shape", "gradcheck", "GradcheckError"]
from . import functional
from .model import GPT, GPTConfig
from .nn import Module, Parameter
from . import hf

__all__ += ["functional", "hf", "GPT", "GPTConfig", "Module", "Parameter"]
