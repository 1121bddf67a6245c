"""VAE models over fastvae's layers.

* :mod:`fastvae.models.base`: :class:`TrainableModel`, the interface the training engine speaks;
* :mod:`fastvae.models.vae`: :class:`VAE` (loss, sampling, reconstruction, the
  importance-sampled log-likelihood; trained on the ELBO or on the importance-weighted bound,
  :class:`IWAEOutput`) and the KL warm-up schedule :func:`kl_warmup_weight`;
* :mod:`fastvae.models.hierarchical`: :class:`HierarchicalVAE`, a top-down hierarchical VAE (VDVAE/NVAE style)
  whose stochastic layers sample and take their KL through the fused op on latent feature maps;
* :mod:`fastvae.models.autoencoder`: the deterministic baseline :class:`Autoencoder`;
* :mod:`fastvae.models.vqvae`: :class:`VQVAE`, the discrete-latent VQ-VAE over the fused vector quantizer;
* :mod:`fastvae.models.networks`: ready-made encoders and decoders, and the
  :func:`mlp_vae`, :func:`conv_vae`, :func:`mlp_autoencoder` and :func:`conv_autoencoder` builders.

Their likelihoods ``p(x | z)`` are in :mod:`fastvae.likelihoods` (:data:`LIKELIHOODS`
is re-exported here). Everything public is importable from ``fastvae.models`` directly.
"""

from fastvae.likelihoods import LIKELIHOODS
from fastvae.models.autoencoder import Autoencoder, AutoencoderOutput
from fastvae.models.base import MetricPlot, StepInputs, TrainableModel
from fastvae.models.hierarchical import HierarchicalVAE, HVAEOutput
from fastvae.models.networks import (
    CONV_WIDTHS,
    conv_autoencoder,
    conv_decoder,
    conv_encoder,
    conv_vae,
    default_conv_widths,
    mlp_autoencoder,
    mlp_decoder,
    mlp_encoder,
    mlp_vae,
)
from fastvae.models.vae import LOG_LIKELIHOOD_ROWS, VAE, IWAEOutput, VAEOutput, kl_warmup_weight
from fastvae.models.vqvae import VQVAE, VQVAEOutput

__all__ = [
    "Autoencoder",
    "AutoencoderOutput",
    "CONV_WIDTHS",
    "HVAEOutput",
    "HierarchicalVAE",
    "IWAEOutput",
    "LIKELIHOODS",
    "LOG_LIKELIHOOD_ROWS",
    "MetricPlot",
    "StepInputs",
    "TrainableModel",
    "VAE",
    "VAEOutput",
    "VQVAE",
    "VQVAEOutput",
    "conv_autoencoder",
    "conv_decoder",
    "conv_encoder",
    "conv_vae",
    "default_conv_widths",
    "kl_warmup_weight",
    "mlp_autoencoder",
    "mlp_decoder",
    "mlp_encoder",
    "mlp_vae",
]
