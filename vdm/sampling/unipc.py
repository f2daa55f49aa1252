"""UniPC (Zhao et al. 2023): a multistep predictor-corrector in log-SNR, data-prediction form.

Like DPM-Solver++ (vdm/sampling/dpm_solver.py) it integrates the PF-ODE's exact linear part
and approximates only the data prediction x_hat in
  z_t = (sigma_t / sigma_s) z_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_hat dlambda,
lambda = -gamma / 2, by a polynomial through earlier steps' x_hat (the predictor, UniP).
The network is then evaluated at the predicted z_t, and that value, already needed for the
next step, is added to the polynomial as one more node to correct z_t (UniC): one order more
at no extra network evaluation. `steps` steps cost `steps` evaluations (the last step is not
corrected: its evaluation would have no next step to serve).

Coefficients: with h = lambda_t - lambda_s, earlier nodes r_k = (lambda_k - lambda_s) / h and
differences D_k = (x_hat_k - x_hat_s) / r_k, the weights a solve sum_k a_k r_k^(j-1) =
phi_(j+1)(h) j! / B(h) for j = 1..order (the phi functions of -h, as in the paper), with
B(h) = -h (variant bh1) or e^(-h) - 1 (bh2); the update is
  z_t = (sigma_t / sigma_s) z_s - alpha_t (e^(-h) - 1) x_hat_s - alpha_t B(h) sum_k a_k D_k.
The grid and guidance are DPM-Solver++'s (`dpm_solver.step_grid`, the EpsModel).
"""

import jax
import jax.numpy as jnp

from vdm.sampling.dpm_solver import _alpha_sigma, step_grid
from vdm.sampling.model import EpsModel
from vdm.sampling.registries import SAMPLERS
from vdm.sampling.sharded import constrain, normal

VARIANTS = ("bh1", "bh2")


def _right_hand_side(h, n: int, variant: str):
    """phi_(j+1)(-h) j! / B(h) for j = 1..n, and B(h)."""
    hh = -h
    b_h = hh if variant == "bh1" else jnp.expm1(hh)
    phi = jnp.expm1(hh) / hh - 1.0  # phi_2 in the paper's recursion
    rhs, factorial = [], 1
    for j in range(1, n + 1):
        rhs.append(phi * factorial / b_h)
        factorial *= j + 1
        phi = phi / hh - 1.0 / factorial
    return jnp.stack(rhs), b_h


def _weights(r, rhs):
    """Solves sum_k a_k r_k^(j-1) = rhs_j (a Vandermonde system in the nodes r) in closed form.

    a_m = sum_j [x^j] L_m(x) rhs_j, with L_m the Lagrange basis polynomial of node m: applying
    sum_k a_k r_k^j to it gives back rhs, since sum_k r_k^j L_k(x) = x^j. At most 3 nodes, so
    a few products; jnp.linalg.solve would add LAPACK calls to every step, and on CPU (jaxlib
    0.10.2) LU calls running at once (the predictor's and correctors' systems are independent)
    can deadlock XLA's thread pool.
    """
    n = r.shape[0]
    weights = []
    for m in range(n):
        coeffs, denom = [jnp.ones_like(r[m])], jnp.ones_like(r[m])
        for i in range(n):
            if i != m:
                # coeffs * (x - r_i), lowest power first.
                shifted = [jnp.zeros_like(r[i])] + coeffs
                scaled = [-r[i] * c for c in coeffs] + [jnp.zeros_like(r[i])]
                coeffs = [u + v for u, v in zip(shifted, scaled, strict=True)]
                denom = denom * (r[m] - r[i])
        weights.append(sum(c * rhs[j] for j, c in enumerate(coeffs)) / denom)
    return jnp.stack(weights)


def _unipc_step(z, xs, lams, lam_t, a_t, s_t, s_s, k: int, variant: str):
    """The order-k predictor from the current x_hat xs[0] and the k - 1 before it.

    Returns (the predicted z_t without its difference term, B(h), the weights and
    differences the corrector reuses)."""
    h = lam_t - lams[0]
    r = jnp.stack([(lams[i] - lams[0]) / h for i in range(1, k)] + [jnp.ones_like(h)])
    d = [(xs[i] - xs[0]) / r[i - 1] for i in range(1, k)]
    rhs, b_h = _right_hand_side(h, k, variant)
    base = (s_t / s_s) * z - a_t * jnp.expm1(-h) * xs[0]
    if k == 1:
        pred = base
    elif k == 2:
        pred = base - a_t * b_h * 0.5 * d[0]  # the paper's order-2 predictor weight
    else:
        a = _weights(r[:-1], rhs[:-1])
        pred = base - a_t * b_h * sum(a[i] * d[i] for i in range(k - 1))
    return pred, base, b_h, r, rhs, d


