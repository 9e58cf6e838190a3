"""DeepTest (Tian, Pei, Jana, Ray, ICSE 2018): coverage-guided generation of transformed test images, as an
offline probe of a trained classifier.

**Neuron coverage** (the authors' `guided/ncoverage.py`). The neurons are the channels of every convolutional
feature map, read after its activation: Keras convolutions apply their activation inside the layer, so here
each activation module (ReLU, the HE networks' square, ...) whose output is 4-D (N, C, H, W) is one layer;
pooling, flattening and fully connected outputs are left out, as the authors leave out layers named
pool/fc/flatten. (Where a pool comes before the activation, as in `tutorial_net`, the map is the pooled one.)
Per input, each layer's whole output is min-max scaled to [0, 1] (all zeros when it is
constant); a channel is covered when the mean of its scaled map exceeds the threshold (0.2, as their guided
search uses). Coverage = covered channels / all channels, cumulative over every input seen.

**Transformations** (their `testgen/` and `guided/` scripts, which use OpenCV on 0-255 images; here NumPy and
SciPy on [0, 1] (C, H, W) images, values clipped to [0, 1] as OpenCV's uint8 arithmetic saturates):
translation, scale, shear, rotation, contrast, brightness and blur, see `TRANSFORMATIONS`. Geometric ones are
bilinear affine warps with black borders (`cv2.warpAffine`'s defaults) about the image centre. Parameters come
from the guided search's grids (`parameter_grid`). Its translation of -50..49 px was meant for a 192x256 input;
here it is the same fraction (26%) of the image's shorter side: -8..7 px at 32 px, -7..6 px at 28 px. The other
ranges are kept: factors, angles and 0-255 offsets do not depend on size; blur kernels stay 3-9 px, so blur is
relatively stronger on small images than on theirs.

**Guided search** (their `guided/rambo_guided.py`). Seeds are processed in order, each with a depth-first
stack that starts with the seed. The image on top of the stack adds its coverage to the cumulative coverage,
then gets up to `tries` tries; a try applies two different transformations, drawn at random from the seven,
each with a parameter drawn at random from its grid (`parameter_grid`), to that image. The first generated
image that covers a channel the cumulative coverage lacks is kept: pushed on the stack (so the search goes
deeper from it) and its coverage added. A top image whose tries all fail is popped. As in the authors' code,
the transformations of a kept image are queued and each later try takes the next queued one as its first
transformation (so that one may repeat as the second). The cumulative coverage starts empty, as theirs, and
grows with the seeds as they are reached; the seeds' own coverage is reported separately.

**Oracle**: DeepTest's metamorphic relation for a classifier: a generated image should keep the prediction of
the seed it descends from. Every generated image, kept or not, whose predicted label differs from its seed's
is a label flip.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from iotbed.data.dataset import ImageDataset
from iotbed.errors import UsageError
from iotbed.models.architectures import Square

DEFAULT_THRESHOLD = 0.2
DEFAULT_TRIES = 10

# Modules whose 4-D output is a convolutional feature map after its activation.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    Square,
)

Image = np.ndarray  # float32 (C, H, W) in [0, 1]


# ---------------------------------------------------------------------------------------------------------
# Neuron coverage.


def channel_scores(feature_map: torch.Tensor) -> torch.Tensor:
    """Mean of each channel's map after the whole output of each input is min-max scaled to [0, 1]:
    (N, C, H, W) -> (N, C), float64. A constant output scales to zeros."""
    values = feature_map.detach().double()
    flat = values.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1)
    span = flat.max(dim=1).values.view(-1, 1) - low
    # Scaling is affine, so the mean of the scaled map is the scaled mean of the map.
    means = values.mean(dim=(2, 3))
    scaled = (means - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(scaled))


@dataclass(frozen=True)
class CoverageLayer:
    """One layer whose channels are neurons: its module's qualified name and its channel count."""

    name: str
    channels: int


