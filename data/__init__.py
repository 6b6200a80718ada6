"""Data for ablax: grain pipelines, tokenizers, packing, the built-in corpus.

    it = data.make_iterator(cfg, 'train', jax.process_index(), jax.process_count())

`data/pipeline.py` (batches, process sharding, mixtures, checkpointing),
`packing.py` (row layout), `sources.py` (builtin, text, jsonl, arrayrecord,
parquet, tokens, synthetic, sft), `mixture.py` (`data.mixture`), `corpus.py`
(raw files row by row), `sft.py` (SFT examples: records, chat template, loss
weights), `tokenizers.py` (bytes, sentencepiece, hf), `builtin.py` (the
stdlib corpus and the built-in prompt/continuation pairs). Command lines:
`python -m data.prepare` (`prepare.py`, token shards) and
`python -m data.train_tokenizer` (`train_tokenizer.py`, byte-level BPE).
See docs/data.md.
"""

from data import builtin
from data import packing
from data import pipeline
from data import sft
from data import sources
from data import tokenizers
from data.pipeline import has_eval
from data.pipeline import make_dataset
from data.pipeline import make_iterator
from data.sources import DataError
from data.sources import write_arrayrecord
from data.tokenizers import get_tokenizer
from data.tokenizers import TokenizerError
