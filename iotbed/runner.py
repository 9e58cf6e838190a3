"""Run a scenario in simulation: prepare data and models, build the deployment, advance the clock, and
write the results (`scenario.resolved.yaml`, `trace.parquet`, `summary.json`, `links.csv`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from iotbed.analysis.backdoor import backdoor_sections, screened_frames
from iotbed.analysis.security import security_section
from iotbed.analysis.summary import simulated_shaping, summarise, tcp_section
from iotbed.defenses.reject import STRIP_SCORE_OVERLAYS
from iotbed.deployment import Artefacts, BackdoorInUpdate, Deployment, HeArtefacts, build_deployment
from iotbed.errors import IotbedError, ModelError, ScenarioError
from iotbed.naming import group_of, update_version
from iotbed.nodes.camera import Camera
from iotbed.nodes.edge_server import EdgeServer
from iotbed.nodes.payloads import ModelUpdate
from iotbed.nodes.registry import ScheduledUpdate
from iotbed.run_tables import RunTables
from iotbed.scenario import Scenario, TrainSpec, resolved_yaml
from iotbed.sim.rng import RandomStreams
from iotbed.sim.trace import model_events_table
from iotbed.tabulate import sim_tables, tcp_rows

# Frames still travelling when cameras stop get this long to arrive before the run ends.
DRAIN_S = 5.0


@dataclass
class RunResult:
    scenario: Scenario
    summary: dict[str, Any]
    trace_table: pa.Table
    out_dir: Path | None

    @property
    def trace(self) -> pd.DataFrame:
        return self.trace_table.to_pandas()


def _train_config(spec: TrainSpec, arch: str, dataset_name: str):  # type: ignore[no-untyped-def]
    from iotbed.models import default_train_config

    base = default_train_config(arch, dataset_name)
    return dataclasses.replace(base, **{k: v for k, v in spec.model_dump().items() if v is not None})


def prepare(scenario: Scenario, *, progress: bool = True) -> tuple[Scenario, Artefacts, dict[str, Any]]:
    """Load the dataset and train (or fetch from the cache) the models; returns the scenario with every
    training setting filled in, the artefacts, and what to report about the model. Torch runs on one thread,
    as in the run: small-batch training on two threads fell from 24 to 1.6 batches a second with another job
    on the second core."""
    with one_torch_thread():
        return _prepare(scenario, progress)


def _prepare(scenario: Scenario, progress: bool) -> tuple[Scenario, Artefacts, dict[str, Any]]:
    from iotbed.data import load_splits
    from iotbed.models import count_flops, get_or_train, model_to_bytes

    ds = scenario.dataset
    splits = load_splits(ds.name, ds.path, seed=ds.split_seed, image_size=ds.image_size)
    arch = scenario.model.arch
    config = _train_config(scenario.model.train, arch, ds.name)
    pool, train = hold_out_clean_pool(scenario, splits.train)
    trained = get_or_train(arch, train, config, test_ds=splits.test, progress=progress)
    filled_train = TrainSpec(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        augmentation=config.augmentation,
        seed=config.seed,
    )
    image_shape = tuple(int(x) for x in splits.test.images.shape[1:])
    updates = []
    backdoors: dict[int, BackdoorInUpdate] = {}
    for i, update in enumerate(scenario.registry.updates):
        update_config = _train_config(update.train, arch, ds.name)
        if update.backdoor is None:
            updated = get_or_train(arch, train, update_config, test_ds=splits.test, progress=progress)
        else:
            badnet = _train_badnet(i, update.backdoor, arch, train, update_config, splits.test, progress)
            updated = badnet.trained
            frame_triggers = _frame_triggers(scenario.seed, i, len(splits.test), badnet.trigger)
            backdoors[update_version(i)] = BackdoorInUpdate(
                i, badnet.trigger, badnet.target, badnet.model, badnet.source_classes, frame_triggers
            )
        blob = model_to_bytes(updated.model, {"version": str(update_version(i))})
        updates.append(ScheduledUpdate(update.at, ModelUpdate(update_version(i), blob), update.publisher))
    cloud_models = {}
    for group in scenario.nodes.clouds:  # a cloud's own model, where it names one
        if group.model is not None:
            cloud_config = _train_config(group.model.train, group.model.arch, ds.name)
            cloud = get_or_train(group.model.arch, train, cloud_config, test_ds=splits.test, progress=progress)
            cloud_models[group.name] = (cloud.model, float(count_flops(cloud.model, (1, *image_shape))))
    gamblers = {
        group.name: _gambler(group.name, group.reject.gambler, arch, train, progress)
        for group in scenario.nodes.edge_servers
        if group.reject is not None and group.reject.score == "gambler"
    }
    guards = {
        group.name: _defed_guard(group.name, group.defed, group.input_defenses, trained.model, train, pool, progress)
        for group in scenario.nodes.edge_servers
        if group.defed is not None
    }
    resolved = scenario.model_copy(update={"model": scenario.model.model_copy(update={"train": filled_train})})
    flops = count_flops(trained.model, (1, *image_shape))
    # Cameras send 8-bit pixels; the edge classifies exactly those, in simulation as on a real broker.
    captured = (splits.test.images * 255.0).round() / 255.0
    adversarial, bare_correct = craft_attacks(
        resolved, trained.model, captured, splits.test.labels, progress, backdoors, guards
    )
    conditions = camera_conditions(resolved, captured)
    if conditions:
        from iotbed.attacks.crafting import bare_predictions

        truth = splits.test.labels.numpy()
        for label, seen in conditions.items():  # the undefended reference under each condition
            bare_correct[f"@{label}"] = bare_predictions(trained.model, torch.from_numpy(seen)) == truth
    he = _he_artefacts(resolved, trained, captured)
    artefacts = Artefacts(
        captured,
        splits.test.labels.numpy(),
        trained.model,
        float(flops),
        tuple(updates),
        adversarial,
        bare_correct,
        backdoors,
        pool,
        conditions,
        cloud_models,
        he,
        gamblers,
        guards,
    )
    model_info = {
        "arch": trained.arch,
        "cache_key": trained.key,
        "test_accuracy": trained.test_accuracy,
        "flops_per_image": flops,
        "dataset": ds.name,
        "train_images": len(train),
        "held_out_clean_images": len(pool) if pool is not None else 0,
        "test_images": len(splits.test),
    }
    return resolved, artefacts, model_info


def edge_detection(trace: pa.Table, classifiers: dict[str, Any]) -> dict[str, Any]:
    """What the edges' detectors (Defed) flagged: the share of clean and of each attack's delivered frames, and
    for each attack FAR at preset FRRs (thresholds from the detection scores of the clean calibration images,
    never scored) and AUROC against the clean frames. Over the frames the given edges classified."""
    from iotbed.analysis.detection import FRR_PRESETS, detection_report

    if not classifiers:
        return {}
    edge = trace.column("edge").to_numpy(zero_copy_only=False)
    rows = np.isin(edge, list(classifiers)) & (trace.column("status").to_numpy(zero_copy_only=False) == "delivered")
    score = trace.column("detect_score").to_numpy()
    detected = trace.column("detected").to_numpy(zero_copy_only=False)
    attack = trace.column("attack").to_numpy(zero_copy_only=False)
    condition = trace.column("condition").to_numpy(zero_copy_only=False)
    clean = rows & (attack == "") & (condition == "")
    # Low = trojaned in the detection report's convention: negate (a Defed score above 1 is flagged).
    calibration = -next(iter(classifiers.values())).guard.calibration_scores()

    def share(mask: np.ndarray) -> float | None:
        return float(detected[mask].mean()) if mask.any() else None

    by_attack: dict[str, Any] = {}
    for label in sorted(set(attack[rows].tolist()) - {""}):
        hit = rows & (attack == label)
        entry: dict[str, Any] = {"frames": int(hit.sum()), "flag_rate": share(hit)}
        if clean.any():
            entry["report"] = detection_report(
                calibration, -score[clean], -score[hit], FRR_PRESETS, method="quantile"
            ).as_dict()
        by_attack[label] = entry
    return {"clean": {"frames": int(clean.sum()), "flag_rate": share(clean)}, "by_attack": by_attack}


def _defed_guard(
    group: str, spec: Any, input_defenses: list[Any], model: Any, train: Any, pool: Any, progress: bool
) -> Any:
    """An edge's Defed: denoisers trained (or from the cache) through the model on the training split, thresholds
    fitted on held-out clean images that are never scored, as the edge's other defenses leave them."""
    from iotbed.defenses.defed import DefedConfig, DefedError, prepare_defed
    from iotbed.defenses.pipeline import build_chain
    from iotbed.nodes.classifier import Guard

    n = min(spec.calibration, len(pool))
    images = pool.images[:n]
    chain = build_chain(input_defenses)
    if chain.stages:  # Defed sees frames after the edge's other defenses: calibrate on what it will see
        with torch.no_grad():
            images = chain(images, torch.Generator().manual_seed(spec.seed))
    labels = pool.labels[:n] if spec.calibrate_on == "correct" else None
    try:
        config = DefedConfig(
            tuple(spec.noise_levels),
            spec.edge,
            spec.k,
            spec.variant,
            spec.alpha,
            spec.epochs,
            spec.batch_size,
            spec.lr,
            spec.seed,
        )
        ensemble = prepare_defed(model, train, images, config, calibration_labels=labels, progress=progress)
    except DefedError as exc:
        raise ScenarioError(f"edge server group {group!r}, `defed`: {exc}") from None
    return Guard(ensemble, images, labels)


