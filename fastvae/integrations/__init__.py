"""fastvae's ops under other libraries' models, each behind an optional extra.

* :mod:`fastvae.integrations.diffusers` (``pip install "fastvae[diffusers]"``):
  the posterior of diffusers' ``AutoencoderKL`` (Stable Diffusion's, SDXL's,
  SD3's and Flux's VAE) with its sample and KL fused, and a one-line patch.

Nothing here is imported by ``import fastvae``: each integration imports its
library only when it is imported itself.
"""
