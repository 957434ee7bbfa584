"""aqlm_ctx: build, load and run any PyTorch model as an AQLM model without full-precision weights."""

from .config import AqlmConfig, as_config

__all__ = ["AqlmConfig", "as_config"]
