"""fastvae's functional API: the fused VAE ops.

Each op runs fused Triton kernels on CUDA tensors and the plain PyTorch
reference path elsewhere (see :mod:`fastvae.backend`).
"""
from fastvae.ops.discretized_logistic_mixture import (
    discretized_logistic_mixture_mode,
    discretized_logistic_mixture_nll,
    sample_discretized_logistic_mixture,
)
from fastvae.ops.reconstruction_loss import reconstruction_loss
from fastvae.ops.reparameterize_kl import reparameterize_kl
from fastvae.ops.reparameterize_log_ratio import reparameterize_log_ratio
from fastvae.ops.vector_quantize import vector_quantize

__all__ = [
    "discretized_logistic_mixture_mode",
    "discretized_logistic_mixture_nll",
    "reconstruction_loss",
    "reparameterize_kl",
    "reparameterize_log_ratio",
    "sample_discretized_logistic_mixture",
    "vector_quantize",
]
