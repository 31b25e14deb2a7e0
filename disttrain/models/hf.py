"""Hugging Face transformers models from a config alone (random init, no download): the
``model._target_`` of conf/model/hf_*.yaml. ``transformers`` is the optional ``[hf]`` extra.

The builder returns the transformers model itself, not a wrapper, so parameter names are the
library's: a checkpoint's ``load_model_state`` loads into ``Architecture(config)`` with
``load_state_dict(strict=True)``. Training settings: no KV cache, no dropout unless asked
(stages and tensor-parallel shards would draw different dropout masks than one process).
"""
from __future__ import annotations

from typing import Any

from torch import nn

#: tensor-parallel plans (relative to the base model) for architectures whose config carries
#: none; transformers' own ``base_model_tp_plan`` is used where it exists (Llama, Qwen, ...).
BASE_TP_PLANS = {
    "bert": {
        "encoder.layer.*.attention.self.query": "colwise",
        "encoder.layer.*.attention.self.key": "colwise",
        "encoder.layer.*.attention.self.value": "colwise",
        "encoder.layer.*.attention.output.dense": "rowwise",
        "encoder.layer.*.intermediate.dense": "colwise",
        "encoder.layer.*.output.dense": "rowwise",
    },
}

_NO_DROPOUT = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout",
               "dropout", "classifier_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def build(architecture: str, config: dict[str, Any] | None = None, dropout: bool = False,
          attn_implementation: str = "sdpa") -> nn.Module:
    """``transformers.<architecture>`` (e.g. LlamaForCausalLM, BertForMaskedLM) built from its
    config class with ``config`` (tiny sizes for tests), randomly initialised."""
    try:
        import transformers
    except ImportError:
        raise ImportError("model._target_=disttrain.models.hf.build needs transformers: "
                          "pip install 'disttrain[hf]'") from None
    cls = getattr(transformers, architecture, None)
    if cls is None or not hasattr(cls, "config_class"):
        raise ValueError(f"model.architecture={architecture!r} is not a transformers model class "
                         "(e.g. LlamaForCausalLM, BertForMaskedLM).")
    settings = dict(config or {})
    settings.setdefault("use_cache", False)
    probe = cls.config_class()
    if not dropout:
        settings.update({key: 0.0 for key in _NO_DROPOUT if isinstance(getattr(probe, key, None), float)})
    hf_config = cls.config_class(**settings)
    hf_config._attn_implementation = attn_implementation
    if not getattr(hf_config, "base_model_tp_plan", None) and hf_config.model_type in BASE_TP_PLANS:
        hf_config.base_model_tp_plan = dict(BASE_TP_PLANS[hf_config.model_type])
    return cls(hf_config)
