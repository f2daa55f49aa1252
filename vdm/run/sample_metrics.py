"""Sample quality for `--mode=sample` (sample.metrics) and `--mode=reference_stats`.

Files (all under <workdir>/metrics/ unless said otherwise):
  digits_classifier_<options hash>.msgpack   the trained digits feature network (reused)
  reference_<features>_<digest>_<data>_<split>.npz
                                             features, mean and covariance of the reference
                                             split under one feature network's weights
  <workdir>/sample_metrics.jsonl             one JSON line per `--mode=sample` with metrics

The reference split is sample.metrics.split (eval: the dataset's test split) capped at
sample.metrics.max_reference examples. Reference features depend on the network's weights, so
their file name holds the weights' digest: other weights never reuse stale statistics.
"""

import dataclasses
import datetime
import hashlib
import io
import json
import re
import time

import jax
import numpy as np
from etils import epath

from vdm import parallel
from vdm.errors import UserError
from vdm.metrics import frechet
from vdm.metrics.features import FEATURES, INCEPTION_HELP, FeatureNet
from vdm.model import SamplerSpec
from vdm.run.setup import KeyStream, Run, build_part

RECORDS_FILE = "sample_metrics.jsonl"


class Storage:
    """The feature networks' files: a cache folder and weights files named by options."""

    def __init__(self, directory):
        self.directory = epath.Path(directory)

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def cached(self, name: str, make) -> bytes:
        """The bytes of cache file `name`; made by `make()` and written when absent."""
        path = self.directory / name
        if path.exists():
            return path.read_bytes()
        data = make()
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / (path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.rename(path)  # a killed write never leaves a truncated cache file
        return data

    def read_npz(self, path: str, option: str) -> tuple[dict, str]:
        """(arrays, digest) of the .npz at `path`, the value of config option `option`."""
        p = epath.Path(path)
        if not p.exists():
            raise UserError(f"{option}={path}: no such file; {INCEPTION_HELP}.")
        data = p.read_bytes()
        try:
            with np.load(io.BytesIO(data)) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as err:  # not a zip / truncated
            raise UserError(f"{option}={path} is not a readable .npz ({err}).") from err
        return arrays, hashlib.sha256(data).hexdigest()[:16]


def build_features(run: Run, workdir) -> FeatureNet:
    """The feature network sample.metrics.features names (trained or loaded)."""
    node = run.config.sample.metrics
    storage = Storage(epath.Path(workdir) / "metrics")
    return build_part(FEATURES, node, "features", info=run.info, storage=storage)


def _split(run: Run) -> tuple[str, int]:
    node = run.config.sample.metrics
    if node.split not in ("eval", "train"):
        raise UserError(f"sample.metrics.split={node.split!r}; use eval or train.")
    return node.split, int(node.max_reference)


def reference_stats(run: Run, workdir, net: FeatureNet) -> dict:
    """Features (and their mean and covariance) of the reference split, cached.

    Returns:
      {'features' [N, d], 'mean', 'cov', 'split', 'num', 'path'}.
    """
    split, cap = _split(run)
    data = re.sub(r"[^A-Za-z0-9_.-]+", "-", run.info.name)
    cap_tag = "" if cap < 0 else f"_first{cap}"
    name = f"reference_{net.name}_{net.fingerprint}_{data}_{split}{cap_tag}.npz"
    path = epath.Path(workdir) / "metrics" / name
    if path.exists():
        with path.open("rb") as f, np.load(f) as npz:
            feats = npz["features"]
    else:
        codes = [
            b["x"][b["mask"] > 0]
            for b in run.dataset.eval_batches(batch_size=512, max_examples=cap, split=split)
        ]
        feats, _ = net.embed(np.concatenate(codes))
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            mean, cov = frechet.gaussian_stats(feats)
            tmp = path.parent / (name + ".tmp.npz")
            with tmp.open("wb") as f:
                np.savez(f, features=feats, mean=mean, cov=cov)
            tmp.rename(path)
    mean, cov = frechet.gaussian_stats(feats)
    return dict(features=feats, mean=mean, cov=cov, split=split, num=len(feats), path=str(path))


class _CountingNetwork:
    """A network whose every apply is counted on the host (one call = one evaluation of the
    whole batch), for the NFE of a sampling run; adaptive solvers included."""

    def __init__(self, network, counter: list):
        self.network, self.counter = network, counter

    def apply(self, *args, **kwargs):
        jax.debug.callback(lambda: self.counter.append(1))
        return self.network.apply(*args, **kwargs)


def timed_samples(run: Run, params, spec: SamplerSpec) -> tuple[np.ndarray, dict]:
    """Samples with spec, and {'nfe', 'compile_seconds', 'sample_seconds'}.

    Compilation is timed apart from sampling; NFE counts network evaluations per sample
    (guidance with a weight other than 0 and 1 evaluates the network twice per step).
    """
    calls = []
    model = dataclasses.replace(run.model, network=_CountingNetwork(run.model.network, calls))
    fn = jax.jit(lambda p, k: model.sample(p, k, spec), out_shardings=parallel.replicated(run.mesh))
    key = run.key(KeyStream.SAMPLE)
    t0 = time.perf_counter()
    compiled = fn.lower(params, key).compile()
    t1 = time.perf_counter()
    samples = jax.block_until_ready(compiled(params, key))
    t2 = time.perf_counter()
    jax.effects_barrier()
    samples = np.asarray(jax.device_get(samples))
    return samples, {"nfe": len(calls), "compile_seconds": t1 - t0, "sample_seconds": t2 - t1}


def quality(run: Run, net: FeatureNet, reference: dict, samples, spec: SamplerSpec) -> dict:
    """FID, KID (mean, std) and, for guided samples of a class-conditional model scored by a
    classifier, the fraction classified as the class they were drawn for."""
    node = run.config.sample.metrics
    feats, pred = net.embed(samples)
    kid, kid_std = frechet.kid(
        feats, reference["features"], subsets=node.kid_subsets, subset_size=node.kid_subset_size
    )
    out = {"fid": frechet.fid(feats, reference["features"]), "kid": kid, "kid_std": kid_std}
    labels = run.model.sample_labels(spec)
    guided = labels is not None and spec.guidance != 0.0  # w = 0 ignores the label
    out["class_accuracy"] = float(np.mean(pred == labels)) if guided and pred is not None else None
    return out


def sample_record(run: Run, workdir, state, step: int, write_samples) -> dict:
    """Draws the samples with metrics and appends their record to sample_metrics.jsonl.

    Args:
      run: the Run; config.sample says how to sample, config.sample.metrics how to score.
      workdir: the run directory.
      state: the restored train state.
      step: its step.
      write_samples: samples -> None, writes the grid and the .npy (as without metrics).

    Returns:
      The record.
    """
    net = build_features(run, workdir)  # first: a missing weights file fails before sampling
    reference = reference_stats(run, workdir, net)
    spec = run.sampler
    samples, timing = timed_samples(run, run.eval_params(state), spec)
    write_samples(samples)
    record = {
        "step": int(step),
        "sampler": spec.sampler,
        "steps": int(spec.steps),
        "options": dict(spec.options),
        "guidance": float(spec.guidance),
        "label": int(spec.label),
        "num_samples": int(len(samples)),
        "nfe": timing["nfe"],
        "sample_seconds": round(timing["sample_seconds"], 4),
        "compile_seconds": round(timing["compile_seconds"], 4),
        "features": net.name,
        "features_fingerprint": net.fingerprint,
        **net.details,
        "reference_split": reference["split"],
        "reference_num": reference["num"],
        **quality(run, net, reference, samples, spec),
        "seed": run.seed,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if jax.process_index() == 0:
        with (epath.Path(workdir) / RECORDS_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"{net.name} FID {record['fid']:.3f}, KID {record['kid']:.4f} +- "
            f"{record['kid_std']:.4f} ({len(samples)} samples vs {reference['num']} "
            f"{reference['split']} images), NFE {record['nfe']}, "
            f"{record['sample_seconds']:.2f} s sampling; appended to "
            f"{epath.Path(workdir) / RECORDS_FILE}"
        )
    return record


def write_reference_stats(run: Run, workdir) -> dict:
    """`--mode=reference_stats`: trains/loads the feature network, caches the reference
    features, prints where they are (and the classifier's own test accuracy)."""
    net = build_features(run, workdir)
    ref = reference_stats(run, workdir, net)
    if jax.process_index() == 0:
        print(f"Feature network {net.name} ({net.fingerprint}): {json.dumps(net.details)}")
        print(f"Reference statistics of {ref['num']} {ref['split']} images: {ref['path']}")
    return ref
