"""Hugging Face transformers models (tiny configs, random init, no download) under pipeline
(GPipe, 1F1B, dp x pp) and tensor parallelism, on real gloo ranks, against the unsplit model
on the global batch computed in the same process: a Llama-style decoder (rotary positions,
grouped-query attention, input embedding tied to the LM head, cut between stages) and a
BERT-style masked-LM encoder (word embeddings tied to the decoder, a plan from its config).

Per case: the pre-flight accepts it; loss and every gradient of one step equal the unsplit
model's (pipeline cases feed dict inputs with an attention mask and position ids); three
AdamW steps end at the unsplit model's weights; the checkpoint's ``load_model_state`` loads
into a fresh transformers model with strict=True and gives the same logits.
One 2-rank and one 4-rank spawn (dp x pp and pp x tp).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import spawned_once

pytest.importorskip("transformers")

STEPS, BATCH, SEQ, VOCAB = 3, 8, 8, 256
TOL = 1e-5
LLAMA = ["model=hf_llama", "model.config.hidden_size=16", "model.config.intermediate_size=32",
         "model.config.num_hidden_layers=4", "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
         "model.config.max_position_embeddings=16"]
BERT = ["model=hf_bert", "model.config.hidden_size=16", "model.config.intermediate_size=32",
        "model.config.num_hidden_layers=4", "model.config.num_attention_heads=2",
        "model.config.max_position_embeddings=16"]
#: lr 0.002: AdamW turns float noise of near-zero gradients into steps of about lr x noise / eps-scale;
#: at 0.01 a tp-split BERT ended 1.4e-5 away (summation order only); a missing feature moves weights ~lr
COMMON = ["data=text", f"data.block_size={SEQ}", "loss=cross_entropy", "optim=adamw", "optim.lr=0.002"]
PIPE = ["strategy=pipeline", "strategy.micro_batches=2"]
TP = ["strategy=model_parallel", "strategy.mode=tensor"]
FAMILIES = {"llama": LLAMA, "bert": BERT}
EVALUATED = ("llama_1f1b", "llama_tp", "bert_dp_pp")   # validation loss through the stages / shards
VAL = 13                                               # an uneven last batch (padded by the pipeline)
#: world size -> case -> (family, overrides, dict inputs with mask / positions)
CASES = {
    2: {"llama_gpipe": ("llama", [*PIPE, "strategy.schedule=gpipe"], True),
        # the tied embedding / LM head on two stages counted once in the clipped global norm
        "llama_gpipe_clip": ("llama", [*PIPE, "strategy.schedule=gpipe", "trainer.grad_clip=0.05"], True),
        "llama_1f1b": ("llama", [*PIPE, "strategy.schedule=1f1b", "strategy.split_points=[model.layers.1]"], True),
        "llama_tp": ("llama", TP, False),
        # the whole model per rank (tensor inputs, as the loader gives them)
        "llama_ddp": ("llama", ["strategy=ddp"], False),
        "llama_fsdp": ("llama", ["strategy=fsdp"], False),
        "llama_ddp_ac": ("llama", ["strategy=ddp", "memory.activation_checkpointing=full"], False),
        "bert_gpipe": ("bert", [*PIPE, "strategy.schedule=gpipe"], True),
        "bert_1f1b": ("bert", [*PIPE, "strategy.schedule=1f1b", "memory.activation_checkpointing=full"], True),
        "bert_tp": ("bert", [*TP, "strategy.tp_plan={bert.encoder.layer.*.attention.self.query:colwise,"
                                  "bert.encoder.layer.*.attention.self.key:colwise,"
                                  "bert.encoder.layer.*.attention.self.value:colwise,"
                                  "bert.encoder.layer.*.attention.output.dense:rowwise}"], False)},
    4: {"llama_dp_pp": ("llama", [*PIPE, "strategy.schedule=1f1b", "dist.dp=2", "dist.pp=2"], True),
        "bert_dp_pp": ("bert", [*PIPE, "strategy.schedule=gpipe", "dist.dp=2", "dist.pp=2"], True),
        # each stage tensor-parallel from the model's own plan (pp x tp, 2 x 2)
        "llama_pp_tp": ("llama", [*PIPE, "strategy.schedule=1f1b", "dist.pp=2", "dist.tp=2"], True)},
}


def compose(family: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*FAMILIES[family], *COMMON, *overrides])


def batches(dp: int, masked: bool, seed: int = 3):
    """STEPS global batches of (inputs, next-token targets); with ``masked`` the inputs are a
    dict with an attention mask (the last positions of odd rows padded) and position ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH * dp, SEQ), generator=g)
        targets = torch.randint(0, VOCAB, (BATCH * dp, SEQ), generator=g)
        if masked:
            mask = torch.ones_like(ids)
            mask[1::2, -2:] = 0
            positions = torch.arange(SEQ).expand(len(ids), SEQ).clone()
            ids = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        out.append((ids, targets))
    return out


