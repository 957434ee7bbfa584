"""aqlm_ctx: build, load and run any PyTorch model as an AQLM model without full-precision weights."""

from importlib.metadata import PackageNotFoundError, version

from .config import AqlmConfig, as_config
from .construction import aqlm_quantized
from .decorators import quantize_model
from .encoding import EncodedLinear, encode_linear
from .loading import from_pretrained, load_checkpoint, load_tensors
from .matching import SkipMatcher
from .quantizing import quantize_weights_
from .saving import save_checkpoint
from .summary import ModelSummary, summarize
from .visitor import replace_linear_layers, replace_with_aqlm_linear

try:
    __version__ = version("aqlm-ctx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    # configuration
    "AqlmConfig",
    "SkipMatcher",
    "as_config",
    # building quantized models
    "aqlm_quantized",
    "quantize_model",
    "replace_linear_layers",
    "replace_with_aqlm_linear",
    # checkpoints
    "from_pretrained",
    "load_checkpoint",
    "load_tensors",
    "save_checkpoint",
    # encoding full-precision models
    "EncodedLinear",
    "encode_linear",
    "quantize_weights_",
    # inspecting
    "ModelSummary",
    "summarize",
]
