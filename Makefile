# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test lint format bench bench-ml reproduce-backdoor superiot-table he-table corruption-table selective-table defed-table defed-leak defed-masking tcp-validation fuzz clean

setup: $(STAMP)

# torch first, from its CPU wheel, so pip does not pull gigabytes of CUDA packages for it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/iotbed run scenarios/quickstart.yaml

# The live-broker tests need Debian's Mosquitto, the kernel-shaping tests iproute2 (ip, tc) and the report
# test Debian's Chromium: install them when missing (as root, or with sudo).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto mosquitto-clients"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v tc >/dev/null 2>&1 || [ -x /usr/sbin/tc ] || missing="$$missing iproute2"; \
	command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing="$$missing nftables"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get) for the tests"; \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# The formatter and linter keep the style (settings in pyproject.toml); `make format` applies them.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# IOTBED_REQUIRE_MOSQUITTO turns the broker tests' skip (no mosquitto) into a failure.
test: setup system-deps lint
	IOTBED_REQUIRE_MOSQUITTO=1 $(VENV)/bin/pytest -q

bench: setup system-deps
	$(PY) benchmarks/run.py

# The ML benchmarks (recovery, attacks against torchattacks, STRIP, CoDefend). torchattacks declares
# torchvision and an unpinned torch, which would replace the CPU wheel: it goes in without its dependencies.
bench-ml: setup
	$(PY) -m pip install --quiet requests scikit-image
	$(PY) -m pip install --quiet --no-deps torchattacks
	$(PY) -m pip install --quiet adversarial-robustness-toolbox
	$(PY) benchmarks/bench_recovery.py
	$(PY) benchmarks/bench_attacks.py
	$(PY) benchmarks/bench_strip.py
	$(PY) benchmarks/bench_codefend.py
	$(PY) benchmarks/run.py square_vs_art hsj_vs_art

# BadNets, STRIP, CoDefend, Neural Cleanse and fine-pruning on MNIST and GTSRB next to the published tables
# (benchmarks/results/reproduce_backdoor.md; tens of minutes on 2 cores).
reproduce-backdoor: setup
	$(PY) benchmarks/reproduce_backdoor.py

# SUPER-IoT and the baseline input transforms (JPEG, squeezing, median, pixel deflection) on MNIST and GTSRB: clean,
# oblivious and adaptive (BPDA, BPDA+EOT) accuracy and bytes per frame (benchmarks/results/superiot_table.md;
# about 16 min on 2 cores, under 2 min when the adversarial examples are cached).
superiot-table: setup
	$(PY) benchmarks/superiot_table.py

# Encrypted inference (CKKS) on MNIST: plaintext against encrypted accuracy on all 2,000 test images of iotbed's split,
# time per stage, ciphertext and key sizes, iotbed's EncryptedCnn against TenSEAL's tutorial evaluation, next to the
# published figures (benchmarks/results/he_table.md; about 15-20 min on 2 cores, about 2 min with the encrypted
# pass cached). Options: make he-table HE_ARGS='--images 200 --workers 2'.
he-table: setup
	$(PY) benchmarks/he_table.py $(HE_ARGS)

# Camera conditions (17 kinds x 5 severities: CIFAR-10-C, MNIST-C and iotbed's rain and dark) on MNIST and GTSRB:
# accuracy of the bare model and of each input defense, mean corruption accuracy, and the reject option's coverage
# and selective risk at 90% clean coverage (benchmarks/results/corruption_table.md; about 11 min on 2 cores).
# Options: make corruption-table CORRUPTION_ARGS='--quick --out /tmp/corruption-table'.
corruption-table: setup
	$(PY) benchmarks/corruption_table.py $(CORRUPTION_ARGS)

# The reject option's scores (msp, margin, entropy, Deep Gamblers, STRIP) on clean, corrupted and PGD frames of MNIST and
# GTSRB: AURC, E-AURC, selective risk at fixed coverages and at the clean 90% threshold, risk-coverage curves
# (benchmarks/results/selective_table.md; about 2 min on 2 cores). Options: make selective-table SELECTIVE_ARGS='--images 500'.
selective-table: setup
	$(PY) benchmarks/selective_table.py $(SELECTIVE_ARGS)

# Defed's denoiser ensemble (several noise-level pairs, k 2 and 3), its BaseNet ablation, SUPER-IoT and the input
# transforms under oblivious, adaptive (through the denoisers), detector-aware and black-box (Square, HopSkipJump)
# attacks on MNIST and GTSRB: accuracy, flag rate, detection AUROC, bytes and edge FLOPs per frame
# (benchmarks/results/defed_table.md; about 48 min on 2 busy shared cores, MNIST 21 and GTSRB 26, 12 of them training
# the denoisers and most of the rest attacking through them; about 5 min when the denoisers and attacks are cached).
# Options: make defed-table DEFED_ARGS='--datasets mnist --queries 100' (or '--quick --out /tmp/defed' to try it).
defed-table: setup
	$(PY) benchmarks/defed_table.py $(DEFED_ARGS)

# What the authors' threshold fit on the scored frames changes (their FRR in sample against new frames), on MNIST
# with defed-table's ensemble: benchmarks/results/defed_leak.md (a few minutes; reuses defed-table's denoisers).
defed-leak: setup
	$(PY) benchmarks/defed_leak.py $(LEAK_ARGS)

# Checks for masked gradients behind Defed's MNIST figures (budget sweep, Square, a binarising reference):
# benchmarks/results/defed_masking.md (about 15 minutes; reuses defed-table's denoisers).
defed-masking: setup
	$(PY) benchmarks/defed_masking.py $(MASKING_ARGS)

# The TCP model against the kernel's TCP at 0.1/1/5% loss, two bandwidths and two message sizes, over network
# namespaces with nftables loss (root; benchmarks/results/tcp_validation.md; about 12 minutes).
tcp-validation: setup system-deps
	$(PY) benchmarks/tcp_validation.py

# Every parser a client or a user can reach (scenario files, frames, pixel drop, model updates and the model
# loader, quarantine notices) gets 10000 generated or mutated inputs; crashes and hangs land in fuzz/findings/
# and fail the target (several minutes on 2 cores, most of them on the SEAL ciphertexts). Options: make fuzz FUZZ_ARGS='--n 300 --parsers frame'.
fuzz: setup
	$(PY) fuzz/run.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) .cache runs benchmarks/results
