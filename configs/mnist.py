"""MNIST (28x28, 256 grey levels) with a mid-sized VDM U-Net.

  python -m vdm.main --config=configs/mnist.py --workdir=runs/mnist

Not a paper result; a quick image benchmark between the digits default and CIFAR-10. Prepare
the data with `tfds build mnist --data_dir=DIR` where there is internet.
"""

from vdm.config_defaults import base_config, finalize


def get_config(arg=None):
    """MNIST config; `arg` is unused."""
    del arg
    c = base_config()
    c.data.name = "mnist"
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.model.n_embd = 64
    c.model.n_layers = 8
    c.model.norm_groups = 16
    c.optim.learning_rate = 5e-4
    c.optim.ema_rate = 0.999
    c.train.num_steps = 200_000
    c.train.log_every = 500
    c.train.eval_every = 10_000
    c.train.ckpt_every = 5_000
    return finalize(c)