def _gambler(group: str, spec: Any, arch: str, train: Any, progress: bool) -> Any:
    """The Deep Gamblers network an edge's `gambler` reject score runs, trained on the models' training split."""
    from iotbed.defenses.gambler import GamblerConfig, GamblerError, get_or_train_gambler

    try:
        config = GamblerConfig(spec.reward, spec.epochs, spec.pretrain_epochs, spec.seed)
        return get_or_train_gambler(arch, train, config, progress=progress)
    except GamblerError as exc:
        raise ScenarioError(f"edge server group {group!r}, `reject.gambler`: {exc}") from None


def _he_artefacts(scenario: Scenario, trained: Any, captured: torch.Tensor) -> HeArtefacts | None:
    """The served model compiled for the cameras' CKKS parameters, and its measured cost (cached)."""
    privacy = next((c.privacy for c in scenario.nodes.cameras if c.privacy is not None), None)
    if privacy is None:
        return None
    from iotbed.models.cache import resolve_cache_dir
    from iotbed.privacy.costs import cached_costs
    from iotbed.privacy.encrypted_cnn import EncryptedCnn, logit_divisor
    from iotbed.privacy.interactive import InteractiveCnn

    with torch.inference_mode():  # the largest logit the served model gives the images cameras capture
        peak = max(float(trained.model(chunk).abs().max()) for chunk in captured.split(1024))
    try:
        net = EncryptedCnn(trained.model, privacy.params(), logit_divisor(peak))
        if privacy.mode == "interactive":
            net = InteractiveCnn(net)  # type: ignore[assignment]
    except ModelError as exc:
        raise ScenarioError(f"{scenario.name}: `privacy:` {exc}") from None
    costs, path = cached_costs(net, captured[:4].numpy(), trained.key, resolve_cache_dir())
    return HeArtefacts(net, costs, str(path))


