"""Job specification: the one contract shared by the CLI, core.pipeline and the REST API.

Every default here is the METHOD.md default unless the comment says why it differs.
The API uses these models directly as request bodies, so validation errors here become
422 problem+json there; keep every bound (ge/gt/le/lt) explicit.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from core.bounds import DEFAULT_BETA
from core.methods import METHODS, prunes

Arch = Literal["small_cnn", "resnet18", "mobilenet_v2", "googlenet"]
Method = Literal[METHODS]  # core.methods.REGISTRY
Scope = Literal["layer", "global"]
BoundOrder = Literal["conservative", "reference"]
Bound = Literal["cccert", "binomial"]
Precision = Literal["fp32", "bf16"]  # core.fastforward.PRECISIONS


def _path_ref(value: str) -> str:
    """A path reference (server path, 'artifact:ID', 'npz:PATH', ...) must be text the OS can
    take as a path: no NUL byte (os functions raise 'embedded null byte') and no other control
    character (they only ever arrive by mistake or from a fuzzer)."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"must not contain control characters (found {bad!r})")
    return value


# Every field of the spec that names a file or dataset: validated once, here.
PathRef = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_path_ref)]

SEARCH_BN_RECALIBRATE_FROM = 0.8  # CarSpec.search_bn "auto": recalibrate from this prune ratio up

# Job labels {key: value}: keys like Kubernetes label names (letters, digits, '.', '_', '-', '/';
# no ':' since `GET /jobs?label=k:v` splits there), values any printable text.
MAX_LABELS = 20
LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
MAX_LABEL_VALUE = 200


def _labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, val in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise ValueError(
                f"label key {key[:80]!r}: 1..63 letters, digits, '.', '_', '-' or '/', "
                "starting and ending with a letter or digit"
            )
        if len(val) > MAX_LABEL_VALUE:
            raise ValueError(f"label {key!r}: value longer than {MAX_LABEL_VALUE} characters")
        _path_ref(val)
    return value


def _webhook_url(value: str) -> str:
    """An absolute http(s) URL with a host and no control characters or spaces (the address the
    host resolves to is checked by the service, which refuses private ones)."""
    _path_ref(value)
    if " " in value:
        raise ValueError("must not contain spaces")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as exc:
        raise ValueError(f"invalid port: {exc}") from None
    return value


JobName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_path_ref)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]


class _Strict(BaseModel):
    # allow_inf_nan=False: every float is finite (NaN / Infinity literals and overflowing numbers
    # such as 1e999, which JSON parsers turn into inf, are 422 naming the field)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WebhookSpec(_Strict):
    """Completion webhook: on every terminal status the service POSTs a JSON event to `url`,
    signed `X-Carcert-Signature: sha256=<hex HMAC-SHA256 of the body>` (CARCERT_WEBHOOK_SECRET)."""

    url: Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(_webhook_url)] = Field(
        description="http(s) URL; private, loopback and link-local addresses are refused unless the "
        "host is in CARCERT_WEBHOOK_ALLOWED_HOSTS"
    )


JOB_EXAMPLE: dict[str, object] = {
    "name": "digits-car-0.5",
    "labels": {"team": "vision"},
    "dataset": "digits",
    "transform": {"kind": "parametric", "name": "rotation", "strength": 1.0},
    "pruning": {"method": "car", "prune_ratio": 0.5},
    "certification": {"n": 100, "l": 10, "epsilon": 0.001, "samples": 100},
}


class ModelSpec(_Strict):
    arch: Arch = Field(default="small_cnn", description="built-in architecture (ignored with `program`)")
    num_classes: int | None = Field(default=None, ge=2, le=100_000, description="default: the dataset's")
    in_channels: int | None = Field(default=None, ge=1, le=16, description="default: the dataset's")
    weights: PathRef | None = Field(
        default=None,
        description="path (CLI) or 'artifact:ID' (API) of safetensors / weights_only torch checkpoint; "
        "None = train from scratch",
    )
    program: str | None = Field(
        default=None,
        max_length=1000,
        description="path (CLI) or 'artifact:ID' (API, kind 'model') of a torch.export .pt2 program of "
        "any network: it replaces arch, its weights are the trained weights (or `weights`, a "
        "safetensors of its state dict); core.program",
    )


