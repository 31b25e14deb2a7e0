"""The forward of a stage cut by FQN (disttrain.parallel.fqn_split): the model's own forward,
entered and left at the stage's blocks.

Every stage calls the model's forward on the step's model inputs (input ids and the extra
keyword arguments: attention mask, position ids), so the preamble that the blocks need
(causal mask, rotary position embeddings) is computed on each stage exactly as in the unsplit
model. A middle stage then swaps the hidden state going into its first block for the
activation the previous stage sent, and every stage but the last leaves the forward as soon
as its last block has run (nothing after the blocks is computed). The last stage returns the
model's output, or the configured field of it (``ModelOutput.logits``): pipeline stages pass
tensors.

Models that follow the declared protocol (``pipeline_blocks``: their forward skips deleted
modules) are called directly on the activation instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from disttrain.models.losses import select_output
from disttrain.parallel.fqn_split import CutPlan


class _StageDone(Exception):
    """Raised after the stage's last block: the rest of the model is another stage's."""

    def __init__(self, output):
        super().__init__("stage output ready")
        self.output = output


def install(stage: nn.Module, plan: CutPlan, is_first: bool, is_last: bool, output_key: str = "logits") -> None:
    """Replace ``stage.forward`` (on the instance: names and state dict unchanged) by
    ``forward(x, model_input=None, **extras)``: ``x`` is the model input on the first stage
    and the previous stage's activation on the others; ``model_input`` and ``extras`` (the
    same on every stage) are what the model's own forward is called with."""
    model_forward = stage.forward
    container = stage.get_submodule(plan.blocks)
    blocks = list(container.children())
    pending: dict[str, torch.Tensor] = {}

    if plan.declared:
        def forward(x, model_input=None, **extras):
            out = model_forward(x, **extras)
            return select_output(out, output_key) if is_last else _first_tensor(out)
        stage.forward = forward
        return

    def swap_input(module, args, kwargs):
        if "activation" not in pending:
            return None
        x = pending.pop("activation")
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def leave(module, args, output):
        raise _StageDone(_first_tensor(output))

    if not is_first:
        blocks[0].register_forward_pre_hook(swap_input, with_kwargs=True)
    if not is_last:
        blocks[-1].register_forward_hook(leave)

    def forward(x, model_input=None, **extras):
        if is_first:
            model_input = x
        else:
            if model_input is None:
                raise ValueError("a middle pipeline stage needs the model input (model_input=) to rebuild "
                                 "the model's masks and positions")
            pending["activation"] = x
        try:
            out = model_forward(model_input, **extras)
        except _StageDone as done:
            return done.output
        finally:
            pending.clear()
        return select_output(out, output_key)

    stage.forward = forward


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return select_output(output, "last_hidden_state")