def build_trigger(spec: Any, image_shape: tuple[int, int, int]) -> Any:
    from iotbed.attacks.backdoor import Trigger

    if spec.kind == "patch":
        return Trigger.patch(
            image_shape, size=spec.size, corner=spec.corner, margin=spec.margin, style=spec.style, alpha=spec.alpha
        )
    return Trigger.random_pattern(image_shape, torch.Generator().manual_seed(spec.seed), alpha=spec.alpha)


def build_backdoor_trigger(spec: Any, image_shape: tuple[int, int, int]) -> Any:
    """A `backdoor:` entry's trigger: a Trigger, or a MultiTrigger for `triggers:` (names made unique, as the
    summary reports each trigger's figures under its name)."""
    from iotbed.attacks.backdoor import MultiTrigger

    if spec.trigger is not None:
        return build_trigger(spec.trigger, image_shape)
    parts = [build_trigger(t, image_shape) for t in spec.triggers]
    names = [p.name for p in parts]
    unique = [name if names.count(name) == 1 else f"{name}#{k}" for k, name in enumerate(names)]
    return MultiTrigger(tuple(dataclasses.replace(p, name=n) for p, n in zip(parts, unique, strict=True)))


def _train_badnet(index: int, spec: Any, arch: str, train: Any, config: Any, test: Any, progress: bool) -> Any:
    """Registry update `index`'s BadNet, trained (or fetched from the model cache) as its `backdoor:` says."""
    from iotbed.attacks.backdoor import BackdoorError, train_badnet

    image_shape = tuple(int(x) for x in test.images.shape[1:])
    try:
        return train_badnet(
            arch,
            train,
            build_backdoor_trigger(spec, image_shape),
            spec.target,
            spec.ratio,
            config,
            poison_seed=spec.poison_seed,
            test_ds=test,
            progress=progress,
            source_classes=spec.source_classes,
            cover_ratio=spec.effective_cover_ratio,
        )
    except BackdoorError as exc:
        raise ScenarioError(f"registry update {index}, `backdoor:`: {exc}") from None


