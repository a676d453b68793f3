"""The two per-sample guarantees a certificate can carry, and when sampling can stop early.

Both bound the same quantity from the same evidence: q = P_{delta ~ U[0,1]}(Z >= d), with
Z = ||p(x) - p(T(x, delta))||_inf and d the clean margin (p1 - p2) / 2. Z < d implies the
prediction does not change (the label-invariance lemma), so q bounds the probability that a random
transformation changes the prediction.

``cccert`` (the paper's Eq. 13-14, core.certify.epsilon_bound): eps_hat = min_t max_j Y_j(t) / alpha.
Its failure probability (Eq. 14 with Cv ~ 1) assumes the Chernoff-Cramer estimate concentrates,
which fails at large t: on the default grid [1e-4, 1e4] eps_hat reduces to "no sampled Z reached d",
so a sample with q = 2 epsilon is certified with probability (1 - 2 epsilon)^(n l).

``binomial``: the one-sided Clopper-Pearson upper limit on q from the k draws with Z >= d among the
N = n l sampled transformations, at failure probability beta:

    U(k, N) = Beta.ppf(1 - beta; k + 1, N - k)   (k < N),   U(N, N) = 1.

P(q > U(k, N)) <= beta over the draws, for every q, with no assumption on the distribution of Z
(only that the N draws are independent and delta ~ U[0, 1] is the perturbation model). With k = 0,
U = 1 - beta^(1/N), so certifying at epsilon needs N >= ln(1/beta) / epsilon draws
(N = 6908 for epsilon = beta = 1e-3).

Exact early stopping (the decision of a stopped sample is that of the full run, see stop_reason):
- a misclassified sample is never certified: it needs no sampling at all;
- cccert: one sampled Z_ji >= d gives exp(t (Z_ji - d)) >= 1 for every t, so Y_j(t) >= 1/n for every
  t and both orders give eps_hat >= 1/(n alpha) (clipped at 1). If epsilon < 1/(n alpha) the sample
  cannot be certified any more. The float64 evaluation of log Y can fall below -log n by a few ulps
  of t d, so the rule is applied only when epsilon n alpha <= 1 - CCCERT_STOP_MARGIN;
- binomial: U(k, N) increases with k, so the decision is "certified iff k <= k_max" with
  k_max = max{k : U(k, N) <= epsilon} (-1 when even U(0, N) > epsilon). Sampling stops as soon as the
  failures seen exceed k_max, i.e. at the first k that keeps the upper bound above epsilon; with
  k_max = -1 nothing needs sampling at all.
"""

from __future__ import annotations

import math
from functools import lru_cache

from core.errors import InvalidInput

BOUNDS = ("cccert", "binomial")
DEFAULT_BETA = 1e-3  # the binomial bound's failure probability (CertifySpec.failure_probability)
CCCERT_STOP_MARGIN = 1e-9

GUARANTEES = {
    "cccert": {
        "statement": (
            "CC-Cert (Eq. 13-14): for a certified sample, eps_hat <= epsilon estimates the probability that "
            "a transformation T(x, delta) with delta ~ U[0, 1] moves the softmax output by at least the "
            "margin d (and so may change the prediction); the estimate is wrong with probability at most "
            "failure_probability (Eq. 14)."
        ),
        "assumptions": [
            "Eq. 14 assumes Cv ~ 1, which does not hold at large t: on a grid up to t = 1e4 the bound "
            "reduces to 'no sampled Z reached d', and a sample whose true failure probability is "
            "2 epsilon is certified with probability (1 - 2 epsilon)^(n l)",
            "delta ~ U[0, 1] is the perturbation model; the draws are independent (seeded generator)",
            "per sample, not simultaneously over all samples",
            "about the model that produced the evidence (carcert verify --recompute re-runs it)",
        ],
    },
    "binomial": {
        "statement": (
            "For each certified sample, with probability at least 1 - beta over the sampled "
            "transformations, the probability that a transformation T(x, delta) with delta ~ U[0, 1] moves "
            "the softmax output by at least the margin d (and so may change the prediction) is at most "
            "epsilon (one-sided Clopper-Pearson upper limit from the k draws with Z >= d among N = n l)."
        ),
        "assumptions": [
            "delta ~ U[0, 1] is the perturbation model; the N draws are independent (seeded generator)",
            "no assumption on the distribution of Z (distribution-free)",
            "per sample, not simultaneously over all samples",
            "about the model that produced the evidence (carcert verify --recompute re-runs it)",
        ],
    },
}


def check_bound(bound: str) -> str:
    if bound not in BOUNDS:
        raise InvalidInput(f"bound must be one of {BOUNDS}, got {bound!r}")
    return bound


def clopper_pearson_upper(k: int, draws: int, beta: float) -> float:
    """One-sided (1 - beta) Clopper-Pearson upper limit on a binomial proportion from k successes
    in `draws` trials: the q with P(Bin(draws, q) <= k) = beta; 1 when k == draws."""
    from scipy.stats import beta as beta_dist

    k, draws = int(k), int(draws)
    if draws < 1 or not 0 <= k <= draws:
        raise InvalidInput(f"need 0 <= k <= N and N >= 1, got k={k}, N={draws}")
    if k == draws:
        return 1.0
    return float(beta_dist.ppf(1.0 - float(beta), k + 1, draws - k))


@lru_cache(maxsize=256)
def binomial_k_max(draws: int, beta: float, epsilon: float) -> int:
    """The largest k with clopper_pearson_upper(k, draws, beta) <= epsilon (-1 if none): with the
    binomial bound a correct sample is certified iff its failures k <= this."""
    k = -1
    while k + 1 <= draws and clopper_pearson_upper(k + 1, draws, beta) <= epsilon:
        k += 1
    return k


def cccert_can_stop(n: int, alpha: float, epsilon: float) -> bool:
    """True when one sampled Z >= d already rules certification out (module docstring)."""
    return float(epsilon) * int(n) * float(alpha) <= 1.0 - CCCERT_STOP_MARGIN


def stop_reason(
    bound: str,
    *,
    correct: bool,
    failures: int,
    n: int,
    l: int,  # noqa: E741
    alpha: float,
    epsilon: float,
    beta: float,
) -> str | None:
    """Why sampling this sample may stop now without changing its decision, or None.
    `failures` = draws with Z >= d seen so far."""
    if not correct:
        return "misclassified"
    if bound == "cccert":
        if failures > 0 and cccert_can_stop(n, alpha, epsilon):
            return "a sampled Z reached d: eps_hat >= 1/(n alpha) > epsilon"
        return None
    k_max = binomial_k_max(int(n) * int(l), float(beta), float(epsilon))
    if failures > k_max:
        return f"{failures} draws with Z >= d > k_max = {k_max}: the upper bound stays above epsilon"
    return None


def draws_needed(epsilon: float, beta: float) -> int:
    """The smallest N with 1 - beta^(1/N) <= epsilon: draws needed to certify with k = 0."""
    n = math.ceil(math.log(1.0 / beta) / -math.log1p(-epsilon))
    while n > 1 and 1.0 - beta ** (1.0 / (n - 1)) <= epsilon:
        n -= 1
    while 1.0 - beta ** (1.0 / n) > epsilon:
        n += 1
    return n


__all__ = [
    "BOUNDS",
    "GUARANTEES",
    "binomial_k_max",
    "cccert_can_stop",
    "check_bound",
    "clopper_pearson_upper",
    "draws_needed",
    "stop_reason",
]
