"""The ablax decoder, assembled from `config.model` flags (see README's flag table).

    decoder = model.Decoder(cfg.model, rngs=flax.nnx.Rngs(0))
    logits, aux = decoder(tokens, segment_ids=None, positions=None)
    model.count_params(cfg.model); model.flops_per_token(cfg.model, seq_len)
    model.cache_numbers_per_token(cfg.model)   # KV-cache numbers per token per layer

One file per concept: `norms`, `positions`, `mlp`, `moe`, `attention` (the
layer), `mla` (multi-head latent attention), `attention_core` and `masking` (the attention math shared with the
kernels in `kernels/`), `decoder` (blocks and the model), `flops` (parameter
and FLOP counts), `hf` (Hugging Face import/export, loaded on first use).
"""

from model.decoder import Decoder
from model.flops import cache_numbers_per_token
from model.flops import count_params
from model.flops import flops_per_token

__all__ = ['Decoder', 'cache_numbers_per_token', 'count_params', 'flops_per_token', 'hf']


def __getattr__(name):
  # `model.hf` (Hugging Face import/export) loads on first use, so `import model`
  # stays light for the layers and kernels.
  if name == 'hf':
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module('model.hf')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
