"""Membership inference: the metrics against scikit-learn, the seeded partition, an overfit target both attacks
catch, a null control they do not, every architecture, and `iotbed probe membership` end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from iotbed.analysis.membership import (
    MembershipResult,
    advantage_at,
    best_advantage,
    draw_partition,
    evaluate_membership,
    max_eval_size,
    null_auc_se,
    output_dir,
    roc_auc,
)
from iotbed.cli import main
from iotbed.data import load_splits
from iotbed.data.dataset import DatasetSplits, ImageDataset
from iotbed.models import ARCHITECTURES, TrainConfig, default_train_config, spec_for_dataset, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Overfit on purpose: 100 images, 80 epochs, no augmentation (train accuracy 1.0, test ~0.85).
OVERFIT = TrainConfig(epochs=80, batch_size=32, lr=2e-3, lr_schedule="cosine")
N_TARGET = 100


# --- metrics ------------------------------------------------------------------------------------------------


def test_metrics_on_a_case_checked_by_hand() -> None:
    members, non_members = [0.9, 0.8, 0.4], [0.7, 0.3, 0.2]
    # Member-over-non-member pairs: 0.9 and 0.8 beat all three, 0.4 beats two: 8 of 9.
    assert roc_auc(members, non_members) == pytest.approx(8 / 9)
    # Threshold 0.5: members 0.9, 0.8 (TPR 2/3), non-members 0.7 (FPR 1/3).
    assert advantage_at(members, non_members, 0.5) == pytest.approx((1 / 3, 2 / 3, 1 / 3))
    # Best: threshold 0.8 (TPR 2/3, FPR 0) or 0.4 (TPR 1, FPR 1/3), both 2/3; the higher one is returned.
    assert best_advantage(members, non_members) == pytest.approx((2 / 3, 0.8))
    # Ties count one half: pairs (1,1) (1,0) (1,1) (1,0) -> (0.5 + 1 + 0.5 + 1) / 4.
    assert roc_auc([1.0, 1.0], [1.0, 0.0]) == pytest.approx(0.75)
    assert best_advantage([1.0, 1.0], [1.0, 0.0]) == pytest.approx((0.5, 1.0))
    # Members scoring lower than everyone: no threshold beats calling nobody a member.
    assert roc_auc([0.0, 0.1], [0.5, 0.6]) == 0.0
    assert best_advantage([0.0, 0.1], [0.5, 0.6]) == (0.0, math.inf)
    with pytest.raises(ValueError, match="at least one"):
        roc_auc([], [0.1])


@pytest.mark.parametrize(("m", "n", "shift", "decimals"), [(50, 50, 0.5, 1), (300, 120, 0.2, 2), (7, 400, 1.0, 6)])
def test_metrics_agree_with_scikit_learn(m: int, n: int, shift: float, decimals: int) -> None:
    rng = np.random.default_rng(m + n)
    # Rounding makes ties, within and across the two groups.
    members = np.round(rng.normal(shift, 1.0, m), decimals)
    non_members = np.round(rng.normal(0.0, 1.0, n), decimals)
    y = np.r_[np.ones(m), np.zeros(n)]
    scores = np.r_[members, non_members]
    assert roc_auc(members, non_members) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    best, threshold = best_advantage(members, non_members)
    assert best == pytest.approx(max(0.0, float(np.max(tpr - fpr))), abs=1e-12)
    assert advantage_at(members, non_members, threshold)[0] == pytest.approx(best, abs=1e-12)
    for t, tp, fp in zip(thresholds[1:], tpr[1:], fpr[1:], strict=True):  # [0] is sklearn's +inf
        assert advantage_at(members, non_members, t) == pytest.approx((tp - fp, tp, fp), abs=1e-12)


def test_null_auc_se_matches_the_permutation_spread() -> None:
    rng = np.random.default_rng(0)
    m, n, draws = 40, 60, 4000
    ranks = rankdata(rng.normal(size=m + n))
    aucs = [(rng.permutation(ranks)[:m].sum() - m * (m + 1) / 2) / (m * n) for _ in range(draws)]
    # The sample SD of 4000 draws is within ~2.2% (1 SE) of the true one; allow 10%.
    assert np.std(aucs) == pytest.approx(null_auc_se(m, n), rel=0.1)
    assert np.mean(aucs) == pytest.approx(0.5, abs=0.01)


# --- partition ----------------------------------------------------------------------------------------------


def test_partition_keeps_evaluation_and_attacker_data_apart_and_follows_the_seed() -> None:
    n_train, n_test = 1437, 360
    assert max_eval_size(n_train, n_test) == 180
    part = draw_partition(n_train, n_test, n_eval=180, shadows=3, seed=0)
    assert len(set(part.members)) == 180 and 0 <= part.members.min() and part.members.max() < n_train
    pool = set(part.attacker_pool)
    assert len(pool) == 180 and len(set(part.non_members)) == 180
    assert not pool & set(part.non_members)  # non-members come from half B only
    assert pool | set(part.non_members) == set(range(n_test))
    for shadow_in, shadow_out in zip(part.shadow_in, part.shadow_out, strict=True):
        assert len(shadow_in) == len(shadow_out) == 90
        assert set(shadow_in) | set(shadow_out) == pool and not set(shadow_in) & set(shadow_out)
    assert len({tuple(s) for s in part.shadow_in}) == 3 and len(set(part.shadow_seeds)) == 3

    again = draw_partition(n_train, n_test, n_eval=180, shadows=3, seed=0)
    assert again.digest() == part.digest()
    assert all(np.array_equal(a, b) for a, b in zip(again.shadow_in, part.shadow_in, strict=True))
    other = draw_partition(n_train, n_test, n_eval=180, shadows=3, seed=1)
    assert other.digest() != part.digest()
    assert not np.array_equal(other.members, part.members)
    assert not np.array_equal(other.attacker_pool, part.attacker_pool)
    assert not np.array_equal(other.shadow_in[0], part.shadow_in[0])
    assert other.shadow_seeds != part.shadow_seeds and other.classifier_seed != part.classifier_seed


# --- real models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_splits("digits", seed=0)


@pytest.fixture(scope="module")
def overfit(digits: DatasetSplits, one_torch_thread: None) -> tuple[torch.nn.Module, ImageDataset, ImageDataset]:
    """LeNet-5 overfit on 100 digits images; returns it, its training images and the images it never saw."""
    order = np.random.default_rng(0).permutation(len(digits.train))
    seen = digits.train.subset(np.sort(order[:N_TARGET]))
    unseen = digits.train.subset(np.sort(order[N_TARGET:]))
    model = spec_for_dataset("lenet5", seen).build()
    train_model(model, seen, OVERFIT, progress=False)
    return model, seen, unseen


def test_an_overfit_target_leaks_membership(
    overfit: tuple[torch.nn.Module, ImageDataset, ImageDataset], digits: DatasetSplits
) -> None:
    model, seen, _ = overfit
    result = evaluate_membership(model, "lenet5", OVERFIT, seen, digits.test, shadows=2, seed=0, progress=False)
    assert result.target_train_accuracy == 1.0 and result.target_test_accuracy < 0.95
    loss, shadow = result.loss_attack, result.shadow_attack
    assert loss.n_members == loss.n_non_members == N_TARGET and result.shadow_train_size == 90
    # Measured over 13 draws of the 100-image subset and the attack seed: loss AUC 0.63-0.74 (mean 0.68, SD 0.025),
    # shadow AUC 0.59-0.74 (0.675, SD 0.039), advantages 0.16-0.35 and 0.18-0.40 (0.28, SD 0.05-0.06); this draw
    # gives 0.684, 0.668, 0.22, 0.21. Each bound is about 3 SD below its mean; AUC 0.6 is 2.4 null SDs (0.041) above 0.5.
    assert loss.auc > 0.6 and shadow.auc > 0.57
    assert loss.advantage > 0.12 and shadow.advantage > 0.08
    assert loss.best_advantage >= loss.advantage and shadow.best_advantage >= shadow.advantage
    # Yeom's threshold is the mean loss over the whole training split, in score units (minus the loss).
    assert loss.threshold == pytest.approx(-result.mean_train_loss)


def test_non_members_posing_as_members_give_chance(
    overfit: tuple[torch.nn.Module, ImageDataset, ImageDataset], digits: DatasetSplits
) -> None:
    """Null control: the same overfit model, but the "members" are images it never saw, drawn with the
    non-members from one shuffled pool, so the two groups are exchangeable and any AUC away from 0.5 is noise."""
    model, _, unseen = overfit
    images = torch.cat([unseen.images, digits.test.images])
    labels = torch.cat([unseen.labels, digits.test.labels])
    order = torch.from_numpy(np.random.default_rng(1).permutation(len(labels)))
    pool = ImageDataset("digits", images[order], labels[order], digits.test.classes, "sklearn")
    half = len(pool) // 2
    fake_train, fake_test = pool.subset(range(half)), pool.subset(range(half, len(pool)))
    result = evaluate_membership(model, "lenet5", OVERFIT, fake_train, fake_test, shadows=1, seed=0, progress=False)
    n = result.loss_attack.n_members
    assert n == 425
    for attack in (result.loss_attack, result.shadow_attack):
        # 3 SD of the AUC's permutation distribution (0.020 here); measured over 8 draws: within 1.7 SD. The
        # overfit target's real members sit near 0.68, 9 of these SDs away.
        assert abs(attack.auc - 0.5) < 3 * attack.null_auc_se, attack
    # TPR - FPR at a fixed threshold: two binomial rates, SD at most sqrt(0.25 * 2 / n) = 0.034.
    assert abs(result.loss_attack.advantage) < 3 * math.sqrt(0.5 / n)


def test_same_seed_same_result_and_other_seeds_other_partitions(
    overfit: tuple[torch.nn.Module, ImageDataset, ImageDataset], digits: DatasetSplits
) -> None:
    model, seen, _ = overfit
    quick = dataclasses.replace(OVERFIT, epochs=5)

    def run(seed: int) -> MembershipResult:
        return evaluate_membership(
            model, "lenet5", quick, seen, digits.test, shadows=2, n_eval=50, seed=seed, progress=False
        )

    first, second, other = run(3), run(3), run(4)
    assert json.dumps(first.to_dict()) == json.dumps(second.to_dict())
    assert other.partition_digest != first.partition_digest
    assert other.members != first.members and other.non_members != first.non_members


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture(arch: str, digits: DatasetSplits) -> None:
    train, test = digits.train.subset(range(64)), digits.test.subset(range(40))
    config = dataclasses.replace(default_train_config(arch, "digits"), epochs=1)
    model = spec_for_dataset(arch, train).build()
    train_model(model, train, config, progress=False)
    result = evaluate_membership(model, arch, config, train, test, shadows=1, seed=0, progress=False)
    assert result.arch == arch and result.shadow_train_size == 10 and result.loss_attack.n_members == 20
    for attack in (result.loss_attack, result.shadow_attack):
        assert 0.0 <= attack.auc <= 1.0 and -1.0 <= attack.advantage <= 1.0
    json.dumps(result.to_dict())  # JSON-ready: no numpy scalars, no infinities


def test_bad_arguments_are_refused(overfit: tuple[torch.nn.Module, ImageDataset, ImageDataset]) -> None:
    model, seen, unseen = overfit
    from iotbed.errors import UsageError

    with pytest.raises(UsageError, match="shadows must be"):
        evaluate_membership(model, "lenet5", OVERFIT, seen, unseen, shadows=0)
    with pytest.raises(UsageError, match="n_eval must be between 1 and 100"):
        evaluate_membership(model, "lenet5", OVERFIT, seen, unseen, n_eval=101)
    with pytest.raises(UsageError, match="the model is a 'lenet5' but arch is 'tutorial_net'"):
        evaluate_membership(model, "tutorial_net", OVERFIT, seen, unseen)


# --- the command --------------------------------------------------------------------------------------------


def test_cli_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    args = ["probe", "membership", "--dataset", "digits", "--arch", "lenet5", "--shadows", "1"]
    result = CliRunner().invoke(main, [*args, "--eval-size", "60", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "membership.json").read_text())
    assert data["dataset"] == "digits" and data["arch"] == "lenet5" and data["shadows"] == 1
    assert data["loss_attack"]["n_members"] == data["shadow_attack"]["n_non_members"] == 60
    assert data["shadow_train_size"] == 90 and data["target_train_size"] == 1437
    loss_auc = data["loss_attack"]["auc"]
    assert f"{loss_auc:.4f}" in result.stdout and "loss threshold" in result.stdout
    markdown = (out / "membership.md").read_text()
    assert "| attack | AUC |" in markdown and f"{loss_auc:.4f}" in markdown and "upper bound" in markdown
    # A second run into the same folder needs --force.
    again = CliRunner().invoke(main, [*args, "--eval-size", "60", "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--shadows", "0"], "--shadows 0: the shadow attack needs at least one shadow model"),
        (["--eval-size", "1000"], "--eval-size 1000: at most 180 with these splits"),
        (["--eval-size", "0"], "--eval-size 0: give a number of members"),
        (["--arch", "lenet"], "--arch: unknown architecture 'lenet'. Did you mean 'lenet5'?"),
        (["--dataset", "digitz"], "--dataset digitz: unknown dataset 'digitz'. Did you mean 'digits'?"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(tmp_path: Path, option: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["probe", "membership", *option, "--out", str(tmp_path / "x"), "--quiet"])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_default_output_folder_is_under_runs(tmp_path: Path) -> None:
    path = output_dir(None, "digits", "lenet5")
    assert path.parent == Path("runs") and path.name.startswith("membership-digits-lenet5-")
    (tmp_path / "old.json").write_text("{}")
    assert output_dir(tmp_path, "digits", "lenet5", force=True) == tmp_path
