"""Low-dimensional data with a known density, an MLP denoiser, minutes on a CPU.

  python -m vdm.main --config=configs/toy.py:swirl --workdir=runs/swirl
  python -m vdm.main --config=configs/toy.py:mixture2d --workdir=runs/mixture
  python -m vdm.main --config=configs/toy.py:gaussian --workdir=runs/gaussian

Evaluation reports the data's true bits/dim next to the model's ELBO (eval/true_bpd and
eval/bpd_gap), so the gap says how good the model is in absolute terms. `:mixture2d` is
labelled: it trains class-conditional with label dropout, so samples can use classifier-free
guidance (--config.sample.guidance=W: 1, the default, is conditional, 0 unconditional).
"""

from vdm.config_defaults import base_config, finalize

DATASETS = ("swirl", "mixture2d", "gaussian")


def get_config(arg="swirl"):
    """Toy config; arg names the dataset (swirl, mixture2d or gaussian)."""
    arg = arg or "swirl"
    if arg not in DATASETS:
        raise ValueError(f"Unknown toy dataset {arg!r}; use one of {DATASETS}.")
    c = base_config()
    c.data.name = arg
    c.data.batch_size = 256
    c.data.eval_batch_size = 1000
    c.data[arg].num_train = 50_000  # the dataset's own options: config.data.<name>
    c.data[arg].num_eval = 10_000
    c.model.type = "mlp"
    c.model.n_embd = 256
    c.model.n_layers = 4
    c.model.dropout = 0.0
    c.model.num_classes = 8 if arg == "mixture2d" else 0
    c.schedule.type = "learned_net"
    # Its shape by the variance rule (the ELBO's gradient in the shape has zero mean).
    c.schedule.grad = "variance"
    c.optim.learning_rate = 1e-3
    c.optim.ema_rate = 0.999
    c.train.num_steps = 20_000
    c.train.log_every = 500
    c.train.eval_every = 5_000
    c.sample.num = 1000
    c.sample.steps = 500
    return finalize(c)
