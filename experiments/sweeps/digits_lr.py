"""Learning rate x depth on the digits default, 1,000 steps each (about 3 minutes a run on 2
CPU cores). python experiments/sweep.py run experiments/sweeps/digits_lr.py --base=runs/lr"""

CONFIG = "configs/digits.py"
FIXED = {"train.num_steps": 1000, "train.eval_every": 500, "train.write_samples": False}
PRODUCT = {"optim.learning_rate": [2e-3, 1e-3, 3e-4], "model.n_layers": [2, 4]}
