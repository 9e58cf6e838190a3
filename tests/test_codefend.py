"""CoDefend's edge side (iotbed.defenses.codefend): CycleGAN pieces, the device screen, and a real but
small end-to-end repair of the digits LeNet-5 BadNet (same cached model as tests/test_backdoor.py).

The end-to-end CycleGAN is shrunk to fit a test on two shared cores (ngf 8, 2 residual blocks,
120 + 120 images, batch 4, 2 + 2 epochs at lr 1e-3); everything else is the defaults.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, RATIO, TARGET

from iotbed.attacks.backdoor import Trigger, backdoor_metrics, train_badnet
from iotbed.data import load_splits
from iotbed.defenses.codefend import (
    CoDefendError,
    CycleGanConfig,
    ImagePool,
    PatchDiscriminator,
    ResnetGenerator,
    device_screen,
    edge_repair,
    select_clean_overlays,
    train_cyclegan,
)
from iotbed.models import predict

TINY_GAN = CycleGanConfig(ngf=8, n_blocks=2, ndf=16, batch_size=4, epochs=2, decay_epochs=2, lr=1e-3, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("channels", "side"), [(1, 28), (1, 32), (3, 32)])
def test_generator_and_discriminator_fit_small_images(channels: int, side: int) -> None:
    g = ResnetGenerator(channels, ngf=8, n_blocks=2)
    d = PatchDiscriminator(channels, ndf=8, n_layers=2)
    x = torch.rand(3, channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, patches = g(x), d(x)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # n_layers 2 on 28/32 px: a 5x5 / 6x6 map of patch verdicts, not one number.
    assert patches.shape == (3, 1, side // 4 - 2, side // 4 - 2)
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in g.modules())
    assert any(isinstance(m, torch.nn.ReflectionPad2d) for m in g.modules())


def test_cyclegan_rejects_unusable_inputs() -> None:
    with pytest.raises(CoDefendError, match="multiples of 4"):
        train_cyclegan(torch.rand(2, 1, 30, 30), torch.rand(2, 1, 30, 30), TINY_GAN)
    with pytest.raises(CoDefendError, match="differ in shape"):
        train_cyclegan(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32), TINY_GAN)
    with pytest.raises(CoDefendError, match="epochs"):
        CycleGanConfig(epochs=0, decay_epochs=0)


def test_schedule_is_constant_then_linear_to_zero() -> None:
    cfg = CycleGanConfig(epochs=100, decay_epochs=100)  # the reference 200-epoch schedule
    factors = [cfg.lr_factor(e) for e in range(200)]
    assert factors[:100] == [1.0] * 100
    assert all(a > b for a, b in zip(factors[99:], factors[100:], strict=False))
    assert factors[-1] == pytest.approx(1 / 101)


def test_image_pool_mixes_history_reproducibly() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        pool = ImagePool(4, torch.Generator().manual_seed(seed))
        return [pool.query(torch.full((2, 1, 2, 2), float(i))) for i in range(10)]

    a, b = run(0), run(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Until the pool is full, images pass straight through; afterwards some come from history.
    assert torch.equal(a[0], torch.zeros(2, 1, 2, 2)) and torch.equal(a[1], torch.ones(2, 1, 2, 2))
    # Query i returns images of value i, or older ones (< i) swapped out of the pool.
    served_old = sum(int((batch < i).any()) for i, batch in enumerate(a) if i >= 2)
    assert served_old >= 2
    assert all(bool((batch <= i).all()) for i, batch in enumerate(a))


@pytest.fixture(scope="module")
def scene():  # type: ignore[no-untyped-def]
    splits = load_splits("digits")
    trig = Trigger.patch(splits.train.image_shape, size=4)
    bad = train_badnet("lenet5", splits.train, trig, TARGET, RATIO, FAST)
    gen = torch.Generator().manual_seed(1)
    clean_idx = (~bad.poison.poisoned_mask).nonzero().flatten()
    perm = clean_idx[torch.randperm(len(clean_idx), generator=gen)]
    valid = splits.train.subset(perm[:120])  # the edge's labelled clean set, D_valid
    rest = splits.train.subset(perm[120:])
    # What the camera relays: 150 frames carrying the trigger, 150 clean ones.
    non_target = rest.subset((rest.labels != TARGET).nonzero().flatten()[:150])
    stream = torch.cat([trig.apply(non_target.images), rest.images[-150:]])
    return {"splits": splits, "trigger": trig, "bad": bad, "valid": valid, "rest": rest, "stream": stream}


def test_select_clean_overlays_has_every_class() -> None:
    ds = load_splits("digits").test
    idx = select_clean_overlays(ds, 20, torch.Generator().manual_seed(0))
    assert len(idx) == 20 and len(torch.unique(idx)) == 20
    assert set(ds.labels[idx].tolist()) == set(range(10))
    with pytest.raises(CoDefendError, match="one per class"):
        select_clean_overlays(ds, 5, torch.Generator().manual_seed(0))


def test_device_screen_and_edge_repair_remove_the_backdoor(scene) -> None:  # type: ignore[no-untyped-def]
    bad, valid, test, trig = scene["bad"], scene["valid"], scene["splits"].test, scene["trigger"]
    overlays = valid.images[select_clean_overlays(valid, 50, torch.Generator().manual_seed(2))]
    screen = device_screen(bad.model, scene["stream"], overlays, scene["rest"].images[:100])
    # Device side: most flagged frames are the triggered half of the stream.
    n_true = int((screen.flagged_idx < 150).sum())
    assert n_true >= 120
    assert n_true / len(screen.flagged_idx) >= 0.9

    before = backdoor_metrics(bad.model, test, trig, TARGET)
    result = edge_repair(bad.model, valid, screen.flagged, cyclegan=TINY_GAN)
    after = backdoor_metrics(result.model, test, trig, TARGET)

    # G learned to stamp the trigger: the BadNet sends most of G(x) to the target class.
    pred, _ = predict(bad.model, result.synthesized)
    non_target = valid.labels != TARGET
    assert float((pred[non_target] == TARGET).float().mean()) >= 0.8
    # ... by changing the trigger corner, not the whole image.
    diff = (result.synthesized - valid.images).abs().mean(dim=(0, 1))
    assert float(diff[-6:, -6:].mean()) > 3 * float(diff[:20, :20].mean())

    assert before.attack_success_rate >= 0.95
    assert after.attack_success_rate <= 0.25
    assert after.clean_accuracy >= before.clean_accuracy - 0.05
    # The BadNet itself is untouched; the repaired model is a copy.
    assert backdoor_metrics(bad.model, test, trig, TARGET).attack_success_rate == before.attack_success_rate
    assert len(result.cyclegan.history) == 4
    assert result.cyclegan.history[-1].lr < result.cyclegan.history[0].lr


def test_a_reference_model_keeps_out_generated_images_that_lost_their_label(scene) -> None:  # type: ignore[no-untyped-def]
    """With a reference model, D_gen keeps only the generated images it still labels as their source image."""
    bad, valid = scene["bad"], scene["valid"]
    from iotbed.models import get_or_train

    clean_model = get_or_train("lenet5", scene["splits"].train, FAST, progress=False).model
    flagged = scene["stream"][:60]
    plain = edge_repair(bad.model, valid, flagged, cyclegan=TINY_GAN)
    filtered = edge_repair(bad.model, valid, flagged, cyclegan=TINY_GAN, reference=clean_model)
    assert plain.kept_generated == len(valid)
    pred, _ = predict(clean_model, filtered.synthesized)
    assert filtered.kept_generated == int((pred == valid.labels).sum())
    assert torch.equal(plain.synthesized, filtered.synthesized)  # the same CycleGAN: only D_gen differs
