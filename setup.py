"""Packaging for vdm: `pip install -e .` (add `jax[cuda12]` yourself for GPUs)."""

from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [
        line.strip()
        for line in f
        if line.strip() and not line.startswith("#") and not line.startswith(("pytest", "ruff"))
    ]

setup(
    name="vdm",
    version="0.1.0",
    description="Variational Diffusion Models in JAX/Flax",
    packages=find_packages(include=["vdm", "vdm.*"]),
    python_requires=">=3.11",
    install_requires=requirements,
)
