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
from torch.utils.flop_counter import FlopCounterMode

from trainer import checkpoint
from trainer.config import RunConfig, grad_accumulation, to_dict, to_ds_config, use_bf16
from trainer.data import build_loader, to_device
from trainer.eval_hook import InTrainingEval
from trainer.meta_arch import SSLMetaArch
from trainer.metrics import Metrics, peak_tflops
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
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=to_ds_config(cfg, self.world, on_cuda),
                                               dist_init_required=False)
        self.model: SSLMetaArch = self.engine.module
        self._check_expert_ranks()
        if self.dtype != torch.float32:
            self.model.keep_teacher_fp32(self.dtype)
        # Model-side randomness (drop path, MoE noise) per rank: identical masks on every rank would waste the
        # batch. Data randomness does not use this RNG: it is seeded by stream position (trainer/data.py).
        torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, 2, self.rank]).generate_state(1)[0]))
        self.sched = Schedules.from_config(cfg)
        self.step = 0
        if resume and checkpoint.latest_tag(self.ckpt_dir):
            client = checkpoint.load(self.engine, self.ckpt_dir, rank=self.rank, world_size=self.world)
            if client.get("global_batch") != cfg.train.global_batch:
                raise RuntimeError(f"checkpoint used global_batch={client.get('global_batch')}, this run "
                                   f"{cfg.train.global_batch}: the data order would change")
            self.step = int(client["step"])
            if self.rank == 0:
                log.info("resumed from %s at step %d", self.ckpt_dir / checkpoint.tag_for(self.step), self.step)
        self.loader = build_loader(cfg, rank=self.rank, world_size=self.world, start_step=self.step,
                                   pin_memory=on_cuda)
        port = cfg.metrics.port + self.local_rank if cfg.metrics.port > 0 else 0
        self.metrics = Metrics(rank=self.rank, port=port, run_dir=self.run_dir if self.rank == 0 else None,
                               peak=peak_tflops(cfg.metrics.peak_tflops))
        self.flops_per_step = 0.0
        self.history: list[dict] = []
        self.evaluator = InTrainingEval(cfg.eval, self.device) if cfg.eval.every > 0 else None

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
        times = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(self.accum):
            t = time.perf_counter()
            batch = to_device(next(batches), self.device, self.dtype)
            times["data"] += time.perf_counter() - t
            # FLOPs are counted once, over the forward only: FlopCounterMode around DeepSpeed's backward hooks
            # costs ~10x the step. Student backward = 2x its forward and the teacher has none, so a step is
            # 3 F_student + F_teacher = 2 x (counted forward), student and teacher being the same network.
            counter = FlopCounterMode(display=False) if self.flops_per_step == 0.0 and micro == 0 else None
            t = time.perf_counter()
            if counter is None:
                losses = self.engine(batch, values["teacher_temp"])
            else:
                with counter:
                    losses = self.engine(batch, values["teacher_temp"])
                self.flops_per_step = 2.0 * float(counter.get_total_flops()) * self.accum
            times["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            self.engine.backward(losses["total"])
            times["backward"] += time.perf_counter() - t
            t = time.perf_counter()
            self.engine.step()
            times["optimizer"] += time.perf_counter() - t
            tokens += sum(tokens_per_view(v) for v in batch["views"])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        t = time.perf_counter()
        self.model.step_objectives()  # centres move once per optimizer step, whatever the ranks and accumulation
        self.model.update_teacher(values["momentum"])
        times["optimizer"] += time.perf_counter() - t
        names = sorted(sums)
        packed = torch.stack([sums[k] for k in names]) / (self.accum * self.world)
        dist.all_reduce(packed)  # log the mean over ranks, not rank 0's share
        return dict(zip(names, packed.tolist())), times, tokens

    def fit(self) -> list[dict]:
        cfg = self.cfg
        batches = iter(self.loader)
        while self.step < cfg.train.max_steps:
            start = time.perf_counter()
            losses, times, tokens = self.train_step(batches)
            times["step"] = time.perf_counter() - start
            self.step += 1
            grad_norm = self.engine.get_global_grad_norm()
            values = self.sched.at(self.step - 1)
            health = self.model.health()
            if self.evaluator is not None and (self.step % cfg.eval.every == 0 or self.step == 1):
                health.update(self.evaluator(self.model.teacher["backbone"]))  # every rank: see eval_hook.py
            rec = self.metrics.record(step=self.step, samples=cfg.train.micro_batch * self.accum, tokens=tokens,
                                      flops=self.flops_per_step, times=times, losses=losses, lr=values["lr"],
                                      grad_norm=float(grad_norm or 0.0), momentum=values["momentum"],
                                      moe=self.model.student["backbone"].moe_stats(), health=health)
            self.history.append(rec)
            if self.rank == 0 and (self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps):
                log.info("step %d/%d loss %.4f | %.1f samples/s/rank | %.2fs (data %.2fs) | lr %.2e",
                         self.step, cfg.train.max_steps, losses["total"], rec["samples_per_s"], times["step"],
                         times["data"], values["lr"])
            if self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.max_steps:
                self.save()
        return self.history

    def save(self) -> Path:
        state = {"global_batch": self.cfg.train.global_batch, "world_size": self.world,
                 "recipe": self.cfg.recipe, "git_revision": git_revision()}
        path = checkpoint.save(self.engine, self.ckpt_dir, step=self.step, client_state=state, rank=self.rank,
                               keep=self.cfg.train.keep_ckpts, config=to_dict(self.cfg))
        if self.rank == 0:
            log.info("checkpoint %s", path)
        return path

    def close(self) -> None:
        self.metrics.close()