def _corrected(base, b_h, r, rhs, d, x_new, x_s, a_t, k: int):
    """UniC: the order-k polynomial through the earlier nodes and the new x_hat at r = 1."""
    a = jnp.full((1,), 0.5) if k == 1 else _weights(r, rhs)
    diff = a[-1] * (x_new - x_s) + sum(a[i] * d[i] for i in range(k - 1))
    return base - a_t * b_h * diff


@SAMPLERS.register("unipc")
def unipc(
    model: EpsModel,
    key,
    shape,
    steps: int,
    *,
    order: int = 2,
    variant: str = "bh2",
    spacing: str = "log_snr",
    rho: float = 7.0,
    lower_order_final: bool = True,
    batch_sharding=None,
):
    """UniPC multistep (predictor order 1-3, each step corrected) from z_1 ~ N(0, I); `steps`
    network evaluations; returns z_0.

    Args:
      model, key, shape, steps: as for every sampler.
      order: the predictor's order, 1, 2 or 3 (the corrector's is one more).
      variant: bh2 (B(h) = e^(-h) - 1) or bh1 (B(h) = -h). Zhao et al. suggest bh1 for
        unguided sampling at very few steps; on the Gaussian oracle (tests/sampling/
        test_log_snr_solvers.py) bh2 had a third of bh1's per-sample error at 20 steps of
        order 2 and the same at order 3, so bh2 is the default.
      spacing, rho: the grid (`dpm_solver.step_grid`: log_snr, t or edm).
      lower_order_final: drop to the order the remaining steps allow at the end.
      batch_sharding: optional sharding of the batch.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}.")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown UniPC variant {variant!r}; use one of {VARIANTS}.")
    t, g = step_grid(model, steps, spacing, rho)
    lam = -0.5 * g
    z = normal(key, shape, batch_sharding)

    def x_hat(z, i):
        a, s = _alpha_sigma(g[i])
        return constrain((z - s * model.eps(z, t[i])) / a, batch_sharding)

    def order_at(i):
        """The predictor's order at step i (traced or not): earlier nodes available, and with
        lower_order_final the steps left."""
        k = jnp.minimum(order, i + 1)
        return jnp.minimum(k, steps - i) if lower_order_final else k

    def predict(i, z, xs, lams):
        a_t, s_t = _alpha_sigma(g[i + 1])
        _, s_s = _alpha_sigma(g[i])
        outs = [
            _unipc_step(z, xs, lams, lam[i + 1], a_t, s_t, s_s, k, variant)
            for k in (1, 2, 3)[:order]
        ]
        return outs, a_t

    def select(values, k):
        """values[k - 1] for a traced k (every order is computed; one is kept)."""
        out = values[0]
        for j in range(1, len(values)):
            out = jnp.where(k == j + 1, values[j], out)
        return out

    def body(carry, i):
        z, xs, lams = carry  # x_hat at the current and earlier nodes, newest first
        outs, a_t = predict(i, z, xs, lams)
        k = order_at(i)
        pred = select([o[0] for o in outs], k)
        x_new = x_hat(pred, i + 1)  # the next step's x_hat, and this step's corrector node
        corr = select([_corrected(*o[1:], x_new, xs[0], a_t, j + 1) for j, o in enumerate(outs)], k)
        xs = (x_new, *xs[:-1])
        lams = (lam[i + 1], *lams[:-1])
        return (constrain(corr, batch_sharding), xs, lams), None

    x0 = x_hat(z, 0)
    # Earlier nodes that do not exist yet: never selected (the order grows with i); distinct
    # lambdas keep their unused Vandermonde systems regular.
    xs = (x0, *([x0] * (order - 1)))
    lams = (lam[0], *(lam[0] - jnp.arange(1, order, dtype=lam.dtype)))
    if steps > 1:
        (z, xs, lams), _ = jax.lax.scan(body, (z, xs, lams), jnp.arange(steps - 1))
    # The last step: predictor only.
    outs, _ = predict(steps - 1, z, xs, lams)
    return constrain(select([o[0] for o in outs], order_at(steps - 1)), batch_sharding)
