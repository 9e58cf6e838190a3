"""Device cost profiles: how long a node takes to classify a batch.

A batch of n images of a model costing F floating-point operations per image takes
`batch_overhead + n * F / (cores * gflops_per_core * 1e9 * efficiency)` seconds. Peak figures come from
the vendors' specifications; `efficiency` is the share of peak that small-batch CNN inference sustains
(small convolutions are memory bound), and is part of the profile so users can calibrate it against
their own measurement.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    cores: int
    gflops_per_core: float  # peak FP32 per core, from the vendor's specification
    efficiency: float  # share of peak sustained by small-batch CNN inference
    batch_overhead_s: float  # fixed cost per batch: framework dispatch, kernel launches

    def seconds_for(self, n_images: int, flops_per_image: float, cores: int | None = None) -> float:
        usable = (cores or self.cores) * self.gflops_per_core * 1e9 * self.efficiency
        return self.batch_overhead_s + n_images * flops_per_image / usable


BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="raspberry_pi_4",
            description="Raspberry Pi 4 Model B: BCM2711, 4x Cortex-A72 at 1.5 GHz, NEON 128-bit "
            "(2 FMA lanes x 4 FP32 = 8 FLOP/cycle/core -> 12 GFLOPS/core peak)",
            cores=4,
            gflops_per_core=12.0,
            efficiency=0.10,
            batch_overhead_s=0.5e-3,
        ),
        DeviceProfile(
            name="jetson_nano",
            description="NVIDIA Jetson Nano: 128-core Maxwell GPU, 472 GFLOPS FP16 (236 GFLOPS FP32) peak; "
            "one GPU counted as one core",
            cores=1,
            gflops_per_core=236.0,
            efficiency=0.15,
            batch_overhead_s=2.0e-3,
        ),
        DeviceProfile(
            name="edge_server_8core",
            description="8-core x86 edge server at 2.5 GHz with AVX2 FMA (2 x 8 FP32 x 2 = 32 FLOP/cycle/core "
            "-> 80 GFLOPS/core peak)",
            cores=8,
            gflops_per_core=80.0,
            efficiency=0.10,
            batch_overhead_s=0.2e-3,
        ),
    )
}
