"""How much work a job asks for, from its spec alone: `estimate_work(spec, n_train, n_test)`.

The unit is one *sample pass*: one forward or one backward pass of one image through the model
(a training step on a batch of B images costs 2 B: B forwards and B backwards). The architecture
is not weighted: the cap this feeds (store.settings.max_job_work) bounds what a spec asks for
(epochs x samples x repetitions), which is where hostile or mistaken specs grow without limit.

Formula, with N = n_train + q (the training set plus the q = augment_q transformed samples every
method trains on), P = adv_steps and S = min(samples, n_test):

    training epoch, cross-entropy            2 N
    training epoch, adversarial (advtrain)   2 N (P + 1)     P PGD steps + the step itself
    training epoch, TRADES (HYDRA)           2 N (P + 2)     P PGD steps + clean and adversarial
    CAR mask-search epoch                    8 N             4 forwards (C_m, noisy C_m, C*, T(x)),
                                                             a backward through each
    certification                            S (l n + 1)     l n transformed forwards + the clean one
    test-set evaluation                      n_test          forwards, once per variant

kind=prune, per variant (spec.variants()): pretraining (pretrain_epochs; skipped with
model.weights; shared once by vanilla / lmp / hydra / car, adversarial and per variant for
advtrain and advtrain+lmp), then the method's search_epochs (hydra: TRADES, car: CAR search) and
finetune_epochs (lmp / car: cross-entropy, hydra: TRADES, advtrain+lmp: adversarial), then
evaluation and certification. kind=certify: evaluation and certification only.
"""

from __future__ import annotations

from core.methods import method_info
from core.spec import JobSpec, PruningSpec

# (n_train, n_test) of the named datasets; any other dataset (npz / imagefolder / artifact) is
# assumed Fashion-MNIST-sized unless train_subset caps it: the API does not open the data to count
DATASET_SIZES = {"digits": (1438, 359), "fashion-mnist": (60_000, 10_000)}
ASSUMED_SIZE = (60_000, 10_000)
CAR_SEARCH_PASSES = 8


def _epoch_passes(loss: str, n: int, adv_steps: int) -> int:
    """Sample passes of one training epoch over n samples with loss 'ce' | 'adv' | 'trades'."""
    per_sample = {"ce": 2, "adv": 2 * (adv_steps + 1), "trades": 2 * (adv_steps + 2)}[loss]
    return per_sample * n


def _variant_work(v: PruningSpec, n: int, own_pretrain: bool) -> int:
    """Training work of one variant after any shared pretraining (module docstring)."""
    adv = method_info(v.method).adversarial
    work = 0
    if own_pretrain:
        work += v.pretrain_epochs * _epoch_passes("adv" if adv else "ce", n, v.adv_steps)
    if v.method == "hydra":
        work += (v.search_epochs + v.finetune_epochs) * _epoch_passes("trades", n, v.adv_steps)
    elif v.method == "car":
        work += v.search_epochs * CAR_SEARCH_PASSES * n + v.finetune_epochs * _epoch_passes("ce", n, 0)
    elif v.method == "lmp":
        work += v.finetune_epochs * _epoch_passes("ce", n, 0)
    elif v.method == "advtrain+lmp":
        work += v.finetune_epochs * _epoch_passes("adv", n, v.adv_steps)
    return work


def dataset_size(ref: str) -> tuple[int, int]:
    """(n_train, n_test) used for the estimate of a job on dataset reference `ref`."""
    return DATASET_SIZES.get(ref.split(":", 1)[0], ASSUMED_SIZE)


def shared_pretrain_work(spec: JobSpec, n_train: int | None = None) -> int:
    """Sample passes of the shared pretraining alone (0 for certify jobs and with model.weights)."""
    if spec.kind == "certify" or spec.model.weights is not None:
        return 0
    if not any(method_info(v.method).shares_pretraining for v in spec.variants()):
        return 0
    n_train = dataset_size(spec.dataset)[0] if n_train is None else n_train
    if spec.train_subset is not None:
        n_train = min(n_train, spec.train_subset)
    return spec.pruning.pretrain_epochs * _epoch_passes("ce", n_train + spec.pruning.augment_q, 0)


def shared_fraction(spec: JobSpec) -> float:
    """The shared pretraining's share of the job's work (progress of a job spread over workers)."""
    total = estimate_work(spec)
    return shared_pretrain_work(spec) / total if total else 0.0


def estimate_work(spec: JobSpec, n_train: int | None = None, n_test: int | None = None) -> int:
    """Sample passes (forward or backward of one image) the job performs on a dataset with
    n_train training and n_test test images (default: dataset_size(spec.dataset)); train_subset,
    when set, caps n_train."""
    default_train, default_test = dataset_size(spec.dataset)
    n_train = default_train if n_train is None else n_train
    n_test = default_test if n_test is None else n_test
    if spec.train_subset is not None:
        n_train = min(n_train, spec.train_subset)
    c = spec.certification
    per_variant_eval = n_test + min(c.samples, n_test) * (c.l * c.n + 1)
    if spec.kind == "certify":
        return per_variant_eval
    n = n_train + spec.pruning.augment_q
    variants = spec.variants()
    user_weights = spec.model.weights is not None
    work = shared_pretrain_work(spec, n_train)
    for v in variants:
        own = not user_weights and not method_info(v.method).shares_pretraining
        work += _variant_work(v, n, own) + per_variant_eval
    return work
