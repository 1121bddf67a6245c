"""fastvae: fast variational autoencoders with fused Triton kernels."""
import torch

_MIN_TORCH = (2, 8)
if tuple(int(part) for part in torch.__version__.split(".")[:2]) < _MIN_TORCH:
    raise ImportError(
        f"fastvae needs torch >= {'.'.join(map(str, _MIN_TORCH))} (torch.library.custom_op with tags); "
        f"found torch {torch.__version__}"
    )

from fastvae import functional  # noqa: E402
from fastvae.functional import reconstruction_loss, reparameterize_kl  # noqa: E402

__version__ = "0.1.0"
__all__ = ["functional", "reconstruction_loss", "reparameterize_kl", "__version__"]
