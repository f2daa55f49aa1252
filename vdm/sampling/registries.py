"""The sampling registries: whole samplers, and the predictors and correctors that a
predictor-corrector sampler composes.

  SAMPLERS    fn(model, key, shape, steps, *, <options>, batch_sharding=None) -> z at the end
  PREDICTORS  fn(model, z, t, s, noise, *, <options>) -> z_s, one step from t down to s
  CORRECTORS  fn(model, z, t, s, key, shape, batch_sharding, *, <options>) -> z, at fixed t

Implementations register themselves where they are defined (vdm/sampling/steps.py, loops.py,
ode.py); vdm/sampling/samplers.py imports those modules so every registration exists.
"""

from vdm.registry import Registry

SAMPLERS = Registry("sampler", context=("model", "key", "shape", "steps", "batch_sharding"))
PREDICTORS = Registry("predictor", context=("model", "z", "t", "s", "noise"))
CORRECTORS = Registry(
    "corrector", context=("model", "z", "t", "s", "key", "shape", "batch_sharding")
)
