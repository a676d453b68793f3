"""core.work.estimate_work against counts done by hand from the formula in its docstring."""

from __future__ import annotations

from core.spec import JobSpec
from core.work import DATASET_SIZES, estimate_work


def spec(**kw) -> JobSpec:
    return JobSpec.model_validate(kw)


def test_single_car_job_by_hand():
    s = spec(
        pruning={
            "method": "car",
            "pretrain_epochs": 2,
            "search_epochs": 3,
            "finetune_epochs": 1,
            "augment_q": 100,
        },
        certification={"n": 10, "l": 4, "samples": 5},
    )
    n = 1000 + 100  # n_train + q
    pretrain = 2 * 2 * n  # 2 epochs x (forward + backward) x N
    search = 3 * 8 * n  # 4 forwards + 4 backwards per sample per epoch
    finetune = 1 * 2 * n
    evaluation = 200  # one forward per test image
    certify = 5 * (4 * 10 + 1)  # l n transformed forwards + the clean one, per sample
    assert estimate_work(s, n_train=1000, n_test=200) == pretrain + search + finetune + evaluation + certify


def test_sweep_shares_pretraining_and_counts_adversarial_steps():
    s = spec(
        pruning={
            "pretrain_epochs": 1,
            "search_epochs": 1,
            "finetune_epochs": 1,
            "augment_q": 0,
            "adv_steps": 3,
        },
        sweep_methods=["vanilla", "hydra", "advtrain+lmp"],
        sweep_prune_ratios=[0.5, 0.7],
        certification={"n": 2, "l": 1, "samples": 1},
    )
    n, p = 100, 3
    shared = 1 * 2 * n  # once, for vanilla and hydra
    vanilla = 0
    hydra = (1 + 1) * 2 * n * (p + 2)  # search + fine-tune, TRADES
    adv_lmp = 1 * 2 * n * (p + 1) + 1 * 2 * n * (p + 1)  # own adversarial pretraining + fine-tune
    per_variant = 10 + 1 * (1 * 2 + 1)
    variants = 1 + 2 + 2  # vanilla once (no ratio), hydra and advtrain+lmp at two ratios
    expected = shared + vanilla + 2 * hydra + 2 * adv_lmp + variants * per_variant
    assert estimate_work(s, n_train=100, n_test=10) == expected


def test_user_weights_skip_pretraining_and_train_subset_caps_the_data():
    s = spec(
        model={"weights": "artifact:abc"},
        pruning={"method": "lmp", "pretrain_epochs": 50, "finetune_epochs": 2, "augment_q": 0},
        certification={"n": 1, "l": 1, "samples": 1},
        train_subset=30,
    )
    assert estimate_work(s, n_train=1000, n_test=0) == 2 * 2 * 30


def test_certify_job_is_certification_only_and_samples_are_capped_by_the_test_set():
    s = spec(
        kind="certify", model={"weights": "artifact:abc"}, certification={"n": 100, "l": 10, "samples": 500}
    )
    assert estimate_work(s, n_train=10**6, n_test=50) == 50 + 50 * (10 * 100 + 1)


def test_named_dataset_sizes_are_the_real_ones():
    from core.data import load_dataset

    d = load_dataset("digits")
    assert DATASET_SIZES["digits"] == (len(d.train_y), len(d.test_y))
    assert estimate_work(spec(dataset="digits")) == estimate_work(
        spec(dataset="digits"), *DATASET_SIZES["digits"]
    )
