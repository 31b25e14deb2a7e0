"""Cutting models that are not an nn.Sequential by module name (disttrain.parallel.fqn_split),
in one process: the plan found for transformers models (Llama, BERT) and for a model that
declares its split, stages chained by hand equal the unsplit model, the refusals, split
points, balance, and the tensor plan from a model's config or strategy.tp_plan."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from helpers import cli_env, run_process

pytest.importorskip("transformers")

from disttrain.models.hf import build  # noqa: E402
from disttrain.parallel import fqn_split, stage_forward, tensor  # noqa: E402
from disttrain.parallel.fqn_split import CutError  # noqa: E402
from disttrain.parallel.materialize import ModelFactory  # noqa: E402

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True)
BERT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            max_position_embeddings=16)


def factory(arch, config):
    return ModelFactory(build=lambda: build(arch, config), seed=3)


def chained(f: ModelFactory, counts: list[int], inputs: dict) -> torch.Tensor:
    """The stages of ``counts`` blocks each, materialized and run one after the other."""
    meta = f.meta()
    plan = fqn_split.plan_cut(meta, inputs["input_ids"])
    x, start = inputs["input_ids"], 0
    extras = {k: v for k, v in inputs.items() if k != "input_ids"}
    for s, count in enumerate(counts):
        stage = f.materialize_part(fqn_split.cut(meta, plan, start, start + count), "cpu")
        stage_forward.install(stage, plan, s == 0, s == len(counts) - 1)
        x = stage(x, model_input=inputs["input_ids"], **extras)
        start += count
    return x


def test_the_plan_of_llama_and_bert_finds_blocks_ends_and_tied_weights():
    ids = torch.zeros(2, 8, dtype=torch.long)
    llama = fqn_split.plan_cut(factory("LlamaForCausalLM", LLAMA).meta(), ids)
    assert (llama.blocks, llama.names) == ("model.layers", ("0", "1", "2", "3"))
    assert llama.first == ("model.embed_tokens",) and llama.last == ("model.norm", "lm_head")
    assert llama.tied == (("model.embed_tokens.weight", "lm_head.weight"),)
    bert = fqn_split.plan_cut(factory("BertForMaskedLM", BERT).meta(), ids)
    assert bert.blocks == "bert.encoder.layer" and bert.first == ("bert.embeddings",) and bert.last == ("cls",)
    assert ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight") in bert.tied


@pytest.mark.parametrize("arch,config,counts", [("LlamaForCausalLM", LLAMA, [1, 2, 1]),
                                                ("BertForMaskedLM", BERT, [3, 1])])
def test_stages_chained_by_hand_equal_the_unsplit_model_with_a_mask(arch, config, counts):
    f = factory(arch, config)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, -3:] = 0
    inputs = {"input_ids": torch.randint(0, 64, (3, 8), generator=g), "attention_mask": mask}
    whole = f.materialize(f.meta(), "cpu")
    expected = whole(**inputs).logits
    assert torch.allclose(chained(f, counts, inputs), expected, atol=1e-6)
    # without the mask on the later stages the answer is different (the mask really travels)
    assert not torch.allclose(whole(input_ids=inputs["input_ids"]).logits, expected, atol=1e-3)


def test_stage_state_dicts_are_slices_of_the_unsplit_models():
    f = factory("LlamaForCausalLM", LLAMA)
    meta = f.meta()
    plan = fqn_split.plan_cut(meta, torch.zeros(1, 4, dtype=torch.long))
    keys = [set(fqn_split.cut(meta, plan, a, b).state_dict()) for a, b in ((0, 1), (1, 4))]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(meta.state_dict())
    assert "lm_head.weight" in keys[1] and "model.embed_tokens.weight" in keys[0]


class Declared(nn.Module):
    """A user model following the protocol: its forward skips deleted (None) modules."""

    pipeline_blocks, pipeline_first, pipeline_last = "layers", ("embed",), ("head",)

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(4)})
        self.head = nn.Linear(8, 32)

    def forward(self, x):
        x = self.embed(x) if self.embed is not None else x
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return self.head(x) if self.head is not None else x


def test_a_declared_split_is_cut_without_tracing():
    f = ModelFactory(build=Declared, seed=1)
    ids = torch.randint(0, 32, (2, 5))
    plan = fqn_split.plan_cut(f.meta(), ids)
    assert plan.declared and plan.names == ("0", "1", "2", "3")
    assert torch.allclose(chained(f, [2, 2], {"input_ids": ids}), f.full()(ids), atol=1e-6)


class Looped(nn.Module):
    """One block run twice (weights shared across depth, as ALBERT does)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for _ in range(2):
            x = self.blocks[0](x)
        return self.blocks[1](x)