def _frame_triggers(seed: int, update_index: int, n_images: int, trigger: Any) -> np.ndarray | None:
    """With several triggers, which one each test image shows when a camera stamps it: a balanced random
    assignment drawn from the scenario's seed, fixed per image so the trace's image index tells it."""
    from iotbed.attacks.backdoor import MultiTrigger

    if not isinstance(trigger, MultiTrigger):
        return None
    order = torch.randperm(n_images, generator=RandomStreams(seed).torch_generator("frame_triggers", str(update_index)))
    return (order % len(trigger.parts)).numpy()


def hold_out_clean_pool(scenario: Scenario, train: Any) -> tuple[Any, Any]:
    """(the defenders' clean labelled images, what the models train on). STRIP's overlays and calibration
    and CoDefend's D_valid must be clean data no model was trained on, like the frames the cameras send:
    a fixed random part of the training split is held out when a gateway screens or an edge repairs
    (else (None, train) and nothing changes). A model memorises its training images, so calibrating STRIP
    on them put the boundary where a clean update's own frames were flagged."""
    sizes = [g.strip.calibration + g.strip.n_blends for g in scenario.nodes.gateways if g.strip is not None]
    sizes += [
        g.sentinet.calibration + g.sentinet.backgrounds for g in scenario.nodes.gateways if g.sentinet is not None
    ]
    sizes += [e.repair.clean_images for e in scenario.nodes.edge_servers if e.repair is not None]
    sizes += [e.defed.calibration for e in scenario.nodes.edge_servers if e.defed is not None]
    sizes += [
        e.reject.calibration + (STRIP_SCORE_OVERLAYS if e.reject.score == "strip" else 0)
        for e in scenario.nodes.edge_servers
        if e.reject is not None
    ]
    if not sizes:
        return None, train
    n = max(sizes)
    if n > len(train) // 2:
        raise IotbedError(
            f"the defenders' clean pool ({n} images for `strip:`/`repair:`/`reject:`) would take more than half of "
            f"the {len(train)} training images of {scenario.dataset.name}; ask for fewer"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(scenario.dataset.split_seed))
    pool = train.subset(order[:n])
    return dataclasses.replace(pool, source=f"{train.source} [held out: defenders' clean pool]"), train.subset(
        order[n:]
    )