class TransformSpec(_Strict):
    """T(x, delta). kind=parametric: name in core.transforms.PARAMETRIC ('brightness', 'gamma',
    'illumination', ... or 'a+b' for a composition). kind=latent: PCA generator fitted on the
    training set, direction = principal component `component`, or user encoder/decoder
    artifacts. kind=precomputed: the dataset ships variants."""

    kind: Literal["parametric", "latent", "precomputed"] = Field(
        default="parametric",
        description="parametric: a built-in image transform; latent: a direction in a generator's latent "
        "space; precomputed: variants shipped with the dataset",
    )
    name: str = Field(
        default="illumination",
        max_length=200,
        description="parametric transform (brightness, contrast, gamma, illumination, blur, rotation, "
        "translation, scale) or a composition 'a+b'",
    )
    component: int = Field(
        default=0, ge=0, le=1000, description="latent: the principal direction used (0: first)"
    )
    strength: float = Field(
        default=1.0,
        gt=0,
        le=100,
        description="size of the perturbation: scales the transform's documented range at delta = 1 "
        "(e.g. rotation 2 = twice the angle); not a probability (that is certification.epsilon)",
    )
    encoder: PathRef | None = Field(default=None, description="latent: your torch.export encoder (.pt2)")
    decoder: PathRef | None = Field(default=None, description="latent: your torch.export decoder (.pt2)")


