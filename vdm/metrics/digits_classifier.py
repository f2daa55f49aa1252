"""A small digits classifier whose penultimate features stand in for Inception on 8x8 digits.

Inception-v3 needs downloaded weights and 299x299 inputs; the embedded digits default needs a
feature network that needs neither. This MLP (64 -> hidden -> features -> 10, ReLU) is trained
full-batch with Adam from a fixed seed, so training is a pure function of (data, options): the
same parameters, bit for bit, on every call on one machine. Its ReLU features (the layer
before the logits) give an FID/KID on digits; its predicted classes give the class accuracy
of class-conditional samples.

Inputs are integer codes in [0, vocab) (what the data and the samplers produce), read as
code / (vocab - 1) in [0, 1], so data with fewer grey levels (data.num_bits) maps to the same
range. Pure math: no config, no files (vdm/run/sample_metrics.py caches the parameters).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class DigitsMLP(nn.Module):
    """MLP classifier; `features` returns the penultimate ReLU layer."""

    hidden: int = 128
    features: int = 64
    num_classes: int = 10

    def setup(self):
        self.dense1 = nn.Dense(self.hidden)
        self.dense2 = nn.Dense(self.features)
        self.head = nn.Dense(self.num_classes)

    def embed(self, x):
        h = nn.relu(self.dense1(x.reshape(x.shape[0], -1)))
        return nn.relu(self.dense2(h))

    def __call__(self, x):
        return self.head(self.embed(x))


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How the classifier is trained (every field changes the parameters).

    Attributes:
      hidden, features: layer widths (features = the feature dimension d).
      steps: full-batch Adam steps.
      learning_rate: Adam's step size.
      weight_decay: decoupled weight decay (AdamW), a little regularisation for 1,500 images.
      seed: the initialisation seed.
    """

    hidden: int = 128
    features: int = 64
    steps: int = 400
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    seed: int = 0


def to_inputs(codes, vocab_size: int) -> jnp.ndarray:
    """Integer codes [N, 8, 8, 1] in [0, vocab) -> float inputs in [0, 1]."""
    return jnp.asarray(codes, jnp.float32) / float(vocab_size - 1)


def train(x, labels, vocab_size: int, options: TrainOptions = TrainOptions()) -> dict:
    """Trains the classifier on codes x [N, 8, 8, 1] with labels [N]; returns its params.

    Full-batch, fixed seed, a fixed number of steps in one jitted scan: deterministic.
    """
    net = DigitsMLP(options.hidden, options.features)
    inputs = to_inputs(x, vocab_size)
    y = jnp.asarray(labels, jnp.int32)
    params = net.init(jax.random.key(options.seed), inputs[:1])["params"]
    opt = optax.adamw(options.learning_rate, weight_decay=options.weight_decay)

    def loss(p):
        logits = net.apply({"params": p}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, _):
        p, s = carry
        grads = jax.grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=options.steps))
    (params, _), _ = run(params)
    return jax.device_get(params)


def _net(params) -> DigitsMLP:
    return DigitsMLP(params["dense1"]["kernel"].shape[1], params["dense2"]["kernel"].shape[1])


@jax.jit
def _embed_and_logits(params, inputs):
    net = _net(params)
    feats = net.apply({"params": params}, inputs, method=DigitsMLP.embed)
    return feats, net.apply({"params": params}, inputs)


def features_and_predictions(params, codes, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features [N, d] float64, predicted classes [N]) of codes [N, 8, 8, 1]."""
    feats, logits = _embed_and_logits(params, to_inputs(codes, vocab_size))
    return np.asarray(feats, np.float64), np.asarray(jnp.argmax(logits, -1))


def accuracy(params, codes, labels, vocab_size: int) -> float:
    """Fraction of codes whose predicted class is their label."""
    _, pred = features_and_predictions(params, codes, vocab_size)
    return float(np.mean(pred == np.asarray(labels)))
