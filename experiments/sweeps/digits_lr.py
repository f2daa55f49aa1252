"""Learning rate x depth on the digits default: 6 runs of 1,000 steps, about 3 minutes each on
2 CPU cores (no samples drawn, two evaluations a run).

  python -m experiments.sweep print experiments/sweeps/digits_lr.py --base=runs/lr
  python -m experiments.sweep run experiments/sweeps/digits_lr.py --base=runs/lr
  python -m experiments.sweep collect --base=runs/lr
"""

CONFIG = "configs/digits.py"
FIXED = {"train.num_steps": 1000, "train.eval_every": 500, "train.write_samples": False}
PRODUCT = {"optim.learning_rate": [2e-3, 1e-3, 3e-4], "model.n_layers": [2, 4]}
