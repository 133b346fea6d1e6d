"""Top-1 mixture of experts as a `deepspeed.moe.layer.MoE` subclass with index-based dispatch and combine.

DeepSpeed recognises MoE layers only as `MoE` instances (expert checkpointing, optimizer group splitting), so
`SkyMoE` keeps DeepSpeed's module tree and parameter names
(`deepspeed_moe.gate.wg.weight`, `deepspeed_moe.experts.deepspeed_experts.<local id>.*`) and replaces only the
routing: softmax gate -> argmax -> arrival positions -> gather/scatter by index (`ops.top1_route`,
`ops.moe_dispatch`, `ops.moe_combine`) instead of DeepSpeed's one-hot masks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll
from deepspeed.utils import groups
from torch import nn

from trainer.model import ops


class Mlp(nn.Module):
    """Two-layer GELU FFN, the dense block FFN and the structure of every expert. x: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def moe_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: max(min_capacity, ceil(capacity_factor * N / E)), DeepSpeed's formula."""
    return max(min_capacity, math.ceil(capacity_factor * num_tokens / num_experts))


class IndexMOELayer(MOELayer):
    """DeepSpeed's `MOELayer` (same gate/experts modules) with our routing; the ep group is looked up by name.

    Not storing the process group on the module keeps `copy.deepcopy` (the EMA teacher) working after
    `deepspeed.initialize` created the groups.
    """

    def __init__(self, gate, experts, ep_group_name, ep_size, num_local_experts, *, drop_tokens: bool,
                 reroute: int = 0) -> None:
        super().__init__(gate, experts, ep_group_name, ep_size, num_local_experts)
        self.drop_tokens = drop_tokens
        self.reroute = reroute  # rounds of overflow re-routing (ops.reroute_overflow), with drop_tokens
        self.last_route: dict[str, torch.Tensor | int] = {}
        # Routing bias for the choice of expert (`balance_step`); persistent, so a resumed run routes the same.
        self.register_buffer("route_bias", torch.zeros(gate.wg.weight.shape[0], device=gate.wg.weight.device))
        self.balancing = False  # count training calls for `balance_step` (the meta-architecture turns it on)
        self.balance_counting = True  # the meta-architecture turns it off for zero stand-in rows
        self._step_counts: torch.Tensor | None = None  # expert counts of training calls since the last step
        self._bias_active: bool | None = None

    def _set_ep_group(self, ep_group) -> None:  # group resolved lazily in `_group`
        self.ep_group = None

    def _group(self):
        if self.ep_size == 1:
            return None
        return groups._get_expert_parallel_group(self.ep_group_name)

    def route_and_run(self, x: torch.Tensor) -> tuple[torch.Tensor, ops.Route, int]:
        """x: (N, D) -> out (N, D), the routing decision and the capacity used."""
        n, d = x.shape
        e = self.gate.wg.weight.shape[0]
        group = self._group()
        cf = self.gate.capacity_factor if self.training else self.gate.eval_capacity_factor
        if self.drop_tokens:
            n_max = n
            if group is not None:  # every rank needs the same buffer shape for all_to_all
                t = torch.tensor([n], device=x.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
                n_max = int(t)
            capacity = moe_capacity(n_max, e, cf, self.gate.min_capacity)
            # Like the bias, only when set: a routing function without that argument (kernels.top1_route, which
            # the kernel tests put in ops' place) still works without re-routing.
            route = ops.top1_route(x, self.gate.wg.weight, capacity, True, **self._bias_kwargs(),
                                   **({"reroute": self.reroute} if self.reroute else {}))
        else:
            route = ops.top1_route(x, self.gate.wg.weight, n, False, **self._bias_kwargs())
            capacity = n if x.is_meta else max(int(route.counts.max()), 1)
            if group is not None:
                t = torch.tensor([capacity], device=x.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
                capacity = int(t)
        buf = ops.moe_dispatch(x, route.expert, route.position, route.kept, e, capacity)
        if group is not None:
            buf = _AllToAll.apply(group, buf)  # (ep, E_local, C, D) after exchange, rank-major
        buf = buf.reshape(self.ep_size, self.num_local_experts, capacity, d)
        # unbind, not buf[:, i]: its backward stacks the slices once instead of a zero-filled buffer per expert.
        chunks = buf.unbind(1)
        y = torch.stack([ex(t) for t, ex in zip(chunks, self.experts.deepspeed_experts, strict=True)], dim=1)
        y = y.reshape(e, capacity, d)
        if group is not None:
            y = _AllToAll.apply(group, y)
        out = ops.moe_combine(y, route.expert, route.position, route.kept, route.gate)
        return out, route, capacity

    def _bias(self) -> torch.Tensor | None:
        # None while the bias is all zeros (balancing off, or not moved yet): the Triton route kernel stays usable.
        # Checked once (a host sync on CUDA), again only after `balance_step` or a state-dict load.
        if self._bias_active is None:
            self._bias_active = not (self.route_bias.is_meta or not bool(self.route_bias.any()))
        return self.route_bias if self._bias_active else None

    def _bias_kwargs(self) -> dict:
        # Only with a bias: a routing function without that argument (kernels.top1_route) still works unbalanced.
        bias = self._bias()
        return {} if bias is None else {"bias": bias}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the routing bias existed routed without one: zero is their exact state, so
        # strict loads (DeepSpeed's resume, weights.load_into) accept them.
        state_dict.setdefault(prefix + "route_bias", torch.zeros_like(self.route_bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bias_active = None

    @torch.no_grad()
    def balance_step(self, rate: float) -> None:
        """Once per optimizer step, on every rank: bias_e += rate * (mean load - load_e) / mean load over the step's
        training calls summed over all ranks (so every rank keeps the same bias), then re-centred (argmax ignores a
        shift).

        Proportional, not DeepSeek-V3's sign rule: the sign rule moves every bias by the full rate on every step,
        however small the imbalance, and at rate 0.01 it oscillated in the learning benchmark; here the step shrinks
        as the load evens out.
        """
        counts = self._step_counts if self._step_counts is not None else torch.zeros_like(self.route_bias)
        counts = counts.to(self.route_bias.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        self._step_counts = None
        if float(counts.sum()) == 0:
            return
        self.route_bias += rate * (counts.mean() - counts) / counts.mean()
        self.route_bias -= self.route_bias.mean()
        self._bias_active = None

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ops.Route]:
        """x: (..., D) -> (out (..., D), route). Only detached statistics are kept on the module (deepcopy)."""
        out, route, capacity = self.route_and_run(x.reshape(-1, x.shape[-1]))
        if self.balancing and self.training and self.balance_counting and not x.is_meta:
            c = route.counts.detach()
            self._step_counts = c if self._step_counts is None else self._step_counts + c
        self.exp_counts = route.counts.detach()
        if x.is_meta:
            kept_counts = self.exp_counts
        else:  # what each expert processed: after capacity and re-routing
            kept = route.expert.detach()[route.kept]
            kept_counts = torch.zeros_like(self.exp_counts).index_add_(0, kept, torch.ones_like(kept))
        self.last_route = {
            "counts": self.exp_counts,
            "kept_counts": kept_counts,
            "dropped": route.dropped,
            "capacity": capacity,
            "tokens": route.expert.shape[0],
        }
        return out.view(x.shape), route

    def forward(self, *inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.run(inputs[0])[0]


class SkyMoE(MoE):
    """Top-1 MoE FFN, a true `deepspeed.moe.layer.MoE`. x: (..., D) -> (out (..., D), l_aux, expert counts (E,)).

    `forward_with_loss` returns (out, aux_weight * load-balance loss + z_weight * router z-loss).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        num_experts: int,
        ep_size: int = 1,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        reroute: int = 0,
    ) -> None:
        super().__init__(
            dim,
            Mlp(dim, hidden),
            num_experts=num_experts,
            ep_size=ep_size,
            k=1,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            drop_tokens=drop_tokens,
            use_rts=False,
        )
        old = self.deepspeed_moe
        self.deepspeed_moe = IndexMOELayer(
            old.gate, old.experts, self.expert_group_name, ep_size, self.num_local_experts, drop_tokens=drop_tokens,
            reroute=reroute,
        )
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        # DeepSpeed's version prints a bare "No existing process group found" line per rank and layer group.
        with contextlib.redirect_stdout(io.StringIO()):
            super()._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    def _tag_experts(self) -> None:
        # DeepSpeed finds expert params by these attributes (`is_moe_param`); new Parameter objects lack them.
        for p in self.deepspeed_moe.experts.parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # `to_empty` and some dtype/device moves create new Parameters
        self._tag_experts()
        return out

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        new._tag_experts()  # Parameter.__deepcopy__ drops Python attributes
        return new

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
        if used_token is not None:
            raise NotImplementedError("used_token masks are not supported")
        out, route = self.deepspeed_moe.run(hidden_states)
        return out, route.aux_loss, route.counts

    def forward_with_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, route = self.deepspeed_moe.run(x)
        loss = self.aux_loss_weight * route.aux_loss
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * route.z_loss
        return out, loss

    def stats(self) -> dict[str, object]:
        """Expert counts (first choice, before dropping), kept counts (what each expert processed: after capacity
        and re-routing), dropped tokens, tokens and capacity of the last forward."""
        r = self.deepspeed_moe.last_route
        if not r:
            return {}
        return {
            "expert_counts": r["counts"].tolist(),
            "kept_counts": r["kept_counts"].tolist(),
            "dropped": int(r["dropped"]),
            "tokens": int(r["tokens"]),
            "capacity": int(r["capacity"]),
        }


def init_experts(model: nn.Module, seed: int, ep_rank: int) -> None:
    """Initialise every local expert from (seed, MoE layer, GLOBAL expert id, Linear index), like `_init_weights`.

    Under expert parallelism each rank builds only its local experts with the same RNG stream, so rank 1's experts
    (global 2, 3 of 4) would start as copies of rank 0's (global 0, 1). Seeding by global id makes the initial model
    the same for every ep_size and gives every expert its own weights.
    """
    import numpy as np

    for layer, moe in enumerate(m for m in model.modules() if isinstance(m, SkyMoE)):
        for local, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            global_id = ep_rank * moe.num_local_experts + local
            linears = [sub for sub in expert.modules() if isinstance(sub, nn.Linear)]
            for j, sub in enumerate(linears):  # j: fc1 and fc2 get their own streams (not repeated values)
                if sub.weight.device.type == "meta":
                    continue
                state = int(np.random.SeedSequence([seed, layer, global_id, j]).generate_state(1)[0])
                gen = torch.Generator(device=sub.weight.device).manual_seed(state)
                with torch.no_grad():
                    nn.init.trunc_normal_(sub.weight, std=0.02, generator=gen)
                    if sub.bias is not None:
                        sub.bias.zero_()
