"""One-time conversion of the standard FID Inception weights into vdm's .npz layout.

The FID features are those of the 2015 TF Inception graph; pytorch-fid ships them as a
PyTorch state dict, `pt_inception-2015-12-05-6726825d.pth`, whose layer names are the ones
vdm/metrics/inception.py uses. Run this once on a machine with internet access and PyTorch
(`pip install torch`), then copy the .npz wherever the runs are:

  # fetch pytorch-fid's release file and convert it (--download is the only network access):
  python -m experiments.convert_inception --download --out=inception_fid.npz
  # or convert a .pth you already have:
  python -m experiments.convert_inception --torch_weights=pt_inception-2015-12-05-6726825d.pth \
      --out=inception_fid.npz

Then pass `--config.sample.metrics.features=inception
--config.sample.metrics.inception.weights=inception_fid.npz`. Nothing in the library or the
tests runs this script or downloads anything; tests use random weights.

The mapping (`torch_to_flax`): `X.conv.weight` [O, I, kh, kw] -> `params/X/conv/kernel`
[kh, kw, I, O]; `X.bn.weight`, `X.bn.bias` -> `params/X/bn/scale`, `params/X/bn/bias`;
`X.bn.running_mean`, `X.bn.running_var` -> `batch_stats/X/bn/mean`, `batch_stats/X/bn/var`
(X a dotted path such as Mixed_5b.branch1x1 written with '/'). The classifier head (`fc.*`),
`AuxLogits.*` and `num_batches_tracked` are dropped: the FID features end at pool3.
"""

import os
import tempfile
import urllib.request

import numpy as np
from absl import app, flags

PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def torch_to_flax(state: dict) -> dict[str, np.ndarray]:
    """A pytorch-fid Inception state dict (name -> numpy array) -> vdm's flat npz arrays."""
    out = {}
    for name, value in state.items():
        parts = name.split(".")
        if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
            continue
        layer, kind, leaf = "/".join(parts[:-2]), parts[-2], parts[-1]
        value = np.asarray(value, np.float32)
        if kind == "conv" and leaf == "weight":
            out[f"params/{layer}/conv/kernel"] = value.transpose(2, 3, 1, 0)
        elif kind == "bn" and leaf in BN_LEAVES:
            collection, new = BN_LEAVES[leaf]
            out[f"{collection}/{layer}/bn/{new}"] = value
        else:
            raise ValueError(f"unexpected array {name!r} {value.shape} in the state dict")
    return out


def load_torch_state(path: str) -> dict:
    try:
        import torch
    except ImportError as err:
        raise SystemExit("reading a .pth needs PyTorch: pip install torch") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


FLAGS = flags.FLAGS


def define_flags():
    """The script's flags; defined only when it runs (tests import torch_to_flax beside other
    experiments that define flags of the same names)."""
    flags.DEFINE_string("torch_weights", None, "pytorch-fid's pt_inception-2015-12-05 .pth.")
    flags.DEFINE_bool("download", False, f"Fetch the .pth from {PYTORCH_FID_URL} first.")
    flags.DEFINE_string("out", "inception_fid.npz", "The .npz to write.")


def main(argv):
    del argv
    from vdm.metrics.features import check_inception_arrays

    path = FLAGS.torch_weights
    if FLAGS.download:
        path = os.path.join(tempfile.mkdtemp(), os.path.basename(PYTORCH_FID_URL))
        print(f"Downloading {PYTORCH_FID_URL}")
        urllib.request.urlretrieve(PYTORCH_FID_URL, path)
    if not path:
        raise app.UsageError("pass --torch_weights=FILE.pth or --download")
    arrays = torch_to_flax(load_torch_state(path))
    check_inception_arrays(arrays, FLAGS.out)  # every array present, every shape right
    np.savez(FLAGS.out, **arrays)
    print(f"Wrote {len(arrays)} arrays to {FLAGS.out}; use "
          f"--config.sample.metrics.inception.weights={FLAGS.out}")  # fmt: skip


if __name__ == "__main__":
    define_flags()
    app.run(main)
