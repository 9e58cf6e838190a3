"""Membership inference against the models iotbed serves: does a model's output reveal which images it was
trained on?

Encrypting the input (CKKS, `iotbed.privacy`) hides the frame from the edge server; it does not hide what the
model itself leaks to whoever reads its output. Two attacks measure that leak:

- **Loss threshold** (Yeom et al. 2018): score = -cross-entropy of (x, y) under the target. An image is called
  a member when its loss is at most the target's mean training loss, averaged over its *whole* training split
  (the attacker is assumed to know that number, as Yeom et al. assume).
- **Shadow models** (Shokri et al. 2017): the attacker holds data from the same distribution, disjoint from the
  target's training data, and knows the training recipe (architecture and `TrainConfig`). It trains `k` shadow
  models on random halves of its pool, labels their outputs on those halves "in" and on the other halves
  "out", and fits one attack classifier that tells the two apart; then it scores the target's outputs.

Partition (every draw from one seed): members are a sample of the target's training split; the test split is
split into two disjoint halves, A (the attacker's pool, `len(test) // 2` images) and B (the rest), and the
non-members are a sample of B of the same size as the members. Both attacks are scored on that one balanced
evaluation set.

Numbers: ROC AUC (0.5 = no leak, 1 = every member found) and membership advantage, TPR - FPR (Yeom et al.'s
measure; 0 = no leak), at the attack's own threshold, which is chosen without the evaluation labels. The
best advantage over all thresholds is reported too, as an upper bound: picking that threshold needs the labels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm

from iotbed.analysis.detection import auroc
from iotbed.data.dataset import ImageDataset
from iotbed.errors import ModelError, UsageError
from iotbed.models.architectures import resolve_arch
from iotbed.models.cache import spec_for_dataset
from iotbed.models.training import TrainConfig, check_input_shape, train_model

ATTACK_FEATURES = "log-softmax sorted in decreasing order, then the log-probability of the true label"
ATTACK_CLASSIFIER = "logistic regression on standardised features (scikit-learn), one model for all classes"


# ---------------------------------------------------------------------------------------------------------
# Metrics. Convention throughout: a higher score means "more likely a member", and an attack with threshold
# t calls an image a member when its score >= t.


def _scores(
    member_scores: Sequence[float] | np.ndarray, non_member_scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    non_members = np.asarray(non_member_scores, dtype=np.float64).ravel()
    if members.size == 0 or non_members.size == 0:
        raise ValueError("need at least one member score and one non-member score")
    if not (np.isfinite(members).all() and np.isfinite(non_members).all()):
        raise ValueError("membership scores must be finite")
    return members, non_members


def roc_auc(member_scores: Sequence[float] | np.ndarray, non_member_scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random member outscores a random non-member, ties
    counting one half (the Mann-Whitney U statistic over m * n)."""
    members, non_members = _scores(member_scores, non_member_scores)
    # detection.auroc is P(second < first): members as the first set, non-members as the second.
    return auroc(members, non_members)


def null_auc_se(n_members: int, n_non_members: int) -> float:
    """Standard deviation of the AUC when members and non-members are exchangeable (nothing leaks): the
    permutation distribution of Mann-Whitney U, sqrt((m + n + 1) / (12 m n)), ignoring ties."""
    m, n = n_members, n_non_members
    return math.sqrt((m + n + 1) / (12 * m * n))


def advantage_at(
    member_scores: Sequence[float] | np.ndarray, non_member_scores: Sequence[float] | np.ndarray, threshold: float
) -> tuple[float, float, float]:
    """(advantage, TPR, FPR) of calling score >= `threshold` a member; advantage = TPR - FPR."""
    members, non_members = _scores(member_scores, non_member_scores)
    tpr = float((members >= threshold).mean())
    fpr = float((non_members >= threshold).mean())
    return tpr - fpr, tpr, fpr