def craft_attacks(
    scenario: Scenario,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    progress: bool,
    backdoors: dict[int, BackdoorInUpdate] | None = None,
    guards: dict[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every attack's adversarial images (on the model the edge starts with, behind its Defed where it has
    one), and the bare model's verdicts on the clean images and on each attack's oblivious images (a black-box
    attack's, which always queried the deployed decision)."""
    from iotbed.attacks.crafting import bare_predictions, craft
    from iotbed.defenses.pipeline import build_chain

    truth = labels.numpy()
    bare_correct = {"": bare_predictions(model, images) == truth}
    adversarial: dict[str, np.ndarray] = {}
    if not scenario.attacks:
        return adversarial, bare_correct
    num_classes = int(labels.max()) + 1
    edge = scenario.nodes.edge_servers[0]
    cameras = {g.name: g for g in scenario.nodes.cameras}
    triggers = {b.update_index: b for b in (backdoors or {}).values()}
    for spec in scenario.attacks:
        if spec.kind == "trigger":  # cameras show the trigger of a backdoored update: stamped 8-bit images
            stamped = (triggers[spec.update].stamp(images) * 255.0).round() / 255.0
            adversarial[spec.label] = stamped.numpy().astype(np.float32)
            bare_correct[spec.label] = bare_predictions(model, stamped) == truth
            continue
        codec = cameras[scenario.camera_groups_of(spec)[0]].codec if scenario.nodes.cameras else None
        # What an adaptive attacker crafts through: the edge's defenses, with the camera's drop if it drops.
        dropping = codec is not None and codec.kind == "pixel_drop"
        chain = build_chain(
            edge.input_defenses,
            drop_window=codec.window if dropping else None,  # type: ignore[union-attr]
            drop_rate=codec.rate if dropping else None,
        )  # type: ignore[union-attr]
        guard = (guards or {}).get(edge.name)
        defed = guard.ensemble if guard is not None else None
        where = f"attack {spec.label!r}"
        if spec.detector_aware and defed is None:
            raise ScenarioError(f"{where}: detector_aware needs Defed in edge {edge.name!r}'s defenses")
        if spec.adaptive and defed is not None and chain.stages:
            raise ScenarioError(
                f"{where}: adaptive crafting through Defed behind other input defenses is not supported; give edge "
                f"{edge.name!r} Defed alone, or use a black-box method (square, hopskipjump), which queries them all"
            )
        settings = {"chain": chain, "seed": spec.seed, "num_classes": num_classes, "progress": progress, "defed": defed}
        oblivious = craft(spec, model, images, labels, adaptive=False, **settings)
        bare_correct[spec.label] = bare_predictions(model, oblivious) == truth
        used = craft(spec, model, images, labels, **settings) if spec.adaptive else oblivious
        adversarial[spec.label] = used.numpy().astype(np.float32)
    return adversarial, bare_correct


def camera_conditions(scenario: Scenario, captured: torch.Tensor) -> dict[str, np.ndarray]:
    """Every test image as seen under each camera condition the scenario uses, on the cameras' 8-bit grid;
    random draws (noise, fog, rain, blur angles, geometric signs) come from the scenario's seed."""
    from iotbed.data.corruptions import corrupt

    streams = RandomStreams(scenario.seed)
    out: dict[str, np.ndarray] = {}
    for spec in (c for g in scenario.nodes.cameras for c in g.conditions):
        if spec.label not in out:
            seen = corrupt(captured, spec.kind, spec.severity, streams.torch_generator("condition", spec.label))
            out[spec.label] = ((seen * 255.0).round() / 255.0).numpy().astype(np.float32)
    return out


def load_model_bytes(blob: bytes) -> torch.nn.Module:
    from iotbed.models import model_from_bytes

    return model_from_bytes(blob)[0]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Edge batches are small (a few frames): torch's thread hand-offs then cost more than they save, and
    on a loaded machine far more (27 s against 0.6 s for one test run with a second process busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def simulate(deployment: Deployment, until_s: float, progress: bool, label: str) -> None:
    """Advance the clock to `until_s` in steps, with a progress bar in simulated seconds."""
    with one_torch_thread():
        _advance(deployment, until_s, progress, label)


def _advance(deployment: Deployment, until_s: float, progress: bool, label: str) -> None:
    env = deployment.env
    steps = 100
    with tqdm(
        total=steps,
        desc=label,
        disable=not progress,
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]",
    ) as bar:
        for i in range(1, steps + 1):
            env.run(until=until_s * i / steps)
            bar.set_postfix_str(
                f"{env.now:.1f}/{until_s:.1f} sim-s, {len(deployment.recorder.records)} frames", refresh=False
            )
            bar.update(1)


def run(
    scenario: Scenario,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    write: bool = True,
    force: bool = False,
    on_status: Callable[[str], None] | None = None,
) -> RunResult:
    """Run `scenario` in simulation and return its summary and trace; with `write`, also write the files."""
    wall_start = time.perf_counter()
    target = output_dir(scenario, out_dir, force) if write else None
    resolved, artefacts, model_info = prepare(scenario, progress=progress)
    if on_status is not None:
        on_status(f"model {model_info['arch']}: test accuracy {model_info['test_accuracy']:.4f}")
    deployment = build_deployment(resolved, artefacts, load_model_bytes)
    sim_end = resolved.duration + DRAIN_S
    simulate(deployment, sim_end, progress, resolved.name)
    tables = sim_tables(deployment, artefacts)
    summary = summarise(
        tables,
        scenario_name=resolved.name,
        seed=resolved.seed,
        duration_s=resolved.duration,
        sim_end_s=sim_end,
        wall_time_s=time.perf_counter() - wall_start,
        model_info=model_info,
        cameras=len(deployment.nodes.cameras),
        reference=reference_column(tables.trace, artefacts),
        setup=setup_summary(resolved, deployment.nodes.cameras, deployment.nodes.edges, tables),
    )
    sections, extra = attack_outputs(tables, resolved)
    summary.update(sections)
    summary["shaping"] = simulated_shaping(resolved.broker.transport)
    connections = tcp_rows(deployment)
    if connections:
        summary["tcp"] = tcp_section(connections)
        extra["tcp.csv"] = connections
    if artefacts.he is not None:
        summary["privacy"] = privacy_summary(tables.trace, artefacts, deployment.nodes.cameras, deployment.nodes.edges)
    if target is not None:
        write_outputs(target, resolved, tables, summary, deployment.monitor.rows, extra)
    return RunResult(resolved, summary, tables.trace, target)


def attack_outputs(tables: RunTables, scenario: Scenario) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The summary's `backdoor`, `detection` and `security` sections, and `strip_screens.csv` where gateways
    screened."""
    sections = backdoor_sections(tables, scenario)
    security = security_section(tables, scenario)
    if security is not None:
        sections["security"] = security
    screening = any(g.screen is not None for g in scenario.nodes.gateways)
    extra = {"strip_screens.csv": screened_frames(tables, scenario)} if screening else {}
    return sections, extra


def privacy_summary(trace: pa.Table, artefacts: Artefacts, cameras: list[Any], edges: list[Any]) -> dict[str, Any]:
    """The `privacy` section, with the plaintext model's prediction on every encrypted frame's image."""
    from iotbed.analysis.privacy import privacy_section
    from iotbed.nodes.payloads import raw_frame_bytes

    index, key = captured_keys(trace)
    plain = np.full(len(index), -1, dtype=np.int64)
    with torch.inference_mode():
        for label in np.unique(key).tolist():
            rows = key == label
            source = (
                artefacts.conditions[label[1:]]
                if label.startswith("@")
                else artefacts.adversarial[label]
                if label
                else artefacts.images.numpy()
            )
            batch = torch.from_numpy(np.asarray(source[index[rows]], dtype=np.float32))
            plain[rows] = artefacts.model(batch).argmax(dim=1).numpy()
    shape = tuple(int(x) for x in artefacts.images.shape[1:])
    return privacy_section(trace, cameras, edges, artefacts.he, plain, raw_frame_bytes(shape))


def captured_keys(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, its dataset image index and which version of it the camera captured: the attack's label for
    an attacked frame, "@" and the condition's label for one captured under a condition ("@fog-3"), else ""."""
    index = table.column("image_index").to_numpy()
    attack = table.column("attack").to_numpy(zero_copy_only=False)
    condition = table.column("condition").to_numpy(zero_copy_only=False)
    return index, np.where(attack != "", attack, np.where(condition != "", "@" + condition.astype(object), ""))


def reference_column(table: pa.Table, artefacts: Artefacts) -> np.ndarray:
    """Per frame: does the bare model classify the frame's image right (the attack's oblivious version for an
    attacked frame, the image as a camera condition made it)? 1.0/0.0, NaN for a frame two attackers changed
    (no single reference)."""
    index, key = captured_keys(table)
    out = np.full(len(index), np.nan)
    for label, correct in artefacts.bare_correct.items():
        rows = key == label
        out[rows] = correct[index[rows]]
    return out


def setup_summary(
    scenario: Scenario, cameras: list[Camera], edges: list[EdgeServer], tables: RunTables
) -> dict[str, Any]:
    """What the summary reports about codecs, defenses and attacks, next to the figures they explain."""
    from iotbed.codecs.pixel_drop import real_drop_rate
    from iotbed.nodes.payloads import raw_frame_bytes

    shape = cameras[0].image_shape if cameras else None
    codecs: dict[str, Any] = {}
    for group in scenario.nodes.cameras:
        camera = next(c for c in cameras if group_of(c.name) == group.name)
        entry: dict[str, Any] = {"kind": group.codec.kind, "payload_bytes": camera.payload_bytes}
        if shape is not None:
            entry["raw_payload_bytes"] = raw_frame_bytes(shape)
        if group.codec.kind == "pixel_drop" and shape is not None:
            entry.update(
                window=group.codec.window,
                mask=group.codec.mask,
                nominal_rate=group.codec.rate,
                real_rate=real_drop_rate(shape[1], shape[2], group.codec.window, group.codec.rate),
            )
        codecs[group.name] = entry
    defenses = {
        edge.name: {
            "stages": edge.classifier.defense.params()["stages"] if edge.classifier.defense is not None else [],
            "defense_flops_per_image": edge.classifier.defense_flops,
            "model_flops_per_image": edge.classifier.model_flops,
            **(
                {
                    "reject": dataclasses.asdict(edge.reject)
                    | {
                        "escalates": edge.config.escalate_qos is not None,
                        "to": edge.config.escalate_to if edge.config.escalate_qos is not None else None,
                        "score_flops_per_image": edge.classifier.score_flops,
                    }
                }
                if edge.reject is not None
                else {}
            ),
            **({"defed": _defed_setup(edge.classifier)} if edge.classifier.guard is not None else {}),
        }
        for edge in edges
    }
    attacks = {
        spec.label: {
            "kind": spec.kind,
            "method": spec.method,
            "eps": spec.eps if spec.method not in ("cw_l2", "deepfool") else None,
            "norm": spec.norm,
            "crafted": "adaptive (BPDA" + (f" + EOT over {spec.eot_samples} draws)" if spec.eot_samples > 1 else ")")
            if spec.adaptive
            else "oblivious (bare model)",
            "frames_attacked": tables.frames_attacked(spec.label),
        }
        for spec in scenario.attacks
    }
    detection = edge_detection(tables.trace, {e.name: e.classifier for e in edges if e.classifier.guard is not None})
    return {
        "codecs": codecs,
        "defenses": defenses,
        "attacks": attacks,
        **({"edge_detection": detection} if detection else {}),
    }


def _defed_setup(classifier: Any) -> dict[str, Any]:
    """An edge's Defed as it started the run: its denoisers, thresholds and what it adds per frame."""
    ensemble = classifier.guard.ensemble
    return {
        "noise_levels": list(ensemble.noise_levels or ()),
        "denoiser": type(ensemble.denoisers[0]).__name__,
        "thresholds": ensemble.thresholds.to_dict() if ensemble.thresholds is not None else None,
        "flops_per_image": classifier.guard_flops,
    }


def output_dir(scenario: Scenario, out_dir: str | Path | None, force: bool) -> Path:
    return results_folder(out_dir, scenario.name, force)


def results_folder(out_dir: str | Path | None, name: str, force: bool, error: type[IotbedError] = IotbedError) -> Path:
    """`out_dir`, or runs/<name>-<timestamp>/; refuses a path that is a file, or a folder that already holds
    files unless `force`. Nothing is created yet."""
    if out_dir is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path("runs") / f"{name}-{stamp}"
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise error(f"--out {path}: exists and is not a folder; choose another path")
    if path.exists() and any(path.iterdir()) and not force:
        raise error(
            f"--out {path}: the folder already holds results; choose a new folder or pass --force to replace them"
        )
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    # Write beside the target and rename, so an interrupted run never leaves a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(
    target: Path,
    scenario: Scenario,
    tables: RunTables,
    summary: dict[str, Any],
    link_series: list[dict[str, Any]],
    extra_csv: dict[str, list[dict[str, Any]]] | None = None,
) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IotbedError(f"--out {target}: cannot create the folder ({exc})") from None
    atomic_write(target / "scenario.resolved.yaml", lambda p: p.write_text(resolved_yaml(scenario), encoding="utf-8"))
    atomic_write(target / "trace.parquet", lambda p: pq.write_table(tables.trace, p, compression="zstd"))
    atomic_write(target / "links.csv", lambda p: pd.DataFrame(tables.links).to_csv(p, index=False))
    atomic_write(target / "links_timeseries.csv", lambda p: pd.DataFrame(link_series).to_csv(p, index=False))
    atomic_write(
        target / "model_events.csv",
        lambda p: model_events_table(tables.model_events).to_pandas().to_csv(p, index=False),
    )
    for name, rows in (extra_csv or {}).items():
        atomic_write(target / name, lambda p, rows=rows: pd.DataFrame(rows).to_csv(p, index=False))
    # summary.json last: its presence marks a complete run (sweeps resume on it)
    atomic_write(
        target / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    )