def _rows(inputs, index: int, count: int):
    if isinstance(inputs, dict):
        return {k: _rows(v, index, count) for k, v in inputs.items()}
    size = len(inputs) // count
    return inputs[index * size:(index + 1) * size]


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def reference(cfg, steps):
    """The unsplit model on the global batch: (loss, gradients, weights after AdamW steps, model)."""
    from hydra.utils import instantiate

    from disttrain.engine import builders
    factory = builders.model_factory(cfg)
    model = factory.materialize(factory.meta(), "cpu")
    loss_fn = instantiate(cfg.loss)
    optimizer = builders.optimizer_builder(cfg)(model.parameters())
    loss0 = grads = None
    norms = []
    for inputs, targets in steps:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(_call(model, inputs), targets)
        loss.backward()
        if grads is None:
            loss0, grads = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        if cfg.trainer.grad_clip is not None:  # parameters() holds a tied tensor once
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip).item())
        optimizer.step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return loss0, grads, weights, model, norms


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _case(case, spec, world_size, tmp, world, device) -> dict:
    from hydra.utils import instantiate

    from disttrain.checkpoint.commit import Checkpointer
    from disttrain.engine.build import build_engine
    from disttrain.engine.preflight import validate

    family, overrides, masked = spec
    dp = 2 if "dist.dp=2" in overrides or "strategy=ddp" in overrides or "strategy=fsdp" in overrides else 1
    cfg = compose(family, f"data.batch_size={BATCH}", *overrides)
    validate(cfg, world_size)
    steps = batches(dp, masked)
    clipping = [o for o in overrides if o.startswith("trainer.grad_clip")]
    ref_loss, ref_grads, ref_weights, ref_model, ref_norms = reference(compose(family, f"data.batch_size={BATCH * dp}", *clipping),
                                                            steps)
    strategy, engine = build_engine(cfg, world, device, Path(tmp) / case)
    index, count = strategy.data_shard()
    mine = [[(_rows(x, index, count), _rows(y, index, count))] for x, y in steps]
    loss_fn = instantiate(cfg.loss)
    stats = strategy.forward_backward(mine[0], loss_fn, engine.precision)
    names = dict(strategy.model.named_parameters(remove_duplicate=False))
    grad_diff = {n: (_full(p.grad) - ref_grads[n]).abs().max().item() for n, p in names.items()}
    engine.optimizer.zero_grad(set_to_none=True)
    norms = [engine.train_step(micro, loss_fn).extra.get("grad_norm") for micro in mine]
    weight_diff = {n: (_full(p.detach()) - ref_weights[n]).abs().max().item() for n, p in names.items()}
    extra = {"checkpointed": _checkpointed(strategy.model)}
    if case in EVALUATED:
        extra["val"], extra["ref_val"] = validation(strategy, cfg, device), validation(None, cfg, device, ref_model)
    run_dir = Path(tmp) / case
    Checkpointer(run_dir / "checkpoints").save(STEPS, engine.state_dict(), {})
    engine.close()
    out = {"loss": None if stats.loss is None else stats.loss.item(), "ref_loss": ref_loss,
           "grad_diff": grad_diff, "weight_diff": weight_diff, "ref_names": sorted(ref_weights),
           "norms": norms, "ref_norms": ref_norms, **extra}
    with torch.no_grad():
        later = (cfg, run_dir, steps[0][0], _call(ref_model, steps[0][0]).logits)
    return out, later


def _checkpointed(model) -> int:
    from disttrain.memory.checkpointing import _checkpointed_forward

    return sum(getattr(m.forward, "__func__", None) is _checkpointed_forward for m in model.modules())


def validation(strategy, cfg, device, ref_model=None) -> float:
    """The run's evaluation (strategy) or the unsplit model's mean loss per sample (ref_model)."""
    from hydra.utils import instantiate
    from torch.utils.data import TensorDataset

    from disttrain.engine.evaluate import evaluate
    from disttrain.strategies.precision import Precision

    g = torch.Generator().manual_seed(9)
    ids, targets = (torch.randint(0, VOCAB, (VAL, SEQ), generator=g) for _ in range(2))
    loss_fn = instantiate(cfg.loss)
    if ref_model is not None:
        with torch.no_grad():
            return sum(loss_fn(ref_model(ids[i:i + 1]), targets[i:i + 1]).item() for i in range(VAL)) / VAL
    return evaluate(strategy, TensorDataset(ids, targets), loss_fn, BATCH, Precision(32, device), device)


