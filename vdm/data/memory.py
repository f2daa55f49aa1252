"""Datasets that fit in host memory: scikit-learn's digits and the known-density sets.

Batching is a pure function of (seed, step): epoch e visits the training set in the order of
permutation(seed, e), the global batch of step s is examples [s B, (s + 1) B) of that endless
stream, and process p keeps its contiguous block of B / P rows. So a resumed run sees the
same batches, processes get disjoint rows, and the global batch does not depend on the
number of processes at all (each process holds the whole, small, array).
"""

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from vdm.data import densities

# Digits: 1,797 images; a fixed permutation puts these many in the test split.
DIGITS_NUM_TEST = 297
DIGITS_VOCAB = 17  # grey levels 0..16


def _digits_file():
    """Path of the digits table scikit-learn ships (8x8 images as 64 columns, then the label).

    Found without importing scikit-learn: `import sklearn.datasets` pulls in scipy.stats and
    took 1.1-1.6 s of every digits launch (the quick start's included), reading the table
    0.02 s (2-vCPU EPYC). `importlib.util.find_spec` of a top-level package runs no code.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the digits dataset ships with scikit-learn, which is not installed: "
            "pip install scikit-learn (or pip install -r requirements.txt)"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-learn's digits table is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    # The same arrays as sklearn.datasets.load_digits() (tests/data/test_data.py compares).
    with gzip.open(_digits_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    x = table[:, :-1].reshape(-1, 8, 8).astype(np.uint8)[..., None]  # [1797, 8, 8, 1], 0..16
    y = table[:, -1].astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))  # fixed split, same on every host
    test, train = order[:DIGITS_NUM_TEST], order[DIGITS_NUM_TEST:]
    return {"x": x[train], "label": y[train]}, {"x": x[test], "label": y[test]}


def digits(split: str) -> dict:
    """The digits split ('train' 1,500 or 'test' 297) as {'x' uint8 [N,8,8,1], 'label'}."""
    train, test = _digits_arrays()
    return train if split == "train" else test


@functools.lru_cache(maxsize=8)
def synthetic(name: str, dim: int, num: int, split: str) -> dict:
    """A fixed draw of `num` examples from a known density; train and eval use other seeds."""
    dist = densities.get_density(name, dim)
    seed = {"train": 1, "eval": 2}[split]
    x, labels = dist.sample(np.random.default_rng([seed, num, dim]), num)
    return {"x": x} if labels is None else {"x": x, "label": labels}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Indices into the training set of the global batch of `step` (may span two epochs)."""
    start = step * global_batch
    first, last = start // n, (start + global_batch - 1) // n
    stream = np.concatenate([_permutation(seed, e, n) for e in range(first, last + 1)])
    offset = start - first * n
    return stream[offset : offset + global_batch]


def train_batches(arrays: dict, *, global_batch, seed, start_step, process_index, process_count):
    """Endless local batches of `arrays` from `start_step` (see the module docstring)."""
    n = len(arrays["x"])
    if global_batch > n:
        raise ValueError(f"data.batch_size={global_batch} exceeds the training set ({n}).")
    local = global_batch // process_count
    step = start_step
    while True:
        idx = batch_indices(n, global_batch, seed, step)
        mine = idx[process_index * local : (process_index + 1) * local]
        yield {k: v[mine] for k, v in arrays.items()}
        step += 1


def eval_batches(arrays: dict, *, batch_size, process_index, process_count, max_examples):
    """Every example once, in order, as padded local batches with a 'mask'.

    Global batch i holds examples [i P b, (i + 1) P b) for local size b and P processes;
    process p keeps rows [p b, (p + 1) b) of it. Rows past the end are zeros with mask 0, so
    every process yields the same number of batches (they meet in collectives).
    """
    n = len(arrays["x"]) if max_examples < 0 else min(max_examples, len(arrays["x"]))
    per_global = batch_size * process_count
    for first in range(0, n, per_global):
        idx = first + process_index * batch_size + np.arange(batch_size)
        real = idx < n
        safe = np.where(real, idx, 0)
        batch = {
            k: np.where(_expand(real, v), v[safe], 0).astype(v.dtype) for k, v in arrays.items()
        }
        batch["mask"] = real.astype(np.float32)
        yield batch


def _expand(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