class CarSpec(_Strict):
    """Eq. 9 weights and mask-search hyper-parameters (METHOD.md, CAR). The defaults are the
    configuration that won the controlled experiments (bench/RESULTS.md, "CAR: the decisive
    experiment"): L_ratio under the hard mask C*, on the rows C* classifies correctly, r capped at 10,
    a cross-entropy anchor under C*, Adam at 0.001. The paper's Eq. 9 alone is lambda_ce 0,
    ratio_mask soft, ratio_rows all, ratio_cap None (it collapses to a constant network)."""

    tau: float = Field(
        default=0.30,
        ge=0.0,
        le=1.0,
        description="mask init: the top tau fraction of |weights| per layer start at 1",
    )
    tau_cap: bool = Field(
        default=True,
        description="use min(tau, 1 - prune_ratio): the init's plateau of entries at 1 never holds "
        "more than the mask keeps (at prune ratio 0.9 and tau 0.3 the search otherwise picks the kept "
        "10 % among 30 % tied entries by its first steps' noise)",
    )
    init: Literal["partial_scaled", "random"] = Field(
        default="partial_scaled", description="mask init: magnitude-scaled (partial_scaled) or random"
    )
    noise: float = Field(default=0.5, ge=0.0, le=1.0, description="delta_n: noise on the masks for L_stab")
    eta: float = Field(
        default=1.0, ge=0.0, description="L_ratio margin: penalise Z / (d + eps) above eta (Eq. 7)"
    )
    lambda_stab: float = Field(
        default=1.0, ge=0.0, description="Eq. 9 weight of L_stab (stability across noisy masks)"
    )
    lambda_ratio: float = Field(default=1.0, ge=0.0, description="Eq. 9 weight of L_ratio (margin ratio)")
    lambda_consis: float = Field(
        default=1.0, ge=0.0, description="Eq. 9 weight of L_consis (KL soft vs hard mask)"
    )
    lambda_l1: float = Field(
        default=1.0, ge=0.0, description="Eq. 9 weight of the L1 term on the mask scores"
    )
    mask_lr: float = Field(
        default=0.001,
        gt=0.0,
        le=10.0,
        description="mask-search learning rate (0.01 drifts the mask by noise)",
    )
    mask_optimizer: Literal["adam", "sgd"] = Field(
        default="adam", description="optimiser of the mask scores (sgd: momentum 0.9)"
    )
    ratio_mask: Literal["soft", "hard"] = Field(
        default="hard",
        description="mask under which L_ratio is evaluated: the noisy soft mask C_m or the hard C*",
    )
    search_bn: Literal["auto", "frozen", "batch", "recalibrate"] = Field(
        default="auto",
        description="BatchNorm in the mask search: the pretrained running statistics (frozen), each "
        "masked network's own batch statistics over x and T(x) together (batch), running statistics "
        "re-estimated under the current hard mask C* every bn_every steps (recalibrate), or auto: "
        f"recalibrate from prune ratio {SEARCH_BN_RECALIBRATE_FROM:g} up, frozen below (what won each side, "
        "bench/RESULTS.md)",
    )
    bn_every: int = Field(
        default=10,
        ge=1,
        description="search_bn recalibrate: steps between two re-estimations (and at every epoch start)",
    )
    lambda_ce: float = Field(
        default=1.0,
        ge=0.0,
        description="extension of the paper: weight of a task anchor, cross-entropy of the hard-mask "
        "network C* on the labels (Alg. 1 line 3 writes L_CAR(theta, m, x, y)); 0 = Eq. 9 as published",
    )
    ratio_rows: Literal["all", "correct"] = Field(
        default="correct",
        description="rows that feed L_ratio: every original row, or only those the network L_ratio is "
        "evaluated under classifies correctly (certification never counts a misclassified sample)",
    )
    ratio_cap: float | None = Field(
        default=10.0, gt=0.0, description="cap on r = Z / (d + eps) before Eq. 7 (None: uncapped)"
    )
    project: bool = Field(
        default=True, description="project the scores onto [0, 1] after every step (False: unclamped scores)"
    )
    balance: bool = Field(
        default=False,
        description="rescale each active lambda so that every term's gradient norm at init equals the "
        "geometric mean of the norms (reported in the search's `term_grad_norms`)",
    )
    checkpoint: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="activation checkpointing of the search's forward passes (same gradients, the "
        "memory of one pass instead of all; auto: on for inputs of at least 64 x 64 pixels)",
    )
    control: Literal["none", "random_sign"] = Field(
        default="none",
        description="diagnostic control: random_sign replaces each step's gradient by the same "
        "magnitudes with random signs (a search that cannot beat it carries no signal)",
    )

    @classmethod
    def published(cls, **overrides: object) -> CarSpec:
        """Eq. 9 exactly as the paper states it, with METHOD.md's first settings: no anchor, L_ratio
        under the noisy soft mask on every row, uncapped, Adam at 0.01 (what the product ran before
        the controlled experiments; it collapses to a constant network). `overrides` on top."""
        return cls(**{**PUBLISHED_CAR, **overrides})


PUBLISHED_CAR: dict[str, object] = {
    "tau_cap": False,
    "lambda_ce": 0.0,
    "ratio_mask": "soft",
    "ratio_rows": "all",
    "ratio_cap": None,
    "mask_lr": 0.01,
}