class NeuronCoverage:
    """DeepTest's neuron coverage of `model` on images of `input_shape` (C, H, W): see the module docstring.

    The layers are found by running one black image through the model; a module called more than once in a
    forward pass is counted once, from its last call."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], threshold: float = DEFAULT_THRESHOLD) -> None:
        if not 0.0 <= threshold < 1.0:
            raise UsageError(f"threshold {threshold}: give a value in [0, 1); scaled channel means lie in [0, 1]")
        self.model = model
        self.threshold = float(threshold)
        self._modules = {
            name: module for name, module in model.named_modules() if isinstance(module, ACTIVATIONS) and name
        }
        shapes = self._output_shapes(torch.zeros((1, *input_shape), dtype=torch.float32))
        self.layers = tuple(CoverageLayer(name, shape[1]) for name, shape in shapes.items() if len(shape) == 4)
        if not self.layers:
            raise UsageError(
                f"the {type(model).__name__} has no activation with a convolutional feature map (N, C, H, W) "
                "output; neuron coverage counts the channels of such maps"
            )
        self.total = sum(layer.channels for layer in self.layers)

    @contextlib.contextmanager
    def _hooks(self, names: Sequence[str], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        handles = [
            self._modules[name].register_forward_hook(lambda _m, _i, out, name=name: sink(name, out)) for name in names
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()

    def _output_shapes(self, probe: torch.Tensor) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}

        def record(name: str, out: torch.Tensor) -> None:
            shapes.pop(name, None)  # re-insert: dict order is the order of the last calls
            shapes[name] = tuple(out.shape)

        with self._hooks(list(self._modules), record):
            self.model(probe)
        return shapes

    def evaluate(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(covered, predictions) for (N, C, H, W) images: covered is bool (N, total), the layers' channels
        side by side in `self.layers` order; predictions are the argmax labels (N,)."""
        scores: dict[str, torch.Tensor] = {}

        def record(name: str, out: torch.Tensor) -> None:
            scores[name] = channel_scores(out)

        with self._hooks([layer.name for layer in self.layers], record):
            logits = self.model(images.float())
        covered = torch.cat([scores[layer.name] for layer in self.layers], dim=1) > self.threshold
        return covered.numpy(), logits.argmax(dim=1).numpy()

    def per_layer(self, covered: np.ndarray) -> list[tuple[CoverageLayer, int]]:
        """Covered channels per layer of a (total,) coverage vector."""
        counts, start = [], 0
        for layer in self.layers:
            counts.append((layer, int(covered[start : start + layer.channels].sum())))
            start += layer.channels
        return counts


# ---------------------------------------------------------------------------------------------------------
# Transformations on one float32 (C, H, W) image in [0, 1].


def _warp(image: Image, forward: np.ndarray) -> Image:
    """Apply the affine map `forward` (2x3, pixel coordinates (x, y), x to the right, y down) with bilinear
    interpolation and black outside the image."""
    linear, shift = forward[:, :2], forward[:, 2]
    inverse = np.linalg.inv(linear)
    # SciPy reads each output pixel from input = matrix @ output + offset, in (row, col) = (y, x) order.
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    matrix = swap @ inverse @ swap
    offset = swap @ (-inverse @ shift)
    channels = [
        ndimage.affine_transform(channel, matrix, offset=offset, order=1, mode="constant", cval=0.0)
        for channel in image
    ]
    return np.clip(np.stack(channels), 0.0, 1.0).astype(np.float32)


def _centre(image: Image) -> tuple[float, float]:
    _, height, width = image.shape
    return (width - 1) / 2, (height - 1) / 2


def translate(image: Image, pixels: float) -> Image:
    """Shift right and down by `pixels` (both axes, as the authors' single-parameter translation)."""
    return _warp(image, np.array([[1.0, 0.0, pixels], [0.0, 1.0, pixels]]))


def scale(image: Image, factor: float) -> Image:
    """Zoom by `factor` about the centre, keeping the image size: >1 crops, <1 leaves a black border.
    (`cv2.resize` changed the size, which the authors' fixed-input model could not take.)"""
    cx, cy = _centre(image)
    return _warp(image, np.array([[factor, 0.0, cx * (1 - factor)], [0.0, factor, cy * (1 - factor)]]))


def shear(image: Image, factor: float) -> Image:
    """Horizontal shear x' = x - factor * (y - cy), the authors' matrix [[1, -factor, 0], [0, 1, 0]] taken
    about the centre row, so that shearing does not also translate (translation is its own transformation)."""
    _, cy = _centre(image)
    return _warp(image, np.array([[1.0, -factor, factor * cy], [0.0, 1.0, 0.0]]))


