"""The image classifiers the testbed deploys, and a by-name registry to build them.

Every model takes images in [0, 1] and normalises them itself (`Normalize` is its first layer, with
mean/std as buffers), so the normalisation travels with the weights and attacks can work in pixel space.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from iotbed.errors import ModelError

# Bounds on architecture arguments read from model files (far above anything the testbed uses).
_MAX_CHANNELS = 64
_MAX_IMAGE_SIZE = 512
_MAX_CLASSES = 100_000


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before its weights are loaded."""

    arch: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def build(self) -> ImageClassifier:
        return build_model(
            self.arch,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
        )

    def to_metadata(self) -> dict[str, str]:
        # safetensors metadata is str -> str only.
        return {
            "arch": self.arch,
            "in_channels": str(self.in_channels),
            "num_classes": str(self.num_classes),
            "image_size": str(self.image_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], *, source: str = "model metadata") -> ModelSpec:
        try:
            spec = cls._parse(metadata)
        except KeyError as exc:
            raise ModelError(f"{source} lacks the key {exc.args[0]!r}; it was not written by iotbed") from None
        except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nesting past json's depth
            raise ModelError(f"{source} has a malformed architecture field: {exc}") from None
        # Model payloads may arrive from the network: refuse sizes that would make building the
        # module allocate gigabytes before the weights' shapes are even compared.
        if not (1 <= spec.in_channels <= _MAX_CHANNELS and 1 <= spec.image_size <= _MAX_IMAGE_SIZE):
            raise ModelError(f"{source} asks for {spec.in_channels} channels of {spec.image_size} px; out of range")
        if not 2 <= spec.num_classes <= _MAX_CLASSES:
            raise ModelError(f"{source} asks for {spec.num_classes} classes; out of range")
        return spec

    @classmethod
    def _parse(cls, metadata: Mapping[str, str]) -> ModelSpec:
        in_channels = int(metadata["in_channels"])
        # mean/std are informational: the buffers in the weights overwrite them on load.
        mean = tuple(float(v) for v in json.loads(metadata["mean"])) if "mean" in metadata else (0.0,) * in_channels
        std = tuple(float(v) for v in json.loads(metadata["std"])) if "std" in metadata else (1.0,) * in_channels
        return cls(
            arch=metadata["arch"],
            in_channels=in_channels,
            num_classes=int(metadata["num_classes"]),
            image_size=int(metadata["image_size"]),
            mean=mean,
            std=std,
        )


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, not parameters, so they are saved but never trained."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ModelError(
                f"normalisation mean {list(mean)} and std {list(std)} must be non-empty and of equal length"
            )
        if any(s <= 0 for s in std):
            raise ModelError(f"normalisation std {list(std)} must be positive")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Base of every architecture here: records its constructor arguments so it can be saved and rebuilt."""

    arch: ClassVar[str]

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or image_size < 1:
            raise ModelError(
                f"{self.arch}: need in_channels >= 1, num_classes >= 2, image_size >= 1 "
                f"(got {in_channels}, {num_classes}, {image_size})"
            )
        mean = [0.0] * in_channels if mean is None else list(mean)
        std = [1.0] * in_channels if std is None else list(std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ModelError(f"{self.arch}: mean/std need {in_channels} values, one per channel (got {mean}, {std})")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.normalize = Normalize(mean, std)

    @property
    def spec(self) -> ModelSpec:
        # Read mean/std from the buffers so the spec stays right after load_state_dict.
        return ModelSpec(
            arch=self.arch,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            image_size=self.image_size,
            mean=tuple(float(v) for v in self.normalize.mean.flatten().tolist()),
            std=tuple(float(v) for v in self.normalize.std.flatten().tolist()),
        )


class LeNet5(ImageClassifier):
    """LeCun et al. 1998: conv5x5(6) -> pool -> conv5x5(16) -> pool -> fc 120 -> 84 -> classes.

    ReLU and max-pooling instead of the original tanh/subsampling. Inputs smaller than 32 px get
    padding=2 on the first conv (the classic way to feed 28x28 MNIST), so 28 and 32 both end at 16x5x5.
    About 62k parameters for 1 channel and 10 classes.
    """

    arch = "lenet5"

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, image_size=image_size, mean=mean, std=std)
        padding = 2 if image_size < 32 else 0
        side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
        if side < 1:
            raise ModelError(f"lenet5 needs images of at least 12x12 pixels (got {image_size}x{image_size})")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class TutorialNet(ImageClassifier):
    """The network of PyTorch's "Adversarial Example Generation" tutorial (its older LeNet, from the
    pytorch/examples MNIST net of that time): conv5x5(10) -> pool -> ReLU -> conv5x5(20) -> dropout2d ->
    pool -> ReLU -> fc 50 -> dropout -> classes. Kept to compare our FGSM curve with the tutorial's."""

    arch = "tutorial_net"

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, image_size=image_size, mean=mean, std=std)
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ModelError(f"tutorial_net needs images of at least 16x16 pixels (got {image_size}x{image_size})")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 10, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(10, 20, kernel_size=5),
            nn.Dropout2d(0.5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(20 * side * side, 50),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(50, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # bias=False: the BatchNorm shift makes a conv bias redundant.
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class GtsrbCnn(ImageClassifier):
    """Compact CNN for 32x32 colour traffic signs (GTSRB, 43 classes).

    Three blocks of conv3x3 + BatchNorm + ReLU + max-pool (16, 32, 64 channels; 32 -> 16 -> 8 -> 4 px),
    then dropout -> fc 256 -> dropout -> fc classes. Sized for CPUs: about 2.8 M multiply-accumulates
    per 32x32 image (~20 s per GTSRB epoch on one core) and ~0.30 M parameters (3 channels, 43
    classes), most in the first fc layer. Dropout 0.25: at 0.5 it reached ~1 point lower test accuracy
    after 6 epochs and learned much more slowly. Any side >= 8 px works.
    """

    arch = "gtsrb_cnn"
    widths: ClassVar[tuple[int, int, int]] = (16, 32, 64)

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 43,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, image_size=image_size, mean=mean, std=std)
        side = image_size // 8
        if side < 1:
            raise ModelError(f"gtsrb_cnn needs images of at least 8x8 pixels (got {image_size}x{image_size})")
        w1, w2, w3 = self.widths
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(w3 * side * side, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class CifarCnn(ImageClassifier):
    """Small VGG-style CNN for 32x32 colour images (CIFAR-10 sized).

    Three stages of two conv3x3 + BatchNorm + ReLU, then max-pool and dropout 0.25 (32, 64, 128
    channels), then fc 256 with dropout 0.5 -> classes. About 0.82 M parameters and 38 M
    multiply-accumulates per 32x32 image (14x the GTSRB CNN: minutes per CIFAR-10 epoch on two
    CPU cores, and a heavier workload for simulated devices). Any side >= 8 px works.
    """

    arch = "cifar_cnn"

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, image_size=image_size, mean=mean, std=std)
        side = image_size // 8
        if side < 1:
            raise ModelError(f"cifar_cnn needs images of at least 8x8 pixels (got {image_size}x{image_size})")
        layers: list[nn.Module] = []
        c_in = in_channels
        for width in (32, 64, 128):
            layers += _conv_bn_relu(c_in, width) + _conv_bn_relu(width, width)
            layers += [nn.MaxPool2d(2), nn.Dropout(0.25)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class Square(nn.Module):
    """x -> x^2: the activation a CKKS ciphertext can evaluate with one multiplication."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def he_conv_geometry(image_size: int) -> tuple[int, int]:
    """(kernel, stride) of `HeCnn`'s convolution: at most 8x8 windows, so that the windows and the kernel
    elements of one channel fit in one ciphertext. 28 px gives TenSEAL's tutorial (7, 3); 32 px (8, 4)."""
    kernel = max(3, round(image_size / 4))
    stride = max(1, math.ceil((image_size - kernel) / 7))
    return kernel, stride


class HeCnn(ImageClassifier):
    """A network a CKKS ciphertext can carry through: conv (4 kernels, no padding) -> square -> fc 64 ->
    square -> fc classes. On 28x28 MNIST it is the network of TenSEAL's encrypted-MNIST tutorial
    (conv 7x7 stride 3, 17,298 parameters); other sizes take `he_conv_geometry`'s kernel and stride.
    Squares instead of ReLU and no pooling: every layer is a polynomial of degree at most 2."""

    arch = "he_cnn"
    kernels: ClassVar[int] = 4
    hidden: ClassVar[int] = 64
    activation: ClassVar[str] = "square"

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, image_size=image_size, mean=mean, std=std)
        if image_size < 8:
            raise ModelError(f"he_cnn needs images of at least 8x8 pixels (got {image_size}x{image_size})")
        kernel, stride = he_conv_geometry(image_size)
        side = (image_size - kernel) // stride + 1
        self.conv = nn.Conv2d(in_channels, self.kernels, kernel_size=kernel, stride=stride)
        act: type[nn.Module] = Square if self.activation == "square" else nn.ReLU
        self.classifier = nn.Sequential(
            act(),
            nn.Flatten(),
            nn.Linear(self.kernels * side * side, self.hidden),
            act(),
            nn.Linear(self.hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(self.normalize(x)))


class HeCnnRelu(HeCnn):
    """`HeCnn` with ReLU: what interactive encrypted inference evaluates, the edge computing the linear layers
    on ciphertexts and the key holder the ReLUs (`iotbed.privacy.interactive`)."""

    arch = "he_cnn_relu"
    activation: ClassVar[str] = "relu"


@dataclass(frozen=True)
class ArchInfo:
    """A registry entry: the class that builds the architecture and a one-line description."""

    builder: Callable[..., ImageClassifier]
    description: str


ARCHITECTURES: Mapping[str, ArchInfo] = MappingProxyType(
    {
        "lenet5": ArchInfo(LeNet5, "LeNet-5 (ReLU, max-pool), ~62k params; grey digits, 28 or 32 px"),
        "tutorial_net": ArchInfo(TutorialNet, "PyTorch FGSM tutorial's MNIST net: 2 conv, dropout, fc 50; ~22k params"),
        "gtsrb_cnn": ArchInfo(GtsrbCnn, "3 conv+BN blocks (16-32-64), fc 256, dropout; ~0.30M params; 32x32 signs"),
        "he_cnn": ArchInfo(
            HeCnn, "conv (4 kernels) -> x^2 -> fc 64 -> x^2 -> fc: evaluable under CKKS; ~17k params on MNIST"
        ),
        "he_cnn_relu": ArchInfo(
            HeCnnRelu, "he_cnn with ReLU: evaluated interactively (the key holder applies the ReLUs)"
        ),
        "cifar_cnn": ArchInfo(CifarCnn, "VGG-style 3x(2 conv+BN), fc 256, dropout; ~0.82M params; 32x32 colour"),
    }
)


def resolve_arch(arch: str) -> str:
    """The registry name for `arch` (case-insensitive, '-' = '_'); ModelError with a suggestion if unknown."""
    name = arch.strip().lower().replace("-", "_")
    if name in ARCHITECTURES:
        return name
    close = difflib.get_close_matches(name, list(ARCHITECTURES), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelError(f"unknown architecture {arch!r}.{hint} Known: {', '.join(sorted(ARCHITECTURES))}.")


def build_model(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> ImageClassifier:
    """A freshly initialised model of the named architecture (see `ARCHITECTURES`)."""
    info = ARCHITECTURES[resolve_arch(arch)]
    return info.builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, mean=mean, std=std)
