"""`model.generate(..., custom_generate=<cllm dir>, trust_remote_code=True)`: Jacobi decoding behind transformers'
own entry point, for users who have only torch and transformers (docs/design/jacobi_forcing.md).

transformers calls `generate(model=model, **every generate() argument)`. This one reads the generation config
as `generate` does (the model's, updated by the call's keyword arguments), decodes greedily with `jacobi_generate`
at the block size measured fastest for the CLLM after its training (`config.cllm_decoding`), else the one it was
trained for (`config.cllm_n_tokens`), or `n_tokens=`, and returns what `generate`
returns: the sequences, or with `return_dict_in_generate=True` an output that also counts forwards and tokens per
forward. What Jacobi decoding cannot honour (sampling, beams, logits processors, assistants) is refused in one
line, never ignored. cllm_core/training/shipping.py bundles this module with the engine into the file a CLLM directory
ships, so the two cannot diverge.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from cllm_core.engine.errors import UserError
from cllm_core.engine.jacobi import jacobi_generate

# jacobi_generate's options, accepted as keywords
JACOBI_OPTIONS = ("n_tokens", "lookup", "lookup_branch", "blocks", "open_at", "pool")
IGNORED = {"synced_gpus": False, "use_model_defaults": None}  # generate's arguments that change nothing here
UNHONOURED = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_length",
              "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
              "forced_eos_token_id", "stop_strings", "max_time", "output_scores", "output_logits",
              "output_attentions", "output_hidden_states")  # generation settings greedy Jacobi does not apply
NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0}


@dataclass
class JacobiGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s output with Jacobi's counts: the batch's forward passes, each row's new tokens and forwards,
    and tokens per forward as every figure of the project counts it (new tokens over the forwards each row took
    part in: a batch of 3 rows that share 10 passes took 30, so the figure does not grow with the batch)."""

    forwards: int | None = None
    new_tokens: list[int] | None = None
    row_forwards: list[int] | None = None
    tokens_per_forward: float | None = None


def generate(inputs: torch.Tensor | None = None, *, model, generation_config=None, streamer=None, **kwargs):
    """Greedy Jacobi decoding with `generate`'s arguments; see the module docstring. `model` is a keyword:
    `from_pretrained(..., trust_remote_code=True)` binds it with `functools.partial(generate, model=model)`, and
    the prompt may then come first, positionally, as in `model.generate(input_ids, ...)`."""
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if input_ids is None:
        raise UserError("input_ids: pass the tokenized prompt (tokenizer(..., return_tensors='pt'))")
    attention_mask = kwargs.pop("attention_mask", None)
    jacobi = {key: kwargs.pop(key) for key in JACOBI_OPTIONS if kwargs.get(key) is not None}
    for key, default in IGNORED.items():
        kwargs.pop(key, default)
    unused = [key for key, value in kwargs.items() if value is not None and not _empty(value)]
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = [key for key in config.update(**{key: kwargs[key] for key in unused}) if key in unused]
    if unused:
        raise UserError(f"{', '.join(sorted(unused))}: not supported by Jacobi decoding, which is greedy; "
                        "call generate without them (or without custom_generate)")
    if config.do_sample or (config.num_beams or 1) > 1:
        raise UserError("do_sample/num_beams: Jacobi decoding is greedy; set do_sample=False and num_beams=1")
    unhonoured = [key for key in UNHONOURED if _asks(key, getattr(config, key, None))]
    if unhonoured:
        raise UserError(f"{', '.join(unhonoured)}: set in the generation config, but Jacobi decoding commits the "
                        "model's plain greedy tokens; unset them (or call generate without custom_generate)")
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = (config.max_length or 20) - input_ids.shape[1]  # 20: generate's default max_length
    chosen = (getattr(model.config, "cllm_decoding", None) or {}).get("n_tokens")  # measured fastest after training
    n_tokens = jacobi.pop("n_tokens", chosen or getattr(model.config, "cllm_n_tokens", None) or 16)
    out = jacobi_generate(model, input_ids, attention_mask, n_tokens=n_tokens, max_new_tokens=max_new_tokens,
                          eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, streamer=streamer,
                          **jacobi)
    if not config.return_dict_in_generate:
        return out.sequences
    stats = out.stats
    return JacobiGenerateOutput(sequences=out.sequences, forwards=stats.forwards, new_tokens=stats.row_new_tokens,
                                row_forwards=stats.row_forwards, tokens_per_forward=stats.tokens_per_forward)


def _asks(key: str, value) -> bool:
    """Whether a generation setting asks for something (None, False, empty and neutral values do not)."""
    return value is not None and value is not False and not _empty(value) and value != NEUTRAL.get(key, ())


def _empty(value) -> bool:
    """An empty logits-processor or stopping-criteria list asks for nothing."""
    return isinstance(value, list | tuple) and not value