def rotate(image: Image, degrees: float) -> Image:
    """Rotate by `degrees` about the centre, counter-clockwise on screen for positive angles (as
    `cv2.getRotationMatrix2D`)."""
    cx, cy = _centre(image)
    a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return _warp(image, np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]]))


def contrast(image: Image, gain: float) -> Image:
    """Multiply every pixel by `gain`, saturating at 1."""
    return np.clip(image * np.float32(gain), 0.0, 1.0).astype(np.float32)


def brightness(image: Image, bias: float) -> Image:
    """Add `bias`, given on the authors' 0-255 scale, to every pixel, saturating at 0 and 1."""
    return np.clip(image + np.float32(bias / 255.0), 0.0, 1.0).astype(np.float32)


def _gaussian_sigma(size: int) -> float:
    # OpenCV's sigma for GaussianBlur(ksize, 0).
    return 0.3 * ((size - 1) * 0.5 - 1) + 0.8


def _bilateral(image: Image, diameter: int = 9, sigma_color: float = 75 / 255, sigma_space: float = 75.0) -> Image:
    """`cv2.bilateralFilter(img, 9, 75, 75)` on [0, 1] values: a disc of radius diameter // 2, reflected
    borders, colour distance the sum of absolute channel differences."""
    radius = diameter // 2
    _, height, width = image.shape
    padded = np.pad(image, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    total = np.zeros_like(image, dtype=np.float64)
    weights = np.zeros((height, width), dtype=np.float64)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            neighbour = padded[:, radius + dy : radius + dy + height, radius + dx : radius + dx + width]
            distance = np.abs(neighbour - image).sum(axis=0, dtype=np.float64)
            weight = np.exp(-(dx * dx + dy * dy) / (2 * sigma_space**2) - distance**2 / (2 * sigma_color**2))
            total += weight * neighbour
            weights += weight
    return np.clip(total / weights, 0.0, 1.0).astype(np.float32)


# Kind -> (filter, size): the ten blurs of the authors' testgen scripts (kind 10 is bilateral there; their
# guided search has a 7x7 box instead).
BLUR_KINDS: dict[int, tuple[str, int]] = {
    1: ("average", 3),
    2: ("average", 4),
    3: ("average", 5),
    4: ("Gaussian", 3),
    5: ("Gaussian", 5),
    6: ("Gaussian", 7),
    7: ("median", 3),
    8: ("median", 5),
    9: ("average", 6),
    10: ("bilateral", 9),
}


def blur_name(kind: int) -> str:
    filt, size = BLUR_KINDS[kind]
    return "bilateral (9, 75, 75)" if filt == "bilateral" else f"{filt} {size}x{size}"


def _blur_channel(channel: np.ndarray, filt: str, size: int) -> np.ndarray:
    # OpenCV's borders: box and Gaussian reflect without repeating the edge (SciPy "mirror"), median repeats it.
    if filt == "average":
        return ndimage.uniform_filter(channel, size, mode="mirror")
    if filt == "Gaussian":
        return ndimage.gaussian_filter(channel, _gaussian_sigma(size), radius=(size - 1) // 2, mode="mirror")
    return ndimage.median_filter(channel, size, mode="nearest")


def blur(image: Image, kind: int) -> Image:
    """One of the ten blurs of `BLUR_KINDS`, by kind 1-10."""
    if kind not in BLUR_KINDS:
        raise ValueError(f"blur kind {kind!r}: give 1-10")
    filt, size = BLUR_KINDS[int(kind)]
    if filt == "bilateral":
        return _bilateral(image, size)
    blurred = np.stack([_blur_channel(channel, filt, size) for channel in image])
    return np.clip(blurred, 0.0, 1.0).astype(np.float32)


TRANSFORMATIONS: dict[str, Callable[[Image, float], Image]] = {
    "translation": translate,
    "scale": scale,
    "shear": shear,
    "rotation": rotate,
    "contrast": contrast,
    "brightness": brightness,
    "blur": lambda image, kind: blur(image, int(kind)),
}

# Parameters that leave the image as it is (blur has none).
IDENTITY: dict[str, float] = {
    "translation": 0,
    "scale": 1.0,
    "shear": 0.0,
    "rotation": 0,
    "contrast": 1.0,
    "brightness": 0,
}

# The authors' guided search shifts Rambo's 192x256 input by -50..49 px (about -26%..+26% of its height);
# here the same fraction of the image's shorter side.
REFERENCE_SIDE = 192
REFERENCE_SHIFT = 50


def translation_limit(height: int, width: int) -> int:
    """k of the translation grid -k..k-1 px: the authors' 50 px of 192, scaled to the shorter side."""
    return max(1, round(REFERENCE_SHIFT * min(height, width) / REFERENCE_SIDE))


def parameter_grid(name: str, height: int, width: int) -> tuple[float, ...]:
    """The parameters the guided search draws from, uniformly, for transformation `name` on images of
    height x width px. As the authors' guided search: scale 0.5-1.9, shear -0.5-0.4 and contrast 0.1-1.9 in
    steps of 0.1, rotation -30-29 degrees, brightness -21-20 (of 255), blur kinds 1-10; translation
    -k..k-1 px with k from `translation_limit` (-50..49 px for their 192 px high input; 8 px for 32 px)."""
    if name == "translation":
        k = translation_limit(height, width)
        return tuple(float(p) for p in range(-k, k))
    grids: dict[str, tuple[float, ...]] = {
        "scale": tuple(round(0.1 * p, 1) for p in range(5, 20)),
        "shear": tuple(round(0.1 * p, 1) for p in range(-5, 5)),
        "rotation": tuple(float(p) for p in range(-30, 30)),
        "contrast": tuple(round(0.1 * p, 1) for p in range(1, 20)),
        "brightness": tuple(float(p) for p in range(-21, 21)),
        "blur": tuple(float(kind) for kind in range(1, 11)),
    }
    if name not in grids:
        raise ValueError(f"unknown transformation {name!r}; known: {', '.join(TRANSFORMATIONS)}")
    return grids[name]


@dataclass(frozen=True)
class Step:
    """One transformation with its parameter."""

    transformation: str
    parameter: float

    def apply(self, image: Image) -> Image:
        return TRANSFORMATIONS[self.transformation](image, self.parameter)

    def label(self) -> str:
        if self.transformation == "blur":
            return f"blur({blur_name(int(self.parameter))})"
        units = {"translation": " px", "rotation": " deg"}.get(self.transformation, "")
        return f"{self.transformation}({self.parameter:g}{units})"


# ---------------------------------------------------------------------------------------------------------
# The guided search.


@dataclass(frozen=True)
class Generated:
    """One generated image: a try on the image then on top of its seed's stack."""

    seed: int  # position in the seed list
    depth: int  # transformations pairs between it and its seed (1: made from the seed itself)
    steps: tuple[Step, Step]  # this try's two, applied in order
    chain: tuple[Step, ...]  # every step from the seed, this try's last
    parent_prediction: int
    prediction: int
    kept: bool


@dataclass
class SearchOutcome:
    """What `guided_search` found: every generated image, the images of the flips, and the coverage."""

    seed_covered: np.ndarray  # bool (total,): the seeds alone
    final_covered: np.ndarray  # bool (total,): the cumulative coverage at the end
    seed_predictions: np.ndarray
    generated: list[Generated] = field(default_factory=list)
    flip_images: dict[int, Image] = field(default_factory=dict)  # position in `generated` -> image


@dataclass
class _Node:
    image: Image
    prediction: int
    chain: tuple[Step, ...]


class _Search:
    """The state the guided search carries from seed to seed: cumulative coverage and the queue of
    transformations that made the last kept images."""

    def __init__(
        self, coverage: NeuronCoverage, outcome: SearchOutcome, grids: Sequence[tuple[float, ...]], tries: int
    ) -> None:
        self.coverage = coverage
        self.outcome = outcome
        self.cumulative = outcome.final_covered  # updated in place
        self.grids = grids
        self.tries = tries
        self.queued: deque[int] = deque()

    def draw_steps(self, rng: np.random.Generator) -> tuple[Step, Step]:
        names = list(TRANSFORMATIONS)
        first, second = (int(i) for i in rng.choice(len(names), size=2, replace=False))
        if self.queued:
            first = self.queued.popleft()
        a, b = (Step(names[i], float(self.grids[i][int(rng.integers(len(self.grids[i])))])) for i in (first, second))
        return a, b

    def try_once(self, node: _Node, position: int, rng: np.random.Generator) -> _Node | None:
        """Generate one image from `node` and record it; the new node when it adds coverage, else None."""
        steps = self.draw_steps(rng)
        image = steps[1].apply(steps[0].apply(node.image))
        covered, prediction = self.coverage.evaluate(torch.from_numpy(image[None]))
        kept = bool((covered[0] & ~self.cumulative).any())
        record = Generated(
            seed=position,
            depth=len(node.chain) // 2 + 1,
            steps=steps,
            chain=(*node.chain, *steps),
            parent_prediction=node.prediction,
            prediction=int(prediction[0]),
            kept=kept,
        )
        if record.prediction != int(self.outcome.seed_predictions[position]):
            self.outcome.flip_images[len(self.outcome.generated)] = image
        self.outcome.generated.append(record)
        if not kept:
            return None
        self.cumulative |= covered[0]
        self.queued.extend(list(TRANSFORMATIONS).index(step.transformation) for step in steps)
        return _Node(image, record.prediction, record.chain)

    def explore(self, position: int, seed: _Node, seed_covered: np.ndarray, rng: np.random.Generator) -> None:
        """Depth first from one seed: the top image gets `tries` tries; a kept image goes on top, an image
        whose tries all fail comes off."""
        self.cumulative |= seed_covered
        stack = [seed]
        while stack:
            for _ in range(self.tries):
                child = self.try_once(stack[-1], position, rng)
                if child is not None:
                    stack.append(child)
                    break
            else:
                stack.pop()


def guided_search(
    coverage: NeuronCoverage,
    seeds: torch.Tensor,
    *,
    tries: int = DEFAULT_TRIES,
    rng: np.random.Generator,
    progress: bool = True,
) -> SearchOutcome:
    """DeepTest's coverage-guided search from `seeds` (N, C, H, W) in [0, 1] (see the module docstring).
    `rng` makes every random choice."""
    if tries < 1:
        raise UsageError(f"tries {tries}: give 1 or more tries per image")
    seed_covered, seed_predictions = coverage.evaluate(seeds)
    _, height, width = seeds.shape[1:]
    outcome = SearchOutcome(
        seed_covered=seed_covered.any(axis=0),
        final_covered=np.zeros(coverage.total, dtype=bool),
        seed_predictions=seed_predictions,
    )
    search = _Search(coverage, outcome, [parameter_grid(name, height, width) for name in TRANSFORMATIONS], tries)
    bar = tqdm(total=len(seeds), desc="deeptest seeds", unit="seed", file=sys.stderr, disable=not progress, leave=False)
    try:
        for position in range(len(seeds)):
            seed = _Node(seeds[position].numpy().astype(np.float32), int(seed_predictions[position]), ())
            search.explore(position, seed, seed_covered[position], rng)
            bar.update(1)
            bar.set_postfix(coverage=f"{search.cumulative.mean():.3f}", flips=len(outcome.flip_images), refresh=False)
    finally:
        bar.close()
    return outcome


# ---------------------------------------------------------------------------------------------------------
# The probe: seeds from a dataset, the search, and its figures.


@dataclass(frozen=True)
class TransformationStats:
    """How often a transformation took part in a try, and what came of those tries."""

    tries: int  # generated images it was one of the two last transformations of
    kept: int
    flips: int
    new_flips: int  # flips whose parent still had the seed's label: this try changed it

    @property
    def flip_rate(self) -> float:
        return self.flips / self.tries if self.tries else 0.0


@dataclass
class DeepTestResult:
    """A DeepTest probe of one model: settings, coverage, counts, and the flips."""

    arch: str
    n_seeds: int
    tries: int
    threshold: float
    seed: int
    image_shape: tuple[int, int, int]
    seed_indices: tuple[int, ...]  # positions in the dataset
    seed_labels: tuple[int, ...]
    seed_images: torch.Tensor
    coverage: NeuronCoverage
    outcome: SearchOutcome

    @property
    def generated(self) -> list[Generated]:
        return self.outcome.generated

    def seed_correct(self, position: int) -> bool:
        return int(self.outcome.seed_predictions[position]) == self.seed_labels[position]

    def flips(self) -> list[tuple[int, Generated]]:
        """(position in `generated`, record) of every label flip, in search order."""
        return [(i, self.generated[i]) for i in sorted(self.outcome.flip_images)]

    def per_transformation(self) -> dict[str, TransformationStats]:
        counts: dict[str, Counter[str]] = {name: Counter() for name in TRANSFORMATIONS}
        for g in self.generated:
            flipped = g.prediction != int(self.outcome.seed_predictions[g.seed])
            new = flipped and g.parent_prediction == int(self.outcome.seed_predictions[g.seed])
            # A try that drew the same transformation twice counts once for it.
            for name in {step.transformation for step in g.steps}:
                counts[name].update(tries=1, kept=int(g.kept), flips=int(flipped), new_flips=int(new))
        return {
            name: TransformationStats(c["tries"], c["kept"], c["flips"], c["new_flips"]) for name, c in counts.items()
        }

    def per_pair(self) -> dict[str, dict[str, int]]:
        """Tries and flips per ordered pair "first+second" of a try's two transformations."""
        pairs: dict[str, Counter[str]] = {}
        for g in self.generated:
            key = "+".join(step.transformation for step in g.steps)
            flipped = g.prediction != int(self.outcome.seed_predictions[g.seed])
            pairs.setdefault(key, Counter()).update(tries=1, flips=int(flipped))
        return {key: {"tries": c["tries"], "flips": c["flips"]} for key, c in sorted(pairs.items())}

    def to_dict(self) -> dict[str, Any]:
        o = self.outcome
        total = self.coverage.total
        flips = self.flips()
        seeds_correct = [self.seed_correct(p) for p in range(self.n_seeds)]
        errors = sum(1 for _, g in flips if seeds_correct[g.seed] and g.prediction != self.seed_labels[g.seed])
        fixes = sum(1 for _, g in flips if not seeds_correct[g.seed] and g.prediction == self.seed_labels[g.seed])
        _, height, width = self.image_shape
        seed_layers = self.coverage.per_layer(o.seed_covered)
        final_layers = self.coverage.per_layer(o.final_covered)
        return {
            "arch": self.arch,
            "image_shape": list(self.image_shape),
            "seeds": self.n_seeds,
            "tries": self.tries,
            "threshold": self.threshold,
            "seed": self.seed,
            "neurons": total,
            "layers": [
                {"layer": layer.name, "channels": layer.channels, "seeds_covered": a, "final_covered": b}
                for (layer, a), (_, b) in zip(seed_layers, final_layers, strict=True)
            ],
            "seed_coverage": float(o.seed_covered.sum()) / total,
            "final_coverage": float(o.final_covered.sum()) / total,
            "seed_covered_neurons": int(o.seed_covered.sum()),
            "final_covered_neurons": int(o.final_covered.sum()),
            "seeds_correct": int(sum(seeds_correct)),
            "generated": len(self.generated),
            "kept": sum(g.kept for g in self.generated),
            "max_depth": max((g.depth for g in self.generated if g.kept), default=0),
            "flips": len(flips),
            "kept_flips": sum(g.kept for _, g in flips),
            "new_flips": sum(g.parent_prediction == int(o.seed_predictions[g.seed]) for _, g in flips),
            "flips_from_correct_seeds_now_wrong": errors,
            "flips_from_wrong_seeds_now_right": fixes,
            "seeds_with_flips": len({g.seed for _, g in flips}),
            "per_transformation": {
                name: {**vars(stats), "flip_rate": stats.flip_rate} for name, stats in self.per_transformation().items()
            },
            "per_pair": self.per_pair(),
            "parameter_grids": {name: _grid_summary(parameter_grid(name, height, width)) for name in TRANSFORMATIONS},
            "blur_kinds": {str(kind): blur_name(kind) for kind in sorted(BLUR_KINDS)},
            "seed_indices": list(self.seed_indices),
        }


def _grid_summary(grid: tuple[float, ...]) -> dict[str, float | int]:
    return {"min": min(grid), "max": max(grid), "values": len(grid)}


def run_deeptest(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    arch: str,
    n_seeds: int = 100,
    tries: int = DEFAULT_TRIES,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    progress: bool = True,
) -> DeepTestResult:
    """Draw `n_seeds` seed images from `dataset` (images `model` did not train on) and run the guided search
    from them. `seed` draws the seeds and makes every choice of the search: same seed, same result (on the
    same torch build and thread count)."""
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or not 1 <= n_seeds <= len(dataset):
        raise UsageError(f"seeds {n_seeds!r}: give 1 to {len(dataset)} (the images in the dataset)")
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise UsageError(f"tries {tries!r}: give 1 or more tries per image")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed {seed!r}: give a whole number >= 0")
    coverage = NeuronCoverage(model, dataset.image_shape, threshold)
    seed_rng, search_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    positions = seed_rng.choice(len(dataset), size=n_seeds, replace=False)
    seeds = dataset.subset(positions)
    outcome = guided_search(coverage, seeds.images, tries=tries, rng=search_rng, progress=progress)
    return DeepTestResult(
        arch=arch,
        n_seeds=n_seeds,
        tries=tries,
        threshold=float(threshold),
        seed=seed,
        image_shape=dataset.image_shape,
        seed_indices=tuple(int(p) for p in positions),
        seed_labels=tuple(int(y) for y in seeds.labels),
        seed_images=seeds.images,
        coverage=coverage,
        outcome=outcome,
    )


def to_markdown(result: DeepTestResult, *, title: str = "DeepTest") -> str:
    """The coverage and counts, and the flips per transformation as a table."""
    d = result.to_dict()
    lines = [
        f"# {title}",
        "",
        f"`{d['arch']}`, {d['seeds']} seed images ({d['seeds_correct']} correctly classified), up to {d['tries']} "
        f"tries per image, coverage threshold {d['threshold']:g}, seed {d['seed']}.",
        "",
        "| | neurons covered | neuron coverage |",
        "|---|---|---|",
        f"| seeds alone | {d['seed_covered_neurons']} / {d['neurons']} | {d['seed_coverage']:.4f} |",
        f"| seeds and generated images | {d['final_covered_neurons']} / {d['neurons']} | {d['final_coverage']:.4f} |",
        "",
        f"Generated {d['generated']} images, kept {d['kept']} (each covered a channel nothing before it had; "
        f"the deepest kept image is {d['max_depth']} generations from its seed). Label flips (prediction "
        f"differs from the seed's): {d['flips']}, in {d['seeds_with_flips']} of {d['seeds']} seeds; "
        f"{d['kept_flips']} among kept images; "
        f"{d['new_flips']} new (the parent still had the seed's label). Of the flips, "
        f"{d['flips_from_correct_seeds_now_wrong']} turn a correct prediction wrong and "
        f"{d['flips_from_wrong_seeds_now_right']} a wrong one right.",
        "",
        "| transformation | parameters | tries | kept | flips | new flips | flip rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, stats in d["per_transformation"].items():
        grid = d["parameter_grids"][name]
        span = "kinds 1-10" if name == "blur" else f"{grid['min']:g} .. {grid['max']:g}"
        lines.append(
            f"| {name} | {span} | {stats['tries']} | {stats['kept']} | {stats['flips']} | {stats['new_flips']} "
            f"| {stats['flip_rate']:.3f} |"
        )
    lines += [
        "",
        "Each generated image applies two transformations to the image it grew from; a flip counts for both "
        "(once when the two are the same). Its ancestors' transformations apply too, so `new flips` counts only "
        "the flips whose parent still had the seed's label. Neurons: the channels of each convolutional feature "
        "map after its activation; a channel is covered by an input when the mean of its map, after the layer's "
        "output is min-max scaled to [0, 1], exceeds the threshold.",
        "",
        "Layers: "
        + ", ".join(
            f"`{layer['layer']}` {layer['seeds_covered']} -> {layer['final_covered']} of {layer['channels']}"
            for layer in d["layers"]
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


FLIP_COLUMNS = (
    "seed",
    "dataset_index",
    "label",
    "seed_prediction",
    "seed_correct",
    "depth",
    "first",
    "second",
    "chain",
    "parent_prediction",
    "prediction",
    "kept",
    "new",
)


def flips_csv(result: DeepTestResult) -> str:
    """One row per label flip, in search order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FLIP_COLUMNS)
    predictions = result.outcome.seed_predictions
    for _, g in result.flips():
        seed_prediction = int(predictions[g.seed])
        writer.writerow(
            [
                g.seed,
                result.seed_indices[g.seed],
                result.seed_labels[g.seed],
                seed_prediction,
                int(result.seed_correct(g.seed)),
                g.depth,
                g.steps[0].label(),
                g.steps[1].label(),
                " > ".join(step.label() for step in g.chain),
                g.parent_prediction,
                g.prediction,
                int(g.kept),
                int(g.parent_prediction == seed_prediction),
            ]
        )
    return buffer.getvalue()


def shown_flips(result: DeepTestResult, limit: int = 16) -> list[tuple[int, Generated]]:
    """The first flip of each seed, in search order, for up to `limit` seeds."""
    first: dict[int, tuple[int, Generated]] = {}
    for index, g in result.flips():
        first.setdefault(g.seed, (index, g))
    return list(first.values())[:limit]


def _as_picture(image: Image) -> np.ndarray:
    return image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))


def draw_flips(result: DeepTestResult, path: Path, classes: Sequence[str]) -> None:
    """flips.png: pairs of seed and flipping image, four pairs a row, with their predictions."""
    # A bare Figure draws with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    from iotbed.runner import atomic_write

    shown = shown_flips(result)
    pairs_per_row = 4
    rows = max(1, math.ceil(len(shown) / pairs_per_row))
    fig = Figure(figsize=(2 * pairs_per_row * 1.7, rows * 2.4))
    axes = fig.subplots(rows, 2 * pairs_per_row, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    predictions = result.outcome.seed_predictions
    for n, (index, g) in enumerate(shown):
        row, column = divmod(n, pairs_per_row)
        left, right = axes[row, 2 * column], axes[row, 2 * column + 1]
        truth, seed_prediction = classes[result.seed_labels[g.seed]], classes[int(predictions[g.seed])]
        left.imshow(_as_picture(result.seed_images[g.seed].numpy()), cmap="gray", vmin=0, vmax=1)
        left.set_title(f"test #{result.seed_indices[g.seed]}\ntrue {truth}, pred {seed_prediction}", fontsize=7)
        right.imshow(_as_picture(result.outcome.flip_images[index]), cmap="gray", vmin=0, vmax=1)
        earlier = len(g.chain) - len(g.steps)
        ancestry = f", after {earlier} earlier steps" if earlier else ""
        right.set_title(
            f"{g.steps[0].label()}\n{g.steps[1].label()}\npred {classes[g.prediction]}{ancestry}", fontsize=6
        )
    if not shown:
        axes[0, 0].text(0, 0.5, "no label flips", fontsize=12)
    fig.suptitle(f"DeepTest label flips: {result.arch}, first flip of each seed (seed image left)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def output_dir(out_dir: str | Path | None, dataset: str, arch: str, *, force: bool = False) -> Path:
    """`out_dir`, or runs/deeptest-<dataset>-<arch>-<timestamp>/; refuses a folder that already holds files
    unless `force`. Nothing is created yet."""
    from iotbed.runner import results_folder

    return results_folder(out_dir, f"deeptest-{dataset}-{arch}", force, UsageError)


def write_results(
    out_dir: Path,
    result: DeepTestResult,
    payload: dict[str, Any],
    classes: Sequence[str],
    *,
    title: str,
) -> list[Path]:
    """deeptest.json, deeptest.md, flips.csv and flips.png in `out_dir`, each written beside its place and
    renamed, so an interrupted run leaves no half-written file."""
    from iotbed.runner import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "deeptest.json": json.dumps(payload, indent=2) + "\n",
        "deeptest.md": to_markdown(result, title=title),
        "flips.csv": flips_csv(result),
    }
    paths = []
    for name, text in texts.items():
        path = out_dir / name
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))  # type: ignore[misc]
        paths.append(path)
    draw_flips(result, out_dir / "flips.png", classes)
    paths.append(out_dir / "flips.png")
    return paths
