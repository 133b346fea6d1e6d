"""The training loop: DeepSpeed engine around the student+teacher module, schedules, checkpoints, metrics."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.config import ConfigError, RunConfig, grad_accumulation, to_dict, to_ds_config, use_bf16
from trainer.data import build_loader, to_device
from trainer.eval_hook import InTrainingEval
from trainer.meta_arch import SSLMetaArch
from trainer.metrics import Metrics, PhaseTimer, loader_queue_depth, peak_tflops, step_flops
from trainer.objectives.centering import Centering
from trainer.objectives.contrastive import ContrastiveObjective
from trainer.preempt import STOP, end_loader_workers, ignore_in_worker
from trainer.schedules import Schedules

log = logging.getLogger("trainer")

NO_WEIGHT_DECAY = ("bias", "norm", "prompt", "logit_scale", "pos_embed", "date_embed", "modality_embed")


def param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: decay for weight matrices, none for biases, norms, prompts, embeddings; MoE params split out."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_WEIGHT_DECAY) else decay).append(p)
    groups = [{"name": "decay", "params": decay, "wd_scale": 1.0},
              {"name": "no_decay", "params": no_decay, "wd_scale": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def tokens_per_view(view: dict) -> int:
    """Patch tokens (4x4) the student embeds for one collated view, counting only the modalities present."""
    hr = view["hr"].shape[-2] * view["hr"].shape[-1] // 16 * int(view["has_hr"].sum())
    s2 = view["s2"].shape[1] * view["s2"].shape[-2] * view["s2"].shape[-1] // 16 * int(view["has_s2"].sum())
    s1 = view["s1"].shape[1] * view["s1"].shape[-2] * view["s1"].shape[-1] // 16 * int(view["has_s1"].sum())
    return hr + s2 + s1


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteError(RuntimeError):
    """K optimizer steps in a row had non-finite loss or gradients: the run stops (the last checkpoint is good)."""


def injected_faults(rank: int) -> dict[int, set[str]]:
    """Test-only: $SKYSENSE_INJECT_NONFINITE = "STEP:RANK:KIND,..." (RANK a number or *, KIND loss or grad) makes
    that step's loss, or one parameter's gradient, NaN on that rank. Step numbers count from 1."""
    out: dict[int, set[str]] = {}
    for item in filter(None, os.environ.get("SKYSENSE_INJECT_NONFINITE", "").split(",")):
        step, who, kind = item.split(":")
        if kind not in ("loss", "grad"):
            raise ValueError(f"SKYSENSE_INJECT_NONFINITE: kind must be loss or grad, got {kind!r}")
        if who == "*" or int(who) == rank:
            out.setdefault(int(step), set()).add(kind)
    return out


def discard_pending(model: torch.nn.Module) -> None:
    """Drop the teacher statistics objectives gathered during a skipped step (they may hold its NaNs)."""
    for m in model.modules():
        if isinstance(m, Centering):
            m.pending_sum.zero_()
            m.pending_count.zero_()
        elif isinstance(m, ContrastiveObjective):
            m._pending = {t: [] for t in m.terms}


class Trainer:
    """Build once, `fit()` to max_steps, `close()` in a finally. Resumes from RUN/checkpoints/latest when present."""

    def __init__(self, cfg: RunConfig, *, resume: bool = True):
        import deepspeed

        import kernels

        if cfg.train.kernels != "auto":  # "auto" leaves $SKYSENSE_KERNELS in charge
            kernels.set_backend(cfg.train.kernels)
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        on_cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if on_cuda else "cpu")
        if on_cuda:
            torch.cuda.set_device(self.device)
        self.dtype = torch.bfloat16 if use_bf16(cfg, on_cuda) else torch.float32
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.accum = grad_accumulation(cfg, self.world)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**to_dict(cfg), "git_revision": git_revision(), "world_size": self.world}
            (self.run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        dist.barrier()

        seed_everything(cfg.train.seed)  # same init on every rank; DeepSpeed also broadcasts rank 0's weights
        model = SSLMetaArch(cfg, device=self.device)
        optimizer = torch.optim.AdamW(param_groups(model), lr=cfg.optim.lr, betas=cfg.optim.betas)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=to_ds_config(cfg, self.world, on_cuda, trained_params=trained),
                                               dist_init_required=False)
        self.model: SSLMetaArch = self.engine.module
        self._check_expert_ranks()
        if self.dtype == torch.bfloat16 and hasattr(self.engine.optimizer, "check_grad_overflow"):
            # ZeRO-1/2 skip a step with non-finite gradients by themselves in fp32; in bf16 only when asked to.
            self.engine.optimizer.check_grad_overflow = True
        if self.dtype != torch.float32:
            self.model.keep_teacher_fp32(self.dtype)
        # Model-side randomness (drop path, MoE noise) per rank: identical masks on every rank would waste the
        # batch. Data randomness does not use this RNG: it is seeded by stream position (trainer/data.py).
        torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, 2, self.rank]).generate_state(1)[0]))
        self.sched = Schedules.from_config(cfg)
        self.step = 0
        self.skipped_steps = 0  # optimizer steps skipped for non-finite loss or gradients, whole run
        self.bad_in_row = 0
        self.preempted = False
        self._faults = injected_faults(self.rank)
        try:
            self.fingerprint = checkpoint.dataset_fingerprint(cfg.data.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the dataset {cfg.data.path}: {e}") from None
        resume_s = None
        if resume and checkpoint.latest_tag(self.ckpt_dir):
            start = time.perf_counter()
            client = checkpoint.load(self.engine, self.ckpt_dir, rank=self.rank, world_size=self.world,
                                     current=self._run_state(), allow_data_change=cfg.train.allow_data_change,
                                     allow_schedule_change=cfg.train.allow_schedule_change)
            self.step = int(client["step"])
            self.skipped_steps = int(client.get("skipped_steps", 0))
            self.bad_in_row = int(client.get("bad_in_row", 0))
            resume_s = time.perf_counter() - start
            if self.rank == 0:
                log.info("resumed from %s at step %d", self.ckpt_dir / checkpoint.tag_for(self.step), self.step)
        self.loader = self._open_data(on_cuda)
        port = cfg.metrics.port + self.local_rank if cfg.metrics.port > 0 else 0
        self.metrics = Metrics(rank=self.rank, port=port, run_dir=self.run_dir if self.rank == 0 else None,
                               peak=peak_tflops(cfg.metrics.peak_tflops), run=self.run_dir.name,
                               addr=cfg.metrics.addr or None)
        if resume_s is not None:
            self.metrics.resumed(resume_s)
        self.flops: dict[tuple[str, str, str], float] = {}  # per (network, view, pass), counted on the first step
        self.history: list[dict] = []
        self.evaluator = InTrainingEval(cfg.eval, self.device) if cfg.eval.every > 0 else None

    def _open_data(self, on_cuda: bool):
        """The loader, or one ConfigError on every rank when any rank finds the dataset and the config at odds."""
        cfg, error = self.cfg, ""
        try:
            loader = build_loader(cfg, rank=self.rank, world_size=self.world, start_step=self.step,
                                  pin_memory=on_cuda)
            reader = loader.dataset.reader
            for name in ("hr_crop", "local_crop"):
                if getattr(cfg.data, name) > reader.hr_size:
                    raise ValueError(f"data.{name}={getattr(cfg.data, name)} is larger than the dataset's "
                                     f"{reader.hr_size} px HR images: choose data.{name} <= {reader.hr_size}")
            if loader.num_workers > 0:
                loader.worker_init_fn = ignore_in_worker  # a preempted step must still get its batches
        except (ValueError, OSError, KeyError) as e:
            error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        errors = [""] * self.world
        dist.all_gather_object(errors, error)  # no rank goes on alone into the first step's collectives
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            r, e = bad[0]
            raise ConfigError(f"dataset {cfg.data.path} does not fit this config{f' (rank {r})' if r else ''}: {e}")
        return loader

    def _run_state(self) -> dict:
        """What a checkpoint must agree with to be resumed by this run (checkpoint.check_resume)."""
        return {"global_batch": self.cfg.train.global_batch, "dataset": self.fingerprint,
                "schedule": checkpoint.schedule_settings(to_dict(self.cfg))}

    def _check_expert_ranks(self) -> None:
        """Experts were initialised for ep_rank = rank % ep_size; DeepSpeed's groups must agree."""
        from deepspeed.utils import groups

        from trainer.model.moe import SkyMoE

        for m in self.model.modules():
            if isinstance(m, SkyMoE):
                actual = groups._get_expert_parallel_rank(m.expert_group_name)
                if actual != self.model.ep_rank:
                    raise RuntimeError(f"expert-parallel rank {actual} != {self.model.ep_rank} assumed at init")
                return

    def _set_schedules(self, values: dict) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = values["lr"]
            group["weight_decay"] = values["weight_decay"] * group.get("wd_scale", 1.0)

    def train_step(self, batches) -> tuple[dict[str, float], dict[str, float], int]:
        """One optimizer step over `accum` micro-batches. Returns (mean losses, phase times, samples*tokens)."""
        values = self.sched.at(self.step)
        self._set_schedules(values)
        timer = PhaseTimer(self.device)
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        faults = self._faults.get(self.step + 1, set())
        nonfinite = torch.zeros((), device=self.device)
        hook = None
        for micro in range(self.accum):
            with timer.phase("data"):
                batch = to_device(next(batches), self.device, self.dtype)
            if not self.flops:  # once per run, every rank (MoE collectives); RNG and expert counts untouched
                self.flops = step_flops(self.model, batch, self.accum)
            with timer.phase("forward"):
                losses = self.engine(batch, values["teacher_temp"])
            if "loss" in faults:
                losses["total"] = losses["total"] * float("nan")
            if "grad" in faults and micro == self.accum - 1:
                param = next(p for p in self.model.student.parameters() if p.requires_grad)
                hook = param.register_hook(lambda g: g * float("nan"))
            # A non-finite loss must give non-finite gradients, so that DeepSpeed's own all-reduced gradient norm
            # skips the step on every rank (its overflow path, the one clean way to skip a ZeRO step): multiply by
            # 1 or NaN, on the device (no host sync).
            finite = torch.isfinite(losses["total"].detach())
            nonfinite = nonfinite + (~finite).float()
            poison = torch.where(finite, 1.0, float("nan")).to(losses["total"].dtype)
            with timer.phase("backward"):
                self.engine.backward(losses["total"] * poison)
            if hook is not None:
                hook.remove()
            with timer.phase("optimizer"):
                self.engine.step()
            tokens += sum(tokens_per_view(v) for v in batch["views"])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        names = sorted(sums)
        skipped_here = not self.engine.was_step_applied()
        flags = torch.tensor([float(skipped_here), float(bool(STOP))], device=self.device)
        packed = torch.cat([torch.stack([sums[k] for k in names]) / (self.accum * self.world), nonfinite[None], flags])
        dist.all_reduce(packed)  # log the mean over ranks, not rank 0's share; and agree on skip and stop
        values_out = packed.tolist()
        bad_losses, skips, stops = values_out[len(names):]
        if skips not in (0, self.world):
            raise RuntimeError(f"step {self.step + 1}: DeepSpeed skipped the optimizer step on {int(skips)} of "
                               f"{self.world} ranks; the replicas have diverged")
        if bad_losses and not skips:
            raise RuntimeError(f"step {self.step + 1}: non-finite loss, yet DeepSpeed applied the optimizer step "
                               f"(train.zero_stage={self.cfg.train.zero_stage}; the skip needs ZeRO-1/2)")
        self.last_skipped, self.stop_requested = skips > 0, stops > 0
        with timer.phase("teacher"):
            if self.last_skipped:  # the step never happened: neither the teacher nor the centres move
                discard_pending(self.model)
            else:
                self.model.step_objectives()  # centres move once per step, whatever the ranks and accumulation
                self.model.update_teacher(values["momentum"])
        return dict(zip(names, values_out[: len(names)])), timer.times(), tokens

    def fit(self) -> list[dict]:
        """Train to train.stop_step (0: max_steps), or to a shared stop request (signal): checkpoint, return."""
        cfg = self.cfg
        stop_at = cfg.train.stop_step or cfg.train.max_steps
        batches = iter(self.loader)
        while self.step < stop_at:
            start = time.perf_counter()
            losses, times, tokens = self.train_step(batches)
            times["step"] = time.perf_counter() - start
            # A skipped step still consumes its batch and its schedule slot: the data position stays the step
            # number, so resume (and the sample order) stays exact, on any world size.
            self.step += 1
            self.skipped_steps += self.last_skipped
            self.bad_in_row = self.bad_in_row + 1 if self.last_skipped else 0
            grad_norm = self.engine.get_global_grad_norm()
            values = self.sched.at(self.step - 1)
            health = self.model.health()
            health.update({"skipped_steps": float(self.skipped_steps), "step_skipped": float(self.last_skipped)})
            if self.evaluator is not None and (self.step % cfg.eval.every == 0 or self.step == 1):
                health.update(self.evaluator(self.model.teacher["backbone"]))  # every rank: see eval_hook.py
            rec = self.metrics.record(step=self.step, samples=cfg.train.micro_batch * self.accum, tokens=tokens,
                                      flops=self.flops, times=times, losses=losses, lr=values["lr"],
                                      grad_norm=float(grad_norm or 0.0), momentum=values["momentum"],
                                      moe=self.model.moe_step, health=health, queue_depth=loader_queue_depth(batches),
                                      skipped_steps=int(self.last_skipped))
            self.history.append(rec)
            if self.rank == 0 and (self.step % cfg.train.log_every == 0 or self.step == stop_at):
                log.info("step %d/%d loss %.4f | %.1f samples/s/rank | %.2fs (data %.2fs) | lr %.2e",
                         self.step, stop_at, losses["total"], rec["samples_per_s"], times["step"],
                         times["data"], values["lr"])
            if self.last_skipped and self.rank == 0:
                log.warning("step %d: non-finite loss or gradients, optimizer step skipped (%d in a row)",
                            self.step, self.bad_in_row)
            if 0 < cfg.train.max_bad_steps <= self.bad_in_row:
                last = checkpoint.latest_tag(self.ckpt_dir)
                raise NonFiniteError(f"non-finite loss or gradients in {self.bad_in_row} optimizer steps in a row "
                                     f"(steps {self.step - self.bad_in_row + 1}-{self.step}, train.max_bad_steps="
                                     f"{cfg.train.max_bad_steps}); stopped without a checkpoint, the last good one "
                                     f"is {self.ckpt_dir / last if last else 'none'}")
            if self.stop_requested:
                self.preempted = True
                path = self.save()
                if self.rank == 0:
                    log.info("stop requested by a signal: checkpoint %s at step %d, exiting", path, self.step)
                break
            if self.step % cfg.train.ckpt_every == 0 or self.step == stop_at:
                self.save()
        return self.history

    def save(self) -> Path:
        start = time.perf_counter()
        state = {**self._run_state(), "world_size": self.world, "recipe": self.cfg.recipe,
                 "git_revision": git_revision(), "skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row}
        path = checkpoint.save(self.engine, self.ckpt_dir, step=self.step, client_state=state, rank=self.rank,
                               keep=self.cfg.train.keep_ckpts, config=to_dict(self.cfg))
        self.metrics.checkpoint_saved(time.perf_counter() - start)
        if self.rank == 0:
            log.info("checkpoint %s", path)
        return path

    def close(self) -> None:
        self.metrics.close()
        end_loader_workers()
