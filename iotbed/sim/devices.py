"""Device cost profiles: how long a node takes to classify a batch.

A batch of n images of a model costing F floating-point operations per image takes
`batch_overhead + n * F / (cores * gflops_per_core * 1e9 * efficiency)` seconds. Peak figures come from
the vendors' specifications; `efficiency` is the share of peak that small-batch CNN inference sustains
(small convolutions are memory bound), and is part of the profile so users can calibrate it against
their own measurement.

Checking a signed update costs one Ed25519 verification and a SHA-256 pass over the blob:
`ed25519_verify_s + nbytes / sha256_bytes_per_s`. The built-in figures are estimates from cycle counts at
the profile's clock (SHA-256 about 15 cycles/byte in software, 2 with the ARMv8 or x86 SHA instructions;
an Ed25519 verification about 500k cycles on Cortex-A cores, 150k on x86 with AVX2); `openssl speed
sha256 ed25519` on the device gives the figures to put in a scenario's `devices:` instead.

Homomorphic encryption is priced apart (`iotbed.privacy.costs`): seconds measured on the host that ran the
encrypted network, divided by `he_core_speed`, the speed of one of the device's cores on SEAL's integer
work relative to one core of that host. The built-in figures are estimates from clock and core class
against a 2.5 GHz x86-64 core with AVX2 (a Cortex-A72 at 1.5 GHz about a sixth of it: 64-bit modular
multiplication without AVX2, at 60% of the clock); SEAL's `sealbench` on the device and on the host gives
the ratio to put in a scenario's `devices:` instead.
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
    sha256_bytes_per_s: float = 100e6
    ed25519_verify_s: float = 0.33e-3
    he_core_speed: float = 1.0  # one core on SEAL's work, relative to one core of the host that measured it

    def seconds_for(self, n_images: int, flops_per_image: float, cores: int | None = None) -> float:
        usable = (cores or self.cores) * self.gflops_per_core * 1e9 * self.efficiency
        return self.batch_overhead_s + n_images * flops_per_image / usable

    def he_seconds(self, host_seconds: float, n: int = 1, cores: int | None = None) -> float:
        """Device time for `n` independent encrypted operations that took `host_seconds` each on the
        measuring host, one per core at a time."""
        rounds = -(-n // (cores or self.cores))
        return rounds * host_seconds / self.he_core_speed

    def verify_seconds(self, nbytes: int) -> float:
        """One signature check and a hash of `nbytes`."""
        return self.ed25519_verify_s + nbytes / self.sha256_bytes_per_s


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
            sha256_bytes_per_s=100e6,  # 1.5 GHz / 15 cycles per byte: the BCM2711 has no crypto extensions
            ed25519_verify_s=0.33e-3,  # 500k cycles at 1.5 GHz
            he_core_speed=0.16,
        ),
        DeviceProfile(
            name="jetson_nano",
            description="NVIDIA Jetson Nano: 128-core Maxwell GPU, 472 GFLOPS FP16 (236 GFLOPS FP32) peak; "
            "one GPU counted as one core",
            cores=1,
            gflops_per_core=236.0,
            efficiency=0.15,
            batch_overhead_s=2.0e-3,
            sha256_bytes_per_s=700e6,  # 4x Cortex-A57 at 1.43 GHz with the ARMv8 SHA instructions, 2 cycles/byte
            ed25519_verify_s=0.35e-3,  # 500k cycles at 1.43 GHz
            he_core_speed=0.14,  # its Cortex-A57 CPU cores: the GPU does not run SEAL
        ),
        DeviceProfile(
            name="edge_server_8core",
            description="8-core x86 edge server at 2.5 GHz with AVX2 FMA (2 x 8 FP32 x 2 = 32 FLOP/cycle/core "
            "-> 80 GFLOPS/core peak)",
            cores=8,
            gflops_per_core=80.0,
            efficiency=0.10,
            batch_overhead_s=0.2e-3,
            sha256_bytes_per_s=1.25e9,  # SHA-NI, 2 cycles/byte at 2.5 GHz
            ed25519_verify_s=0.06e-3,  # 150k cycles at 2.5 GHz
        ),
    )
}
