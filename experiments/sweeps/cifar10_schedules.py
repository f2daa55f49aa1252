"""The paper's schedule comparison on CIFAR-10: fixed vs learned linear vs learned network, each
with its matching schedule gradient (ELBO, or the variance-minimising one for the network)."""

CONFIG = "configs/cifar10.py"
FIXED = {"train.num_steps": 200_000}
ZIP = {
    "schedule.type": ["fixed_linear", "learned_linear", "learned_net"],
    "schedule.grad": ["elbo", "elbo", "variance"],
}
