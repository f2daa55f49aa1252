"""vdm: Variational Diffusion Models in JAX/Flax.

Importing the package sets the measured XLA:CPU flags (vdm/runtime.py) before JAX's backend
starts, so library users get the same convolution speed as `python -m vdm.main`.
"""

from vdm import runtime as _runtime

_runtime.configure_xla()
