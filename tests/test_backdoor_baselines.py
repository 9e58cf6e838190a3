"""Neural Cleanse and fine-pruning baselines on the digits LeNet-5 BadNet (the cached model shared
with tests/test_backdoor.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, RATIO, TARGET

from iotbed.attacks.backdoor import Trigger, backdoor_metrics, train_badnet
from iotbed.data import load_splits
from iotbed.defenses.fine_pruning import channel_activations, fine_prune
from iotbed.defenses.neural_cleanse import MAD_CONSISTENCY, NeuralCleanseConfig, mad_outliers, reverse_engineer, unlearn
from iotbed.models import get_or_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mad_uses_numpy_median_and_flags_only_small_outliers() -> None:
    norms = np.array([10.0, 50.0, 52.0, 54.0, 56.0, 58.0, 60.0, 200.0])
    index, flagged, med, mad = mad_outliers(norms)
    # Even count: numpy's median averages the two middle values (54 + 56) / 2 = 55, where
    # torch.median would take the lower one, 54.
    assert med == 55.0 != float(torch.median(torch.tensor(norms)))
    assert mad == pytest.approx(MAD_CONSISTENCY * np.median(np.abs(norms - 55.0)))
    assert index[0] == pytest.approx(45.0 / mad)
    # 200 is an outlier too, but a LARGE trigger is no sign of a backdoor: only class 0 is flagged.
    assert index[-1] > 2
    assert flagged == [0]


@pytest.fixture(scope="module")
def scene():  # type: ignore[no-untyped-def]
    splits = load_splits("digits")
    trig = Trigger.patch(splits.train.image_shape, size=4)
    bad = train_badnet("lenet5", splits.train, trig, TARGET, RATIO, FAST)
    gen = torch.Generator().manual_seed(1)
    clean_idx = (~bad.poison.poisoned_mask).nonzero().flatten()
    valid = splits.train.subset(clean_idx[torch.randperm(len(clean_idx), generator=gen)][:300])
    before = backdoor_metrics(bad.model, splits.test, trig, TARGET)
    assert before.attack_success_rate >= 0.95
    return {"splits": splits, "trigger": trig, "bad": bad.model, "valid": valid, "before": before}


def test_neural_cleanse_flags_the_target_class_and_unlearning_removes_the_backdoor(scene) -> None:  # type: ignore[no-untyped-def]
    result = reverse_engineer(scene["bad"], scene["valid"].images, 10, NeuralCleanseConfig(epochs=8))
    assert result.flagged == (TARGET,)
    assert result.anomaly_index[TARGET] > 2
    assert int(result.l1_norms.argmin()) == TARGET
    # The reversed trigger is a real trigger for this model: it sends clean inputs to the target.
    rev = result.triggers[TARGET]
    assert rev.alpha == 1.0 and rev.mask.shape == (1, 32, 32)
    assert float(result.final_asr[TARGET]) >= 0.99

    repaired = unlearn(scene["bad"], scene["valid"], result)
    after = backdoor_metrics(repaired, scene["splits"].test, scene["trigger"], TARGET)
    assert after.attack_success_rate <= 0.2
    assert after.clean_accuracy >= scene["before"].clean_accuracy - 0.05


def test_neural_cleanse_flags_nothing_on_the_clean_model(scene) -> None:  # type: ignore[no-untyped-def]
    clean = get_or_train("lenet5", scene["splits"].train, FAST, progress=False).model
    result = reverse_engineer(clean, scene["valid"].images[:150], 10, NeuralCleanseConfig(epochs=8))
    assert TARGET not in result.flagged
    # Nothing flagged -> unlearning has nothing to do and returns an unchanged copy.
    if not result.flagged:
        same = unlearn(clean, scene["valid"], result)
        pairs = zip(same.state_dict().values(), clean.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_fine_pruning_lowers_asr_and_keeps_pruned_channels_dead(scene) -> None:  # type: ignore[no-untyped-def]
    result = fine_prune(scene["bad"], scene["valid"], max_accuracy_drop=0.05)
    assert 0 < len(result.pruned_channels) < result.n_channels
    assert result.base_accuracy - result.pruned_accuracy <= 0.05
    # Pruned channels stay exactly zero through fine-tuning.
    acts = channel_activations(result.model, scene["valid"].images)
    assert torch.all(acts[list(result.pruned_channels)] == 0)
    conv = [m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert torch.all(conv.weight[list(result.pruned_channels)] == 0)
    after = backdoor_metrics(result.model, scene["splits"].test, scene["trigger"], TARGET)
    assert after.attack_success_rate <= scene["before"].attack_success_rate - 0.2
    assert after.clean_accuracy >= scene["before"].clean_accuracy - 0.05
    # The BadNet is untouched.
    assert backdoor_metrics(scene["bad"], scene["splits"].test, scene["trigger"], TARGET) == scene["before"]
