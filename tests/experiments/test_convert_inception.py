"""The pytorch-fid state dict -> npz renaming, checked on a state dict made from random
weights by the inverse mapping (PyTorch is not needed, nothing is downloaded)."""

import numpy as np
import pytest

from experiments.convert_inception import torch_to_flax
from vdm.metrics import features
from vdm.metrics import inception as inc


def _as_torch(flat: dict) -> dict:
    inverse = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    state = {}
    for key, value in flat.items():
        collection, *layer, kind, leaf = key.split("/")
        name = ".".join(layer + [kind])
        if leaf == "kernel":
            state[f"{name}.weight"] = value.transpose(3, 2, 0, 1)  # -> torch's [O, I, kh, kw]
        else:
            state[f"{name}.{inverse[leaf]}"] = value
            if leaf == "var":
                state[f"{name}.num_batches_tracked"] = np.array(0)
    state["fc.weight"], state["fc.bias"] = np.zeros((1008, 2048)), np.zeros(1008)
    return state


def test_a_pytorch_fid_state_dict_converts_to_the_flax_arrays():
    flat = inc.flatten(inc.random_variables(1))
    state = _as_torch(flat)
    assert {"Mixed_5b.branch1x1.conv.weight", "Mixed_7c.branch_pool.bn.running_var"} <= set(state)
    arrays = torch_to_flax(state)
    assert sorted(arrays) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(arrays[key], value)
    features.check_inception_arrays(arrays, "converted.npz")  # complete, every shape right
    with pytest.raises(ValueError, match="unexpected array 'Mixed_5b.extra.weight'"):
        torch_to_flax({"Mixed_5b.extra.weight": np.zeros(3)})
