"""Recipes, dotted overrides, config.json round trip and the DeepSpeed batch arithmetic."""

import json

import pytest

from trainer.config import (
    ConfigError,
    RunConfig,
    apply_override,
    from_dict,
    grad_accumulation,
    resolve,
    tiny,
    to_dict,
    to_ds_config,
)


def test_recipes_derive_and_differ():
    t, b, h = resolve("tiny"), resolve("base"), resolve("huge")
    assert (t.recipe, b.recipe, h.recipe) == ("tiny", "base", "huge")
    # huge is the paper's setting (DESIGN.md §4, objectives-notes.md).
    assert h.model.embed_dim == 352 and h.model.depths == (2, 2, 18, 2) and h.model.head_dim == 32
    assert h.model.window == 8 and h.model.moe.num_experts == 8 and h.model.moe.num_layers == 6
    assert h.train.global_batch == 1024 and h.optim.lr == 2e-4 and h.optim.min_lr == 1e-6
    assert t.model.embed_dim < b.model.embed_dim < h.model.embed_dim
    # Recipes are fresh objects: mutating one must not leak into the next call.
    t.model.depths = (9, 9, 9, 9)
    assert resolve("tiny").model.depths != (9, 9, 9, 9)


@pytest.mark.parametrize("assignment, path, expected", [
    ("model.depths=2,2,6,2", ("model", "depths"), (2, 2, 6, 2)),
    ("model.moe.num_experts=16", ("model", "moe", "num_experts"), 16),
    ("model.moe.enabled=false", ("model", "moe", "enabled"), False),
    ("optim.lr=3e-4", ("optim", "lr"), 3e-4),
    ("optim.betas=0.9,0.95", ("optim", "betas"), (0.9, 0.95)),
    ("model.apm_reduce=hr:true,s2:false,s1:true", ("model", "apm_reduce"), {"hr": True, "s2": False, "s1": True}),
    ("run_dir=/tmp/x", ("run_dir",), "/tmp/x"),
    ("data.path=a=b", ("data", "path"), "a=b"),  # only the first '=' separates key and value
])
def test_override_types(assignment, path, expected):
    cfg = tiny()
    apply_override(cfg, assignment)
    node = cfg
    for name in path:
        node = getattr(node, name)
    assert node == expected and type(node) is type(expected)


@pytest.mark.parametrize("assignment, message", [
    ("model.dept=1,2", "did you mean depths"),
    ("nosuch.key=1", "unknown key 'nosuch'"),
    ("model.moe=3", "is a section"),
    ("train.max_steps=ten", "expected int"),
    ("model.moe.enabled=maybe", "expected a boolean"),
    ("optim.betas=0.9", "expected 2 comma-separated values"),
    ("train.max_steps", "not of the form key=value"),
    ("train.max_steps.x=1", "is a value, not a section"),
])
def test_bad_overrides_say_why(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(tiny(), assignment)


def test_validation_rejects_zero3_and_bad_batch():
    with pytest.raises(ConfigError, match="ZeRO-3"):
        resolve("tiny", ["train.zero_stage=3"])
    with pytest.raises(ConfigError, match="multiple of train.micro_batch"):
        resolve("tiny", ["train.global_batch=10", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match="train.kernels must be"):
        resolve("tiny", ["train.kernels=cuda"])
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve("gigantic")


def test_config_json_round_trip():
    cfg = resolve("huge", ["model.depths=2,2,6,2", "optim.betas=0.8,0.9"])
    text = json.dumps(to_dict(cfg))
    back = from_dict(RunConfig, json.loads(text))
    assert back == cfg
    assert back.model.depths == (2, 2, 6, 2) and isinstance(back.model.depths, tuple)


@pytest.mark.parametrize("global_batch, micro, world, accum", [(1024, 8, 128, 1), (1024, 4, 128, 2), (8, 4, 2, 1),
                                                               (8, 2, 1, 4), (96, 4, 3, 8)])
def test_ds_config_batch_arithmetic(global_batch, micro, world, accum):
    cfg = resolve("tiny", [f"train.global_batch={global_batch}", f"train.micro_batch={micro}"])
    ds = to_ds_config(cfg, world)
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["train_batch_size"] == micro * world * accum == global_batch
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False


def test_ds_config_precision_and_indivisible_world():
    cfg = resolve("tiny", ["train.global_batch=8", "train.micro_batch=4"])
    assert to_ds_config(cfg, 2, on_cuda=True)["bf16"]["enabled"] is True  # auto -> bf16 on CUDA
    apply_override(cfg, "train.precision=fp32")
    assert to_ds_config(cfg, 2, on_cuda=True)["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="not divisible by micro_batch x world"):
        grad_accumulation(cfg, 3)


def test_reduce_bucket_is_capped_at_the_trained_parameters():
    """DeepSpeed allocates the whole ZeRO reduce bucket at the first backward (5e8 elements = 2 GB fp32 by default):
    capped at the model's trained parameters, which still fit one bucket, so the reductions stay the same."""
    cfg = resolve("tiny")
    assert to_ds_config(cfg, 2)["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default
    assert to_ds_config(cfg, 2, trained_params=1234)["zero_optimization"]["reduce_bucket_size"] == 1234
    assert to_ds_config(cfg, 2, trained_params=10**10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
