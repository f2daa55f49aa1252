"""The sample grid of a class-conditional model is conditional by default (sample.guidance=1).

`vdm.run.sample.draw_samples` with the run's SamplerSpec is what both the end-of-training grid
(write_final) and `--mode=sample` draw, so the in-process test covers both paths; the slow test
drives them through `vdm.main`. A fresh network ignores its label (zero-initialised output
layer), so the in-process test draws from randomly perturbed parameters.
"""

import dataclasses

import jax
import numpy as np
import pytest
import train_helpers as th

from vdm.run.sample import draw_samples
from vdm.run.setup import build_run

# mixture2d has 8 labelled components: a class-conditional MLP with a null label.
CONDITIONAL = dict(data__name="mixture2d", data__mixture2d__num_eval=96, model__num_classes=8)


def _perturbed(params, scale: float = 0.3):
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    noisy = [leaf + scale * rng.standard_normal(leaf.shape).astype(leaf.dtype) for leaf in leaves]
    return jax.tree.unflatten(tree, noisy)


def test_default_grid_of_a_class_conditional_model_uses_the_labels():
    run = build_run(th.load_config(**CONDITIONAL))  # TINY pins no guidance: the default applies
    assert run.sampler.guidance == 1.0
    params = _perturbed(run.eval_params(run.init_state()))
    grid = draw_samples(run, params)
    conditional = draw_samples(run, params, spec=dataclasses.replace(run.sampler, guidance=1.0))
    null_label = draw_samples(run, params, spec=dataclasses.replace(run.sampler, guidance=0.0))
    np.testing.assert_array_equal(grid, conditional)
    # Same key and sampler, so the null-label draws differ only through the ignored labels.
    assert np.abs(grid - null_label).max() > 1e-3


def test_default_guidance_is_a_no_op_for_unconditional_models():
    run = build_run(th.load_config())  # TINY: a Gaussian with num_classes=0
    params = _perturbed(run.eval_params(run.init_state()))
    default = draw_samples(run, params)
    weight_zero = draw_samples(run, params, spec=dataclasses.replace(run.sampler, guidance=0.0))
    np.testing.assert_array_equal(default, weight_zero)


@pytest.mark.slow
def test_end_of_training_and_mode_sample_grids_are_conditional(tmp_path):
    # The label reaches the output through zero-initialised projections, which get a gradient
    # only once the layer after them has moved: a few steps without warm-up.
    flags = th.overrides(
        **CONDITIONAL, train__num_steps=6, optim__warmup_steps=1, optim__learning_rate=3e-2
    )
    th.run_main(tmp_path, *flags)
    grid = np.load(tmp_path / "samples.npy")  # the end-of-training grid
    th.run_main(tmp_path, *flags, mode="sample")
    np.testing.assert_array_equal(np.load(tmp_path / "samples_6_ancestral_4.npy"), grid)
    th.run_main(tmp_path, *flags, "--config.sample.guidance=0", mode="sample")
    null_label = np.load(tmp_path / "samples_6_ancestral_4_w0.npy")
    assert not np.array_equal(null_label, grid)