class PruningSpec(_Strict):
    method: Method = Field(
        default="car", description="car, lmp (magnitude), hydra, vanilla (no pruning), advtrain, ..."
    )
    prune_ratio: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="fraction of prunable weights set to 0"
    )
    scope: Scope = Field(
        default="layer", description="the ratio per layer (layer) or over all layers at once (global)"
    )
    pretrain_epochs: int = Field(default=2, ge=0, le=1000, description="paper 50; skipped with weights")
    search_epochs: int = Field(default=2, ge=0, le=1000, description="CAR/HYDRA mask search; paper 100")
    finetune_epochs: int = Field(default=1, ge=0, le=1000, description="paper 50")
    lr: float = Field(default=0.01, gt=0.0, le=10.0, description="pretraining learning rate (SGD)")
    finetune_lr: float = Field(default=0.001, gt=0.0, le=10.0, description="fine-tuning learning rate")
    batch_size: int = Field(default=128, ge=1, le=8192, description="training batch size")
    augment_q: int = Field(
        default=1000, ge=0, le=10_000_000, description="transformed samples T(x, 1) added to the training set"
    )
    adv_eps: float = Field(
        default=0.5,
        ge=0.0,
        le=100.0,
        description="advtrain / hydra: L2 radius of the PGD attack on the inputs",
    )
    adv_steps: int = Field(default=10, ge=1, le=1000, description="advtrain / hydra: PGD steps")
    amp: bool = Field(
        default=False,
        description="bf16 autocast for the training forward passes (CUDA, or CPUs with bf16); "
        "certification always runs in float32 with the bound in float64",
    )
    car: CarSpec = Field(default=CarSpec(), description="CAR mask-search settings (method car)")

    @model_validator(mode="after")
    def _ratio_needs_pruning(self) -> PruningSpec:
        if prunes(self.method) and not 0.0 < self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in (0, 1) for method {self.method!r}")
        return self


class CertifySpec(_Strict):
    """CC-Cert parameters (METHOD.md, Appendix A.4)."""

    n: int = Field(default=100, ge=1, le=1_000_000, description="sampled transformations per repeat")
    l: int = Field(default=10, ge=1, le=10_000, description="repeats (N = n * l draws per sample)")  # noqa: E741
    alpha: float = Field(default=0.9, gt=0.0, lt=1.0, description="CC-Cert confidence parameter (Eq. 13-14)")
    epsilon: float = Field(
        default=1e-3,
        gt=0.0,
        lt=1.0,
        description="a probability: a sample is certified when its bound on P(a random transformation "
        "changes the prediction) is <= epsilon; not a perturbation size (that is transform.strength)",
    )
    samples: int = Field(
        default=100, ge=1, le=1_000_000, description="test samples to certify (the first ones)"
    )
    t_min: float = Field(default=1e-4, gt=0.0, description="smallest t of the Chernoff bound's log grid")
    t_max: float = Field(default=1e4, gt=0.0, description="largest t of the grid")
    t_steps: int = Field(default=500, ge=1, le=100_000, description="points of the t grid")
    bound_order: BoundOrder = Field(
        default="conservative",
        description="conservative: min over t of max over repeats (holds Eq. 14); reference: the public "
        "CC-Cert code's max over repeats of min over t",
    )
    bound: Bound = Field(
        default="cccert",
        description="cccert: the paper's Eq. 13-14 (for reproduction); binomial: one-sided Clopper-Pearson "
        "upper limit on P(Z >= d) at failure probability beta (core.bounds)",
    )
    failure_probability: float = Field(
        default=DEFAULT_BETA,
        gt=0.0,
        lt=1.0,
        description="beta of the binomial bound (cccert: Eq. 14 instead)",
    )
    early_stop: bool = Field(
        default=False, description="stop sampling a sample once its decision cannot change (exact)"
    )
    batch_size: int = Field(default=500, ge=1, le=100_000, description="forward-pass batch")
    shards: int | None = Field(
        default=None, ge=1, le=64,
        description="split the samples into this many shards run by separate workers (same certificate "
        "bytes whatever the count); unset: one shard per ~2M forward passes (core.shards)",
    )
    precision: Precision = Field(
        default="fp32",
        description="fp32: the model as trained; bf16: the model as deployed in bf16 (bf16 autocast around "
        "every forward; the certificate records it and `carcert verify --recompute` reruns it so)",
    )

    @model_validator(mode="after")
    def _grid(self) -> CertifySpec:
        if self.t_max < self.t_min:
            raise ValueError("t_max must be >= t_min")
        return self