def best_advantage(
    member_scores: Sequence[float] | np.ndarray, non_member_scores: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(max over thresholds of TPR - FPR, the highest threshold reaching it): an upper bound on what an attacker
    who must pick its threshold without the labels can reach. The threshold +inf (nobody is a member) gives 0,
    so the result is never negative."""
    members, non_members = _scores(member_scores, non_member_scores)
    scores = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(members.size, np.int64), np.zeros(non_members.size, np.int64)])
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_pos = np.cumsum(is_member[order])
    false_pos = np.cumsum(1 - is_member[order])
    # Only the last position of each run of equal scores is a threshold every tied score passes.
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    # TPR - FPR times m * n, in integers: equal advantages compare equal, and argmax then picks the
    # highest threshold among them.
    gains = (true_pos * non_members.size - false_pos * members.size)[last_of_run]
    i = int(np.argmax(gains))
    if gains[i] <= 0:
        return 0.0, math.inf
    return float(gains[i]) / (members.size * non_members.size), float(sorted_scores[last_of_run][i])


@dataclass(frozen=True)
class AttackResult:
    """How well one attack tells members from non-members on the evaluation set."""

    attack: str
    auc: float
    advantage: float  # TPR - FPR at `threshold`, chosen without the evaluation labels
    threshold: float  # in the attack's score units
    tpr: float
    fpr: float
    best_advantage: float  # upper bound: the threshold picked knowing the labels
    best_threshold: float
    n_members: int
    n_non_members: int
    null_auc_se: float  # AUC's standard deviation when nothing leaks

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # JSON has no infinity; a best threshold of +inf means "no threshold beats calling nobody a member".
        if math.isinf(d["best_threshold"]):
            d["best_threshold"] = None
        return d


def score_attack(
    attack: str,
    member_scores: Sequence[float] | np.ndarray,
    non_member_scores: Sequence[float] | np.ndarray,
    threshold: float,
) -> AttackResult:
    """Every metric of an attack from its scores and the threshold it chose without the labels."""
    members, non_members = _scores(member_scores, non_member_scores)
    advantage, tpr, fpr = advantage_at(members, non_members, threshold)
    best, best_threshold = best_advantage(members, non_members)
    return AttackResult(
        attack=attack,
        auc=roc_auc(members, non_members),
        advantage=advantage,
        threshold=float(threshold),
        tpr=tpr,
        fpr=fpr,
        best_advantage=best,
        best_threshold=best_threshold,
        n_members=int(members.size),
        n_non_members=int(non_members.size),
        null_auc_se=null_auc_se(members.size, non_members.size),
    )


# ---------------------------------------------------------------------------------------------------------
# Model outputs.


def log_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Log-softmax of the model's logits, float64 (N, classes), in eval and inference mode, in batches.

    From the logits in float64 rather than from float32 softmax: members of an overfit model have
    probabilities that round to 1.0 in float32, which would tie all their losses at 0."""
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    check_input_shape(model, images)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                logits = model(images[start : start + batch_size].float())
                out.append(torch.log_softmax(logits.double(), dim=1))
    finally:
        model.train(was_training)
    lp = torch.cat(out) if out else torch.zeros((0, 0), dtype=torch.float64)
    if not bool(torch.isfinite(lp).all()):
        bad = int((~torch.isfinite(lp)).any(dim=1).sum())
        raise ModelError(f"the model's outputs are not finite on {bad} of {lp.shape[0]} images; it cannot be scored")
    return lp


def losses(model: nn.Module, ds: ImageDataset, batch_size: int = 512) -> np.ndarray:
    """Per-image cross-entropy loss of `model` on `ds` (float64, (N,))."""
    lp = log_probs(model, ds.images, batch_size)
    return -lp.gather(1, ds.labels.view(-1, 1)).squeeze(1).numpy()


def attack_features(lp: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Shadow-attack features of each image: its log-softmax sorted in decreasing order (how confident,
    whatever the class), then the log-probability of its true label (how right). Log-probabilities are a
    monotone transform of Shokri et al.'s softmax vector that keeps 0.999 apart from 0.99999."""
    sorted_lp = torch.sort(lp, dim=1, descending=True).values
    true_lp = lp.gather(1, labels.view(-1, 1))
    return torch.cat([sorted_lp, true_lp], dim=1).numpy()


# ---------------------------------------------------------------------------------------------------------
# The partition and the whole evaluation.


def max_eval_size(n_train: int, n_test: int) -> int:
    """The largest balanced evaluation set: members come from the train split, non-members from half B of
    the test split (the other half, A, is the attacker's pool)."""
    return max(0, min(n_train, n_test - n_test // 2))


@dataclass(frozen=True)
class Partition:
    """Positions of the evaluation set and the attacker's data, as drawn from one seed."""

    members: np.ndarray  # into the train split
    non_members: np.ndarray  # into the test split, inside half B
    attacker_pool: np.ndarray  # half A of the test split
    shadow_in: tuple[np.ndarray, ...]  # into the test split, inside A; one per shadow model
    shadow_out: tuple[np.ndarray, ...]
    shadow_seeds: tuple[int, ...]
    classifier_seed: int

    def digest(self) -> str:
        """sha256 over every position and seed: equal digests, equal partitions."""
        h = hashlib.sha256()
        for part in (self.members, self.non_members, self.attacker_pool, *self.shadow_in, *self.shadow_out):
            h.update(np.asarray(part, dtype="<i8").tobytes())
            h.update(b"|")
        h.update(np.asarray([*self.shadow_seeds, self.classifier_seed], dtype="<i8").tobytes())
        return h.hexdigest()


def draw_partition(n_train: int, n_test: int, *, n_eval: int, shadows: int, seed: int) -> Partition:
    """The seeded partition of `evaluate_membership` (see the module docstring). Positions are sorted."""
    members_rng, split_rng, shadow_rng, classifier_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    members = np.sort(members_rng.choice(n_train, size=n_eval, replace=False))
    order = split_rng.permutation(n_test)
    pool, half_b = order[: n_test // 2], order[n_test // 2 :]
    non_members = np.sort(split_rng.choice(half_b, size=n_eval, replace=False))
    half = pool.size // 2
    shadow_in, shadow_out, seeds = [], [], []
    for _ in range(shadows):
        shuffled = shadow_rng.permutation(pool)
        shadow_in.append(np.sort(shuffled[:half]))
        shadow_out.append(np.sort(shuffled[half : 2 * half]))
        seeds.append(int(shadow_rng.integers(0, 2**31)))
    return Partition(
        members=members,
        non_members=non_members,
        attacker_pool=np.sort(pool),
        shadow_in=tuple(shadow_in),
        shadow_out=tuple(shadow_out),
        shadow_seeds=tuple(seeds),
        classifier_seed=int(classifier_rng.integers(0, 2**31)),
    )


@dataclass(frozen=True)
class MembershipResult:
    """Both attacks against one target model, and what they were run on."""

    arch: str
    seed: int
    target_train_size: int
    target_test_size: int
    target_train_accuracy: float
    target_test_accuracy: float
    mean_train_loss: float  # Yeom's threshold: over the whole train split
    loss_attack: AttackResult
    shadow_attack: AttackResult
    shadows: int
    attacker_pool_size: int  # half A of the test split
    shadow_train_size: int  # images each shadow model trains on (half of A)
    shadow_train_accuracy: float  # mean over the shadow models, on their own training halves
    shadow_out_accuracy: float  # mean over the shadow models, on the halves they did not see
    train_config: TrainConfig  # the target's, which the shadow models follow with seeds of their own
    shadow_seeds: tuple[int, ...]
    attack_features: str
    attack_classifier: str
    members: tuple[int, ...]  # positions in the train split
    non_members: tuple[int, ...]  # positions in the test split
    partition_digest: str
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["loss_attack"] = self.loss_attack.to_dict()
        d["shadow_attack"] = self.shadow_attack.to_dict()
        d["train_config"] = self.train_config.to_dict()
        d["shadow_seeds"] = list(self.shadow_seeds)
        d["members"] = list(self.members)
        d["non_members"] = list(self.non_members)
        d["notes"] = list(self.notes)
        return d


@contextlib.contextmanager
def _bar(total: int, progress: bool) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc="shadow models", unit="model", file=sys.stderr, disable=not progress, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _accuracy(lp: torch.Tensor, labels: torch.Tensor) -> float:
    return float((lp.argmax(1) == labels).double().mean())


def evaluate_membership(
    model: nn.Module,
    arch: str,
    config: TrainConfig,
    train_split: ImageDataset,
    test_split: ImageDataset,
    *,
    shadows: int = 4,
    n_eval: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> MembershipResult:
    """Run the loss-threshold and the shadow-model attack against `model`, trained as `arch` with `config`
    on `train_split`; `test_split` is data it never saw, from the same distribution.

    The loss attack's threshold is the target's mean cross-entropy over all of `train_split` (in eval mode,
    without augmentation), the figure Yeom et al.'s attacker is assumed to know.

    `n_eval` members and as many non-members make the evaluation set (default and maximum:
    `max_eval_size(len(train_split), len(test_split))`). The `shadows` shadow models are built like the
    target (`arch`, normalisation fitted to their own data) and trained with `config` and a seed of their
    own on half of the attacker's pool each, so they see fewer images than the target did. `seed` draws the
    partition, the shadow halves, the shadow training seeds and the attack classifier's seed. Results are
    bit-identical for the same seed on the same torch build and thread count.
    """
    arch = resolve_arch(arch)
    model_arch = getattr(model, "arch", arch)
    if model_arch != arch:
        raise UsageError(f"the model is a {model_arch!r} but arch is {arch!r}; the shadow models must match the target")
    if isinstance(shadows, bool) or not isinstance(shadows, int) or shadows < 1:
        raise UsageError(f"shadows must be a whole number >= 1 (got {shadows!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a whole number >= 0 (got {seed!r})")
    n_train, n_test = len(train_split), len(test_split)
    if n_test < 4:
        raise UsageError(f"the test split has {n_test} images; membership inference needs at least 4")
    largest = max_eval_size(n_train, n_test)
    if n_eval is None:
        n_eval = largest
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or not 1 <= n_eval <= largest:
        raise UsageError(
            f"n_eval must be between 1 and {largest} here ({n_train} training images; half of the {n_test} "
            f"test images are non-members, the other half the attacker's pool); got {n_eval!r}"
        )
    if train_split.image_shape != test_split.image_shape:
        raise UsageError(
            f"train and test splits hold images of different shapes ({train_split.image_shape} and "
            f"{test_split.image_shape})"
        )

    part = draw_partition(n_train, n_test, n_eval=n_eval, shadows=shadows, seed=seed)

    # Loss threshold. The target's own outputs on its whole train split give Yeom's threshold.
    train_lp = log_probs(model, train_split.images)
    test_lp = log_probs(model, test_split.images)
    train_loss = -train_lp.gather(1, train_split.labels.view(-1, 1)).squeeze(1).numpy()
    test_loss = -test_lp.gather(1, test_split.labels.view(-1, 1)).squeeze(1).numpy()
    mean_train_loss = float(train_loss.mean())
    loss_attack = score_attack(
        "loss_threshold", -train_loss[part.members], -test_loss[part.non_members], -mean_train_loss
    )

    # Shadow models on the attacker's pool (half A of the test split).
    records: list[np.ndarray] = []
    record_labels: list[np.ndarray] = []
    in_acc, out_acc = [], []
    with _bar(shadows, progress) as bar:
        for in_pos, out_pos, shadow_seed in zip(part.shadow_in, part.shadow_out, part.shadow_seeds, strict=True):
            shadow_in, shadow_out = test_split.subset(in_pos), test_split.subset(out_pos)
            shadow = spec_for_dataset(arch, shadow_in).build()
            train_model(shadow, shadow_in, dataclasses.replace(config, seed=shadow_seed), progress=progress)
            for ds, label, acc in ((shadow_in, 1, in_acc), (shadow_out, 0, out_acc)):
                lp = log_probs(shadow, ds.images)
                records.append(attack_features(lp, ds.labels))
                record_labels.append(np.full(len(ds), label))
                acc.append(_accuracy(lp, ds.labels))
            bar.update(1)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=part.classifier_seed))
    classifier.fit(np.concatenate(records), np.concatenate(record_labels))
    member_features = attack_features(train_lp[part.members], train_split.labels[part.members])
    non_member_features = attack_features(test_lp[part.non_members], test_split.labels[part.non_members])
    shadow_attack = score_attack(
        "shadow_models",
        classifier.predict_proba(member_features)[:, 1],
        classifier.predict_proba(non_member_features)[:, 1],
        0.5,  # the classifier's own decision, fitted on balanced in/out records
    )

    shadow_size = int(part.shadow_in[0].size)
    notes = (
        f"each shadow model trains on {shadow_size} images (half of the attacker's pool of "
        f"{part.attacker_pool.size}), the target on {n_train}: the shadows fit their data differently from the "
        "target, which can weaken the shadow attack",
        "best_advantage picks its threshold knowing the evaluation labels: an upper bound, not an attack",
        "AUC 0.5 and advantage 0 mean no measurable leak; null_auc_se is the AUC's spread when nothing leaks",
    )
    return MembershipResult(
        arch=arch,
        seed=seed,
        target_train_size=n_train,
        target_test_size=n_test,
        target_train_accuracy=_accuracy(train_lp, train_split.labels),
        target_test_accuracy=_accuracy(test_lp, test_split.labels),
        mean_train_loss=mean_train_loss,
        loss_attack=loss_attack,
        shadow_attack=shadow_attack,
        shadows=shadows,
        attacker_pool_size=int(part.attacker_pool.size),
        shadow_train_size=shadow_size,
        shadow_train_accuracy=float(np.mean(in_acc)),
        shadow_out_accuracy=float(np.mean(out_acc)),
        train_config=config,
        shadow_seeds=part.shadow_seeds,
        attack_features=ATTACK_FEATURES,
        attack_classifier=ATTACK_CLASSIFIER,
        members=tuple(int(i) for i in part.members),
        non_members=tuple(int(i) for i in part.non_members),
        partition_digest=part.digest(),
        notes=notes,
    )


def to_markdown(result: MembershipResult, *, title: str = "Membership inference") -> str:
    """A short report: the table, what the numbers mean, and what the attacks were run on."""
    r = result
    rows = [
        ("loss threshold (Yeom et al. 2018)", r.loss_attack),
        ("shadow models (Shokri et al. 2017)", r.shadow_attack),
    ]
    lines = [
        f"# {title}",
        "",
        f"Target: `{r.arch}` trained on {r.target_train_size} images; accuracy {r.target_train_accuracy:.4f} on "
        f"them, {r.target_test_accuracy:.4f} on the {r.target_test_size} test images. Seed {r.seed}.",
        "",
        "| attack | AUC | advantage (TPR - FPR) | TPR / FPR | best advantage (upper bound) |",
        "|---|---|---|---|---|",
    ]
    for name, a in rows:
        lines.append(
            f"| {name} | {a.auc:.4f} | {a.advantage:.4f} | {a.tpr:.4f} / {a.fpr:.4f} | {a.best_advantage:.4f} |"
        )
    ev = r.loss_attack
    lines += [
        "",
        f"Evaluated on {ev.n_members} members (from the training split) and {ev.n_non_members} non-members (from "
        f"half of the test split). With nothing to leak the AUC would be 0.5 give or take {ev.null_auc_se:.4f} "
        "(one standard deviation) and the advantage 0.",
        "",
        "- **AUC**: the chance that the attack scores a random member above a random non-member.",
        "- **Advantage**: true-positive rate minus false-positive rate at the attack's own threshold, chosen "
        f"without the evaluation labels: the target's mean training loss ({r.mean_train_loss:.4g}, over its "
        "whole training split) for the loss attack, probability 0.5 for the shadow attack's classifier.",
        "- **Best advantage**: the largest TPR - FPR over all thresholds. Choosing it needs the labels, so it is an "
        "upper bound on the attack, not an attack.",
        "",
        f"Shadow attack: {r.shadows} shadow model(s) of the target's architecture and training config, each "
        f"trained on {r.shadow_train_size} images (half of the attacker's pool of {r.attacker_pool_size} test "
        f"images; the target trained on {r.target_train_size}). Their mean accuracy: {r.shadow_train_accuracy:.4f} "
        f"on their training halves, {r.shadow_out_accuracy:.4f} on the other halves. Features: "
        f"{r.attack_features}. Classifier: {r.attack_classifier}.",
        "",
        "Encrypting the input (CKKS) changes none of this: the attacks need only the model's outputs, which whoever "
        "decrypts the results (the camera, and anyone the results reach) reads in the clear.",
        "",
    ]
    return "\n".join(lines)


def output_dir(out_dir: str | Path | None, dataset: str, arch: str, *, force: bool = False) -> Path:
    """`out_dir`, or runs/membership-<dataset>-<arch>-<timestamp>/; refuses a folder that already holds files
    unless `force`. Nothing is created yet."""
    from iotbed.runner import results_folder

    return results_folder(out_dir, f"membership-{dataset}-{arch}", force, UsageError)


def write_results(out_dir: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """membership.json and membership.md in `out_dir`, each written beside its place and renamed, so an
    interrupted run leaves no half-written file."""
    from iotbed.runner import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / "membership.json", out_dir / "membership.md")
    texts = (json.dumps(payload, indent=2) + "\n", markdown)
    for path, text in zip(paths, texts, strict=True):
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))  # type: ignore[misc]
    return paths
