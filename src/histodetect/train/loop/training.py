"""fit(config) -> run folder: the training loop, top to bottom.

Augmentation and normalisation run on whole batches on the device (the augment package);
train/batches.py brings the patches there, train/step.py holds the pieces of a step,
train/checkpoint.py writes what survives a kill.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...augment import augment_batch, check_blur_fits, mixup_batch, tta_view_counts
from ...data.store import MANIFEST_FILE, is_store, open_store
from ...errors import UserError
from ...models import create_model
from ...presets import (
    TrainConfig,
    check_config_types,
    check_train_config,
    parse_progressive_crop,
    scheduled_crop,
    training_crop_sizes,
)
from ..batches import DeviceBatches
from ..checkpoint import CHECKPOINT_FORMAT, RUN_FILE, load_checkpoint, package_versions, read_run, save_atomic, write_text_atomic
from ..device import bf16_is_fast, init_distributed, resolve_device
from ..step import build_optimizer, lr_factor, sam_second_pass, training_loss, validate
from .checks import RESUME_SETTINGS, _check_model_takes_crops, _class_rows
from .run_folder import METRICS_FILE, _check_run_folder, write_metrics_csv
from .stopping import StopRequests
from .thresholds import _validation_thresholds


@dataclass
class FitResult:
    run_dir: Path
    best_auc: float
    epochs_run: int
    stopped_because: str
    history: list[dict] = field(default_factory=list)  # metrics.csv's rows, one per epoch

    def __repr__(self) -> str:  # the dataclass's printed every epoch's metrics
        return (f"FitResult(run_dir={str(self.run_dir)!r}, best_auc={self.best_auc:.4f}, epochs_run={self.epochs_run}, "
                f"stopped_because={self.stopped_because!r}, history=[{len(self.history)} epochs])")


def fit(cfg: TrainConfig, data: Path, out: Path, *, overwrite: bool = False, resume: bool = False,
        preset: str | None = None, progress: bool = True, stop_after_epochs: int | None = None,
        resume_settings: dict | None = None) -> FitResult:
    """Train `cfg` on the store at `data`, writing the run folder `out`.

    With `resume`, `out`'s config and last checkpoint are loaded and training goes
    on exactly where it stopped (data order, optimizer, EMA, RNG, schedule); `data`
    may name the store where it is now (None: where it was; its fingerprint must
    match). A run that had stopped (time limit, early stopping) is only finished off.
    With `overwrite`, an earlier run at `out` is replaced once the new one has started.
    `stop_after_epochs` ends the process early as a kill would (tests use it).
    `resume_settings` changes RESUME_SETTINGS for a resumed run (e.g. a smaller
    val_batch_size after validation ran out of GPU memory). `cfg.threads` and `cfg.seed`
    hold while fit runs: torch's thread count and the random states of Python, numpy
    and torch (and CUDA's, where CUDA was in use before fit) are restored when it
    returns or raises, so that what a notebook runs next goes on as if fit had not run.

    Ctrl-C or SIGTERM while training (one process) saves last.pt at the end of the step
    and raises `errors.Interrupted`, a KeyboardInterrupt naming the command that goes
    on; a second one stops at once (train/loop/stopping.py).
    """
    threads = torch.get_num_threads()
    random_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    stop_requests = StopRequests(Path(out))
    group_before = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        return _fit(cfg, data, out, overwrite=overwrite, resume=resume, preset=preset, progress=progress,
                    stop_after_epochs=stop_after_epochs, resume_settings=resume_settings, stop_requests=stop_requests)
    finally:
        if not group_before and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The DDP group fit joined (init_distributed): left standing, gloo's threads met the
            # interpreter's exit, and one process of a finished run once died "terminate called
            # without an active exception" (SIGABRT). PyTorch asks for this call before exit.
            torch.distributed.destroy_process_group()
        stop_requests.restore()
        torch.set_num_threads(threads)
        random.setstate(random_states[0])
        np.random.set_state(random_states[1])
        torch.set_rng_state(random_states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _fit(cfg: TrainConfig | None, data: Path | None, out: Path, *, overwrite: bool, resume: bool,
         preset: str | None, progress: bool, stop_after_epochs: int | None, resume_settings: dict | None,
         stop_requests: StopRequests) -> FitResult:
    """fit() without restoring torch's thread count and the signal handlers."""
    out = Path(out)
    checkpoint = None
    if resume:
        run = read_run(out)
        last = out / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UserError(f"{out}: stopped before its first checkpoint; nothing to resume, "
                            f"start it again with --overwrite")
        checkpoint = load_checkpoint(last)
        if checkpoint["config"] != run["config"]:
            raise UserError(f"{last}: belongs to another run than {out / RUN_FILE}")
        saved_cfg = TrainConfig(**checkpoint["config"])
        unknown = sorted(set(resume_settings or {}) - set(RESUME_SETTINGS))
        if unknown:
            raise UserError(f"--resume: {', '.join(unknown)} would change what the run trains; a resume "
                            f"may only change {', '.join(RESUME_SETTINGS)}")
        # Only the types of what the resume changes: the rest were accepted when the run started
        # (epochs=2.0 was, before the types were checked).
        cfg = check_config_types(dataclasses.replace(saved_cfg, **(resume_settings or {})),
                                 names=set(resume_settings or ()))
        preset = run.get("preset")
        if data is None:
            data = Path(run["data"]["path"])
            if not is_store(data):  # open_store's fix, "make one with prepare", is the wrong one here
                raise UserError(f"{data}: not a histodetect store any more (no {MANIFEST_FILE}); if {out}'s "
                                "store moved, pass --data with where it is now")
        data = Path(data)
    else:
        if not isinstance(cfg, TrainConfig):
            raise UserError(f"cfg: expected a TrainConfig (e.g. preset_config('cpu', epochs=2)), found {type(cfg).__name__}")
        cfg = check_config_types(cfg)  # as Python's types: run.json and the checkpoints hold the config
        _check_run_folder(out, overwrite, {"--data": data, "--weights": cfg.weights or None})
        if cfg.weights:  # a resume may start from another folder
            cfg = dataclasses.replace(cfg, weights=str(Path(cfg.weights).resolve()))
        saved_cfg = cfg
    # Every setting is checked before anything is written.
    crop_stages = parse_progressive_crop(cfg.progressive_crop)
    augment_cfg = cfg.augment()
    if cfg.blur_sigma:  # the smallest training crop, before anything is written
        check_blur_fits(cfg.blur_sigma, min(training_crop_sizes(cfg)))
    check_train_config(cfg, resuming=resume)

    if resume:
        trained_on = checkpoint["rng"].get("device_type", "cuda" if checkpoint["rng"].get("cuda") is not None else "cpu")
        if trained_on == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{out}: was trained on cuda and can only be resumed exactly on cuda; "
                            "resume it on a machine with a CUDA GPU")
    dist = init_distributed("cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(cfg.device, dist)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = open_store(data)
    if resume and store.fingerprint != checkpoint["store_fingerprint"]:
        raise UserError(f"{data}: its content changed since {out} started (fingerprint differs); resume needs the same store")
    train_rows, val_rows, split_note = _class_rows(store, cfg)
    if split_note and dist.is_main:
        print(f"histodetect: note: {split_note}")
    shard = train_rows[dist.rank :: dist.world_size][: len(train_rows) // dist.world_size]

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # On resume the checkpoint holds the weights: the starting ones are neither read nor downloaded again.
    model = create_model(cfg.model, pretrained=cfg.pretrained and not resume,
                         weights=Path(cfg.weights) if cfg.weights and not resume else None, drop_rate=cfg.drop_rate,
                         input_size_px=max(training_crop_sizes(cfg)))
    _check_model_takes_crops(model, cfg)
    data_cfg = model.pretrained_cfg if hasattr(model, "pretrained_cfg") else {}
    mean = tuple(data_cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(data_cfg.get("std", (0.229, 0.224, 0.225)))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    optimizer = build_optimizer(cfg, model)
    batches = DeviceBatches(store, shard, device, cfg.batch_size, cfg.seed, cfg.resident_fraction)
    if batches.steps_per_epoch == 0:
        raise UserError(f"{data}: {len(shard)} training patches per process is fewer than --batch-size {cfg.batch_size}")
    aug_generator = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist.rank)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "train_seconds": 0.0,
             "best_auc": -1.0, "bad_epochs": 0, "history": []}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        state = checkpoint["state"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
        if len(checkpoint["rng"]["augment"]) != dist.world_size:
            raise UserError(f"{out}: was trained with {len(checkpoint['rng']['augment'])} processes; resume it with as many")
        # The augmentation generator lives on the training device: its state only fits that kind.
        if trained_on != device.type:
            raise UserError(f"{out}: was trained on {trained_on} and can only be resumed exactly on {trained_on} "
                            f"(this process has {device.type}); pass --device {trained_on} on a machine that has it")
        aug_generator.set_state(checkpoint["rng"]["augment"][dist.rank])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)

    train_model = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Static shapes: a progressive crop then compiles one graph per crop size (three
        # for `cpu`), where automatic dynamic shapes would compile a slower general one.
        train_model = torch.compile(train_model, dynamic=False)

    if dist.is_main:
        replaced = None
        if not resume and out.exists() and any(out.iterdir()):  # --overwrite: checked above
            # The old run (checkpoints, exports, reports) goes as a whole, so that nothing of
            # it is taken for the new run's; it is deleted once the new run.json is written.
            replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, replaced)
        out.mkdir(parents=True, exist_ok=True)
        device_record = {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "world_size": dist.world_size, "threads": torch.get_num_threads(),
            "bf16_autocast": cfg.bf16 and bf16_is_fast(device),
        }
        if resume:  # where and with what each resume ran: run.json's "device" is where the run started
            run = read_run(out)
            run.setdefault("resumes", []).append({
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_epoch": state["epoch"],
                "device": device_record, "settings": dict(resume_settings or {}), "versions": package_versions(),
            })
            write_text_atomic(out / RUN_FILE, json.dumps(run, indent=2) + "\n")
        else:
            write_text_atomic(out / RUN_FILE, json.dumps({
                "preset": preset,
                "config": asdict(saved_cfg),
                "data": {"path": str(Path(data).resolve()), "fingerprint": store.fingerprint,
                         "train_split": cfg.train_split, "val_split": cfg.val_split,
                         "n_train": int(len(train_rows)), "n_val": int(len(val_rows)), "note": split_note},
                "preprocessing": {"mean": mean, "std": std, "patch_size_px": 96, "crop_px": cfg.crop_px,
                                  "channels": "RGB", "input": "uint8 HWC -> float (x/255 - mean) / std"},
                "model": {"name": cfg.model, "parameters": sum(p.numel() for p in model.parameters())},
                "versions": package_versions(),
                "seed": cfg.seed,
                "device": device_record,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=2) + "\n")
        # On resume too: a kill after an epoch's row but before its last.pt left a row the
        # resumed run writes again; the checkpoint's history is the truth.
        write_metrics_csv(out / METRICS_FILE, state["history"])
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    total_steps = cfg.epochs * batches.steps_per_epoch
    max_seconds = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    bf16 = cfg.bf16 and bf16_is_fast(device)

    def progress_now() -> float:
        return max(state["global_step"] / total_steps, state["train_seconds"] / max_seconds)

    # A non-finite loss stops training before any checkpoint is written after it. On
    # the CPU each step's loss is checked before its update; on a GPU every 32 steps,
    # since each check waits for the GPU to finish all queued work (the CPU then
    # launches the next step onto an idle GPU), and before every save.
    loss_check_steps = 1 if device.type == "cpu" else 32
    recent_losses: list[tuple[int, int, torch.Tensor]] = []  # (global step, epoch, loss on the device)

    def stopped_because_non_finite(what: str) -> UserError:
        """The one-line error for a NaN or inf: what became so, and which checkpoint survives."""
        last = out / "checkpoints" / "last.pt"
        kept = f"{last} holds the last good weights" if last.is_file() else "no checkpoint had been written yet"
        return UserError(f"{out}: {what}; training stopped and {kept}; start again with a lower --lr and --overwrite")

    def check_losses() -> None:
        if not recent_losses:
            return
        values = torch.stack([loss for _, _, loss in recent_losses]).float().cpu()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            step, epoch = recent_losses[i][:2]
            raise stopped_because_non_finite(f"the loss became {values[i].item()} at step {step} (epoch {epoch + 1})")
        recent_losses.clear()

    def save_last() -> None:
        """Every process calls this (it gathers each one's augmentation RNG); rank 0 writes.

        Never weights an update has made non-finite: the losses checked so far were all
        computed before their updates, so the last update is checked here, on the weights.
        """
        params = [p.detach() for p in model.parameters()]
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
            raise stopped_because_non_finite(f"the weights became non-finite by step {state['global_step'] - 1} "
                                             f"(epoch {state['epoch'] + 1})")
        augment_states = [aug_generator.get_state()]
        if dist.world_size > 1:
            import torch.distributed as tdist

            # gloo and nccl gather tensors, not generator states of other devices: go through the device.
            mine = aug_generator.get_state().to(device)
            gathered = [torch.empty_like(mine) for _ in range(dist.world_size)]
            tdist.all_gather(gathered, mine)
            augment_states = [s.cpu() for s in gathered]
        if not dist.is_main:
            return
        save_atomic({
            "format": CHECKPOINT_FORMAT, "config": asdict(saved_cfg), "store_fingerprint": store.fingerprint,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "state": state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "augment": [s.cpu() for s in augment_states], "device_type": device.type,
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "preprocessing": {"mean": mean, "std": std, "crop_px": cfg.crop_px},
        }, out / "checkpoints" / "last.pt")

    # Under DDP with a time limit, the processes must agree on the time: it sets the
    # learning rate and the crop (replicas must not drift apart) and when to stop (all
    # at the same step, or one waits forever in a collective). They take the slowest
    # one's clock, every step on the CPU and every 32 on a GPU (each agreement waits
    # for the GPU); in between, the time (and so the schedule) stands still.
    agree_on_time = dist.world_size > 1 and math.isfinite(max_seconds)
    time_agreement_steps = 1 if device.type == "cpu" else 32
    unagreed_seconds = [0.0]

    def add_train_seconds(seconds: float, *, agree_now: bool) -> None:
        if not agree_on_time:
            state["train_seconds"] += seconds
            return
        unagreed_seconds[0] += seconds
        if agree_now:
            import torch.distributed as tdist

            latest = torch.tensor([state["train_seconds"] + unagreed_seconds[0]], dtype=torch.float64, device=device)
            tdist.all_reduce(latest, op=tdist.ReduceOp.MAX)
            state["train_seconds"] = float(latest)
            unagreed_seconds[0] = 0.0

    def out_of_memory_validating() -> UserError:
        smaller = f"--val-batch-size {max(1, cfg.val_batch_size // 2)}"
        # Epoch 1's validation comes before its last.pt: with no checkpoint there is nothing to resume.
        if (out / "checkpoints" / "last.pt").is_file():
            fix = f"continue with --resume {out} {smaller}"
        else:
            fix = f"no checkpoint had been written yet: start it again with --overwrite {smaller}"
        return UserError(f"{out}: out of GPU memory validating with --val-batch-size {cfg.val_batch_size} for "
                         f"{cfg.model}; {fix}")

    phase = "training"
    stopped_because = state.get("stopped_because") or "finished all epochs"
    if state.get("stopped_because") and dist.is_main:
        print(f"histodetect: note: {out} had stopped ({stopped_because}) after epoch {state['epoch']}; "
              "nothing more to train")
    epochs_this_process = 0
    last_checkpoint_time = time.perf_counter()
    if dist.world_size == 1:  # under DDP, torchrun's handling (module docstring of stopping.py)
        stop_requests.install()
    try:
        while state["epoch"] < cfg.epochs and not state.get("stopped_because"):
            epoch = state["epoch"]
            train_model.train()
            # Resumed mid-epoch: the epoch's loss so far comes from the checkpoint.
            mid_epoch = state["step_in_epoch"] > 0
            loss_sum = torch.full((), state.get("epoch_loss_sum", 0.0) if mid_epoch else 0.0, device=device)
            n_steps = state.get("epoch_steps", 0) if mid_epoch else 0
            steps_timed = 0
            bar = tqdm(total=batches.steps_per_epoch * cfg.batch_size * dist.world_size, initial=state["step_in_epoch"] * cfg.batch_size * dist.world_size,
                       unit="patch", unit_scale=True, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (progress and dist.is_main), leave=False)
            data_seconds = compute_seconds = 0.0
            tick = time.perf_counter()
            try:  # closed before an error is printed, which would land on the bar's line
                for patches, labels in batches.epoch(epoch, state["step_in_epoch"]):
                    if crop_stages:
                        crop_now = scheduled_crop(crop_stages, progress_now(), cfg.crop_px)
                        if crop_now != augment_cfg.crop_px:
                            augment_cfg = dataclasses.replace(augment_cfg, crop_px=crop_now)
                    x = augment_batch(patches, augment_cfg, mean, std, generator=aug_generator)  # (B, 3, H, W)
                    if cfg.mixup:
                        # The weight comes from numpy's global generator, which checkpoints restore.
                        x, labels = mixup_batch(x, labels, float(np.random.beta(cfg.mixup, cfg.mixup)))
                    if cfg.profile:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        data_done = time.perf_counter()
                        data_seconds += data_done - tick
                    for group in optimizer.param_groups:
                        group["lr"] = cfg.lr * lr_factor(progress_now(), cfg.warmup_fraction, cfg.schedule)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = train_model(x).float().reshape(-1)  # (B,)
                    loss = training_loss(logits, labels, cfg.label_smoothing)
                    recent_losses.append((state["global_step"], epoch, loss.detach()))
                    if len(recent_losses) >= loss_check_steps:
                        check_losses()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.sam_rho:
                        sam_second_pass(train_model, model, x, labels, cfg, bf16)
                    if cfg.grad_clip_norm:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                    optimizer.step()
                    if ema is not None:
                        ema.update(model, step=state["global_step"])
                    loss_sum += loss.detach()
                    n_steps += 1
                    steps_timed += 1
                    state["global_step"] += 1
                    state["step_in_epoch"] += 1
                    now = time.perf_counter()
                    if cfg.profile:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        now = time.perf_counter()
                        compute_seconds += now - data_done
                    add_train_seconds(now - tick, agree_now=state["global_step"] % time_agreement_steps == 0)
                    tick = now
                    bar.update(cfg.batch_size * dist.world_size)
                    if state["train_seconds"] >= max_seconds:
                        break
                    if stop_requests.signal_number is not None:
                        check_losses()
                        state["epoch_loss_sum"], state["epoch_steps"] = float(loss_sum), n_steps
                        save_last()
                        raise stop_requests.saved(f"after step {state['step_in_epoch']} of epoch {epoch + 1}")
                    # Mid-epoch saves need every process to agree on when: only without DDP.
                    if dist.world_size == 1 and now - last_checkpoint_time > cfg.checkpoint_minutes * 60:
                        check_losses()
                        state["epoch_loss_sum"], state["epoch_steps"] = float(loss_sum), n_steps
                        save_last()
                        last_checkpoint_time = time.perf_counter()
            finally:
                bar.close()
            check_losses()
            add_train_seconds(0.0, agree_now=True)
            out_of_time = state["train_seconds"] >= max_seconds
            if cfg.profile and dist.is_main and steps_timed:
                print(f"profile epoch {epoch + 1}: data {1000 * data_seconds / steps_timed:.1f} ms/step, "
                      f"compute {1000 * compute_seconds / steps_timed:.1f} ms/step "
                      f"({100 * data_seconds / max(1e-9, data_seconds + compute_seconds):.0f}% in data)")
            train_loss = float(loss_sum) / max(1, n_steps)
            if dist.world_size > 1:
                import torch.distributed as tdist

                reduced = torch.tensor([train_loss], device=device)
                tdist.all_reduce(reduced)
                train_loss = float(reduced) / dist.world_size
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            state["epoch_loss_sum"], state["epoch_steps"] = 0.0, 0
            eval_model = ema.module if ema is not None else model
            stop = torch.zeros(1, device=device)
            improved = False
            if dist.is_main:
                phase = "validating"
                metrics = {"epoch": state["epoch"], "train_loss": train_loss,
                           **validate(eval_model, store, val_rows, cfg, mean, std, device),
                           "lr": optimizer.param_groups[0]["lr"], "seconds": state["train_seconds"]}
                phase = "training"
                if not math.isfinite(metrics["val_loss"]):  # every loss was finite, the update after the last was not
                    raise stopped_because_non_finite(f"the weights became non-finite in epoch {epoch + 1}'s last "
                                                     f"update (step {state['global_step'] - 1})")
                state["history"].append(metrics)
                if progress:
                    print(f"epoch {state['epoch']}/{cfg.epochs}  loss {train_loss:.4f}  val_loss {metrics['val_loss']:.4f}  "
                          f"val_auc {metrics['val_auc']:.4f}  val_acc {metrics['val_acc']:.4f}  "
                          f"{state['train_seconds'] / 60:.1f} min")
                improved = metrics["val_auc"] > state["best_auc"]
                if improved:
                    state["best_auc"] = metrics["val_auc"]
                    state["bad_epochs"] = 0
                else:
                    state["bad_epochs"] += 1
                if cfg.early_stopping and state["bad_epochs"] >= cfg.early_stopping:
                    stop[0] = 1
            if dist.world_size > 1:
                import torch.distributed as tdist

                tdist.broadcast(stop, 0)
            # Kept in the checkpoint, so that a resume of a stopped run does not train on.
            if stop.item():
                state["stopped_because"] = f"early stopping: no better validation AUC for {cfg.early_stopping} epochs"
            elif out_of_time:
                state["stopped_because"] = f"time limit of {cfg.max_minutes:g} minutes"
            # best.pt before last.pt, metrics.csv after: a kill between any two resumes from the
            # previous last.pt and redoes this epoch exactly, writing the same best.pt and row again.
            if dist.is_main and improved:
                save_atomic({"format": CHECKPOINT_FORMAT, "config": asdict(saved_cfg), "store_fingerprint": store.fingerprint,
                             "model": eval_model.state_dict(), "epoch": state["epoch"], "metrics": metrics,
                             "preprocessing": {"mean": mean, "std": std, "crop_px": cfg.crop_px}},
                            out / "checkpoints" / "best.pt")
            save_last()  # every process: it gathers their augmentation RNG states
            if dist.is_main:
                write_metrics_csv(out / METRICS_FILE, state["history"])
            epochs_this_process += 1
            if stop_requests.signal_number is not None:  # it came while validating
                raise stop_requests.saved(f"after epoch {state['epoch']}")
            if state.get("stopped_because"):
                stopped_because = state["stopped_because"]
                break
            if stop_after_epochs is not None and epochs_this_process >= stop_after_epochs:
                stopped_because = "stopped by request"
                break
    except torch.cuda.OutOfMemoryError:
        if phase == "validating":
            raise out_of_memory_validating() from None
        smaller = f"--batch-size {max(1, cfg.batch_size // 2)}"
        if resume:  # a resume keeps the run's batch size (RESUME_SETTINGS)
            raise UserError(f"{out}: out of GPU memory resuming with the run's --batch-size {cfg.batch_size} for "
                            f"{cfg.model}; resume it on a GPU with more memory, or start it again with "
                            f"--overwrite {smaller}") from None
        raise UserError(f"out of GPU memory with --batch-size {cfg.batch_size} for {cfg.model}; try {smaller}") from None
    stop_requests.at_once = True  # the thresholds have nothing to save: the resume chooses them
    if dist.is_main:
        run = read_run(out)
        if progress:
            print(f"histodetect: choosing the decision thresholds on {len(val_rows)} validation patches "
                  f"(views: {', '.join(map(str, tta_view_counts(cfg.crop_px, cfg.shift_px)))})")
        try:
            thresholds = _validation_thresholds(out, store, val_rows, cfg, mean, std, device, progress=progress)
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory_validating() from None
        run["threshold"] = thresholds["1"]
        run["thresholds"] = thresholds
        run.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stopped_because": stopped_because,
                    "best_val_auc": state["best_auc"], "epochs_run": state["epoch"],
                    "train_seconds": state["train_seconds"]})
        write_text_atomic(out / RUN_FILE, json.dumps(run, indent=2) + "\n")
    return FitResult(out, state["best_auc"], state["epoch"], stopped_because, state["history"])
