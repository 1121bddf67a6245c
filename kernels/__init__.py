"""fastvae's Triton kernels, one module per fused op (installed as ``fastvae.kernels``).

Importing this package needs Triton; :mod:`fastvae` imports it only when a
kernel is launched.
"""