def reload(cfg, run_dir, inputs, ref_logits) -> dict:
    """``load_model_state`` into a fresh transformers model (strict) vs the unsplit model's logits
    (outside the process group: the reader is a single-process DCP load)."""
    from hydra.utils import instantiate

    from disttrain.checkpoint.commit import load_model_state

    state = load_model_state(run_dir)
    fresh = instantiate(cfg.model)
    missing = fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        diff = (_call(fresh, inputs).logits - ref_logits).abs().max().item()
    return {"strict": not missing.missing_keys and not missing.unexpected_keys, "logit_diff": diff,
            "tied_after_load": _tied(fresh)}


def _tied(model) -> bool:
    emb = model.get_input_embeddings().weight
    return any(p is emb for n, p in model.named_parameters(remove_duplicate=False) if not n.endswith("embeddings.weight")
               and "embed_tokens" not in n)


def _run(rank, world_size, tmp):
    from disttrain.distributed import env
    from disttrain.distributed import process_group as dist_setup

    world = env.detect()
    device = dist_setup.init(world, "gloo", 120)
    done = {case: _case(case, spec, world_size, tmp, world, device) for case, spec in CASES[world_size].items()}
    dist_setup.teardown()
    out = {case: row for case, (row, _) in done.items()}
    if rank == 0:
        for case, (row, later) in done.items():
            row.update(reload(*later))
    return out


two = spawned_once(_run, 2, "two")
four = spawned_once(_run, 4, "four")


ALL = [(2, case) for case in CASES[2]] + [(4, case) for case in CASES[4]]


def _results(request, size):
    return request.getfixturevalue({2: "two", 4: "four"}[size])


@pytest.mark.parametrize("size,case", ALL)
def test_loss_and_every_gradient_equal_the_unsplit_model(request, size, case):
    rows = _results(request, size)
    losses = [row[case]["loss"] for row in rows if row[case]["loss"] is not None]
    # one report per data-parallel replica (its shard's mean): their mean is the global batch's
    assert len(losses) == (2 if "dp_pp" in case or "_ddp" in case or "_fsdp" in case else 1), losses
    assert sum(losses) / len(losses) == pytest.approx(rows[0][case]["ref_loss"], abs=TOL), losses
    held = set()
    for row in rows:
        assert max(row[case]["grad_diff"].values()) < TOL, sorted(row[case]["grad_diff"].items(), key=lambda kv: -kv[1])[:3]
        held |= set(row[case]["grad_diff"])
    assert held == set(rows[0][case]["ref_names"])  # every parameter (tied names included) is somewhere


@pytest.mark.parametrize("size,case", ALL)
def test_three_adamw_steps_end_at_the_unsplit_models_weights(request, size, case):
    for row in _results(request, size):
        assert max(row[case]["weight_diff"].values()) < TOL, sorted(row[case]["weight_diff"].items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("size,case", ALL)
def test_load_model_state_loads_into_a_fresh_transformers_model(request, size, case):
    """strict=True (the stages' union has every key, tied names included, FQNs unchanged) and
    the loaded model's logits are the unsplit model's after the same steps."""
    row = _results(request, size)[0][case]
    assert row["strict"] and row["tied_after_load"]
    assert row["logit_diff"] < 1e-4, row["logit_diff"]


@pytest.mark.parametrize("size,case", [(2, c) for c in EVALUATED if c in CASES[2]] + [(4, c) for c in EVALUATED
                                                                                     if c in CASES[4]])
def test_validation_loss_equals_the_unsplit_models(request, size, case):
    for row in _results(request, size):
        assert row[case]["val"] == pytest.approx(row[case]["ref_val"], rel=1e-5), (row[case]["val"], row[case]["ref_val"])


def test_activation_checkpointing_recomputes_every_block_of_a_cut_stage(two):
    """memory.activation_checkpointing=full reaches the blocks inside the stage's ModuleList
    (2 of BERT's 4 layers per stage), and the case above still equals the unsplit model."""
    assert [row["bert_1f1b"]["checkpointed"] for row in two] == [2, 2]
    assert [row["bert_gpipe"]["checkpointed"] for row in two] == [0, 0]


def test_activation_checkpointing_finds_the_nested_layers_of_a_whole_model(two):
    """Under ddp the whole Llama is on each rank; full checkpointing finds its nested
    ``model.layers`` (4 decoder layers) and the case still equals the unsplit model."""
    assert [row["llama_ddp_ac"]["checkpointed"] for row in two] == [4, 4]


def test_clipping_counts_the_tied_weight_once_across_stages(two):
    """llama_gpipe_clip: the embedding (stage 0) and the LM head (stage 1) are one tensor; the
    clipped global norm of each step equals the unsplit model's (double counting the tied
    weight would raise it), and the norm is above the bound, so clipping acted."""
    for row in two:
        norms, ref = row["llama_gpipe_clip"]["norms"], row["llama_gpipe_clip"]["ref_norms"]
        assert len(norms) == len(ref) == STEPS and min(ref) > 0.05, (norms, ref)
        assert norms == pytest.approx(ref, rel=1e-5), (norms, ref)
