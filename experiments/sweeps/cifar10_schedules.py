"""The paper's noise-schedule comparison on CIFAR-10: fixed linear vs learned linear vs learned
network, the network trained with the variance-minimising schedule gradient. ZIP pairs each
schedule with its gradient rule, so this is three runs, not a 3 x 2 grid.

  python -m experiments.sweep run experiments/sweeps/cifar10_schedules.py --base=runs/schedules

CIFAR-10 is read from ~/tensorflow_datasets unless FIXED below gets "data.data_dir": "DIR".

200k steps of the full CIFAR-10 net each: 4e18 FLOP, about 7.5 hours a run on one H100-class
GPU at the throughput assumed in experiments/reproduce/README.md.
"""

CONFIG = "configs/cifar10.py"
FIXED = {"train.num_steps": 200_000}
ZIP = {
    "schedule.type": ["fixed_linear", "learned_linear", "learned_net"],
    "schedule.grad": ["elbo", "elbo", "variance"],
}