class PreprocessSpec(_Strict):
    """Input preprocessing (core.preprocess): resize (shorter side to `resize` px, bilinear,
    antialiased) then center crop (`crop` x `crop`, default: resize) when the data is read; channel
    normalisation (x - mean) / std inside the model, after the semantic transformation T (T acts on
    raw [0, 1] images). mean / std: one value per channel, or one for all."""

    resize: int | None = Field(
        default=None, ge=1, le=4096, description="shorter image side in pixels after resizing (data side)"
    )
    crop: int | None = Field(
        default=None, ge=1, le=4096, description="center crop side in pixels (default: resize)"
    )
    mean: list[float] | None = Field(
        default=None, min_length=1, max_length=16, description="channel means subtracted inside the model"
    )
    std: list[float] | None = Field(
        default=None, min_length=1, max_length=16, description="channel stds divided inside the model"
    )

    @model_validator(mode="after")
    def _pairs(self) -> PreprocessSpec:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std need as many values")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("every std must be > 0")
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise ValueError("crop must be <= resize")
        return self


class JobSpec(_Strict):
    """One job. kind=prune: prune (each method x prune ratio of a sweep) then certify each
    result. kind=certify: certify the given weights (+ optional mask) only."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    kind: Literal["prune", "certify"] = Field(
        default="prune", description="prune (then certify each result) or certify given weights only"
    )
    model: ModelSpec = Field(default=ModelSpec(), description="the network: built-in arch or your .pt2")
    dataset: PathRef = Field(
        default="digits",
        description="digits | fashion-mnist[:DIR] | imagefolder:PATH | imagefolder:s3://BUCKET/PREFIX | "
        "npz:PATH | artifact:ID",
    )
    transform: TransformSpec = Field(
        default=TransformSpec(), description="the semantic transformation T(x, delta)"
    )
    pruning: PruningSpec = Field(default=PruningSpec(), description="method, prune ratio and training")
    certification: CertifySpec = Field(default=CertifySpec(), description="CC-Cert parameters")
    preprocess: PreprocessSpec = Field(
        default=PreprocessSpec(),
        description="resize / center crop (data side) and mean/std normalisation (model side, after T)",
    )
    mask: PathRef | None = Field(default=None, description="certify jobs: mask safetensors")
    sweep_methods: list[Method] | None = Field(
        default=None, max_length=10, description="sweep: several methods (each x every sweep ratio)"
    )
    sweep_prune_ratios: list[float] | None = Field(
        default=None, max_length=20, description="sweep: several prune ratios in (0, 1)"
    )
    train_subset: int | None = Field(default=None, ge=1, description="cap on training samples")
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="seed of training, of the sampled transformations and of the train-subset draw "
        "(never of the test split)",
    )
    name: JobName | None = Field(default=None, description="a name to find the job by (1..200 characters)")
    labels: Labels = Field(
        default_factory=dict,
        description=f"up to {MAX_LABELS} labels {{key: value}} (key: 1..63 of letters, digits, '.', '_', "
        f"'-', '/'; value: up to {MAX_LABEL_VALUE} characters); filter with GET /jobs?label=key:value",
    )
    webhook: WebhookSpec | None = Field(default=None, description="completion webhook (WebhookSpec)")

    @model_validator(mode="after")
    def _sweep(self) -> JobSpec:
        for r in self.sweep_prune_ratios or []:
            if not 0.0 < r < 1.0:
                raise ValueError("every sweep prune ratio must be in (0, 1)")
        if self.kind == "certify" and self.model.weights is None and self.model.program is None:
            raise ValueError("certify jobs need model.weights or model.program")
        return self

    def variants(self) -> list[PruningSpec]:
        """The (method, prune_ratio) runs of this job, in a fixed order."""
        methods = self.sweep_methods or [self.pruning.method]
        ratios = self.sweep_prune_ratios or [self.pruning.prune_ratio]
        out = []
        for m in methods:
            for r in ratios if prunes(m) else [0.0]:
                out.append(self.pruning.model_copy(update={"method": m, "prune_ratio": r}))
        return out
