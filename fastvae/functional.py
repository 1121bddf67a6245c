"""fastvae's functional API: the fused VAE ops.

Each op runs fused Triton kernels on CUDA tensors and the plain PyTorch
reference path elsewhere (see :mod:`fastvae.backend`).
"""
from fastvae.ops.reconstruction_loss import reconstruction_loss
from fastvae.ops.reparameterize_kl import reparameterize_kl

__all__ = ["reconstruction_loss", "reparameterize_kl"]