class Between(nn.Module):
    """A module with parameters runs between the blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.mid = nn.Linear(4, 4)

    def forward(self, x):
        return self.blocks[1](self.mid(self.blocks[0](x)))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("model,message", [
    (Looped, "block blocks.0 runs 2 times in one forward of Looped"),
    (Between, "module mid of Between runs between its blocks"),
    (Plain, "Plain has no nn.ModuleList of repeated blocks"),
])
def test_models_that_cannot_be_cut_are_refused_in_one_line_pointing_to_the_protocol(model, message):
    with torch.device("meta"):
        meta = model()
    with pytest.raises(CutError) as info:
        fqn_split.plan_cut(meta, torch.zeros(2, 4))
    text = str(info.value)
    assert message in text and "pipeline_blocks" in text and "\n" not in text


def test_split_points_and_param_balance():
    f = factory("LlamaForCausalLM", {**LLAMA, "vocab_size": 4096, "tie_word_embeddings": False})
    meta = f.meta()
    plan = fqn_split.plan_cut(meta, torch.zeros(1, 4, dtype=torch.long))
    assert fqn_split.counts_from_split_points(plan, ["model.layers.1"], 2) == [1, 3]
    with pytest.raises(ValueError, match=r"'model.layers.9' is not a block of the model; choose from model.layers.1"):
        fqn_split.counts_from_split_points(plan, ["model.layers.9"], 2)
    with pytest.raises(ValueError, match="must list 2 block names"):
        fqn_split.counts_from_split_points(plan, ["model.layers.1"], 3)
    from disttrain.parallel.split import partition
    # 4096 x 16 embedding on the first stage and as large a head on the last: blocks go to the middle
    assert partition(fqn_split.block_weights(meta, plan), 4) == [1, 1, 1, 1]
    assert partition(fqn_split.block_weights(meta, plan), 3) == [1, 2, 1]


def test_tensor_plans_from_the_models_config_and_from_strategy_tp_plan():
    llama = factory("LlamaForCausalLM", LLAMA).meta()
    plan = tensor.plan_for(llama)
    assert type(plan["model.layers.3.self_attn.k_proj"]).__name__ == "ColwiseParallel"
    assert type(plan["model.layers.0.mlp.down_proj"]).__name__ == "RowwiseParallel"
    assert "lm_head" not in plan and len(plan) == 4 * 7
    bert = factory("BertForMaskedLM", BERT).meta()
    assert len(tensor.plan_for(bert)) == 4 * 6  # the builder's plan for BERT (its config has none)
    mine = tensor.plan_for(bert, {"bert.encoder.layer.*.intermediate.dense": "colwise",
                                  "bert.encoder.layer.*.output.dense": "rowwise"})
    assert sorted(mine) == sorted([f"bert.encoder.layer.{i}.{n}" for i in range(4)
                                   for n in ("intermediate.dense", "output.dense")])
    with pytest.raises(ValueError, match=r"strategy.tp_plan: bert.pooler='colwise_rep' is not one of colwise"):
        tensor.plan_for(bert, {"bert.pooler": "colwise_rep"})
    with pytest.raises(ValueError, match="dist.tp=4 does not divide model.config.num_key_value_heads=2"):
        tensor.check_divisible(llama, 4)
    with pytest.raises(ValueError, match=r"dist.tp=3 does not divide layer model.layers.0.self_attn.q_proj \(16"):
        tensor.check_divisible(llama, 3)


def test_a_model_that_cannot_be_cut_exits_2_with_one_line(tmp_path):
    """ALBERT shares one layer across its depth: no list of blocks to cut between."""
    cmd = [sys.executable, "-m", "disttrain", "model=hf_bert", "model.architecture=AlbertForMaskedLM",
           "+model.config.embedding_size=16", "model.config.hidden_size=16", "model.config.num_attention_heads=2",
           "model.config.intermediate_size=32", "data=text", "data.block_size=8", "loss=cross_entropy",
           "strategy=pipeline", "dist.nproc_per_node=2", "strategy.micro_batches=2", f"hydra.run.dir={tmp_path}"]
    proc = run_process(cmd, timeout=120, env=cli_env())
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert err.startswith("disttrain: config error: pipeline: AlbertForMaskedLM has no nn.ModuleList of repeated "
                          "blocks") and "pipeline_blocks" in err, err


HF_LLAMA = ["model=hf_llama", "model.config.hidden_size=16", "model.config.intermediate_size=32",
            "model.config.max_position_embeddings=16", "data=text", "data.block_size=8", "loss=cross_entropy",
            "strategy=pipeline", "strategy.micro_batches=2"]


@pytest.mark.parametrize("overrides,world,message", [
    (["strategy.schedule=interleaved_1f1b", "strategy.stages_per_rank=2"], 2,
     "strategy.schedule=interleaved_1f1b places several stages on a rank; LlamaForCausalLM is cut by module name"),
    (["strategy.balance=time"], 2, "strategy.balance=time measures the layers of an nn.Sequential"),
    (["strategy.split_points=[model.layers.0]"], 2, "must name distinct blocks after the first"),
    (["dist.pp=2", "dist.tp=4"], 8, "dist.tp=4 does not divide model.config.num_key_value_heads=2"),
    (["strategy.data_parallel=shard", "dist.pp=2"], 4, "strategy.data_parallel=shard cannot initialise stages"),
    (["dist.pp=8", "strategy.schedule=gpipe"], 8, "8 pipeline stages but model.layers holds only 4 blocks"),
])
def test_pipeline_settings_a_cut_model_cannot_honour_are_refused_before_workers_start(overrides, world, message):
    from hydra import compose, initialize_config_dir

    from disttrain.config.errors import ConfigError
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.preflight import validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*HF_LLAMA, *overrides])
    with pytest.raises(ConfigError) as info:
        validate(cfg, world)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_clipping_with_a_weight_tied_across_stages_counts_it_once_or_is_refused():
    from disttrain.parallel import clip
    from disttrain.parallel.cut_pipeline import DUPLICATE

    overrides = [*HF_LLAMA, "trainer.grad_clip=1.0"]
    from hydra import compose, initialize_config_dir

    from disttrain.config.errors import ConfigError
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.preflight import validate

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if getattr(clip, "TIED_DUPLICATE", None) == DUPLICATE:  # the norm skips the marked copies
        validate(cfg, 2)
        return
    with pytest.raises(ConfigError, match="model.embed_tokens.weight tied to lm_head.weight on another pipeline stage"):
        validate(cfg, 2)
