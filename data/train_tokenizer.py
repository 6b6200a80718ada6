"""Fit a byte-level BPE tokenizer to your corpus: `python -m data.train_tokenizer`.

    python -m data.train_tokenizer --input '/data/web/*.parquet' --vocab_size 32000 --out /tok
    python -m data.prepare ... --tokenizer hf:/tok       # and data.tokenizer='hf:/tok'

Byte-level BPE (Sennrich et al. 2016 on GPT-2's byte alphabet, Radford et al.
2019) trained with Hugging Face `tokenizers`: every byte is in the initial
alphabet, so no text is ever unknown, and `decode(encode(text)) == text`.
The vocabulary holds `--vocab_size` ids, the specials `<|startoftext|>` (BOS)
and `<|endoftext|>` (EOS) first. The folder gets `tokenizer.json` and a
`tokenizer_config.json` naming BOS and EOS, which `hf:DIR` reads.

Input files are read as `data.prepare` reads them (`data/corpus.py`); the
format comes from the extension (`.parquet`, `.jsonl`/`.json`, else text)
unless `--format` says. Bad rows are skipped and counted.
"""

import json
import os
from absl import flags

from configs import cli
from configs import errors
from data import corpus
from data import prepare
from data import sources
from data import tokenizers

BOS, EOS = '<|startoftext|>', '<|endoftext|>'


def texts(paths, format: str | None, text_field: str, counts: dict):
  """Good rows of `paths`; `counts['bad_rows']` counts the others."""
  for path in paths:
    kind = format or corpus.format_of(path)
    if kind not in corpus.FORMATS:
      raise sources.DataError(f'{path}: {kind} files cannot be read here; use '
                              'text, jsonl or parquet')
    for part in corpus.parts([path], kind, text_field, 1 << 30):
      for _, text in corpus.read_part(part, kind, text_field):
        if isinstance(text, corpus.BadRow):
          counts['bad_rows'] += 1
        else:
          counts['documents'] += 1
          yield text


def train_tokenizer(inputs, out: str, vocab_size: int, *, format: str | None = None,
                    text_field: str = 'text', min_frequency: int = 2) -> dict:
  """Trains the BPE on `inputs` (globs) and writes it to `out`; returns counts."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  if vocab_size < 256 + 2:
    raise sources.DataError(f'--vocab_size={vocab_size}: byte-level BPE needs at '
                            'least 258 ids (256 bytes and BOS, EOS)')
  paths = corpus.expand_inputs(inputs)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BOS, EOS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  counts = {'documents': 0, 'bad_rows': 0}
  tok.train_from_iterator(texts(paths, format, text_field, counts), trainer=trainer)
  if counts['documents'] == 0:
    raise sources.DataError(f'no text in {", ".join(paths)}')
  os.makedirs(out, exist_ok=True)
  tok.save(os.path.join(out, 'tokenizer.json'))
  with open(os.path.join(out, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'bos_token': BOS, 'eos_token': EOS}, f, indent=1)
    f.write('\n')
  counts['vocab_size'] = tokenizers.get_tokenizer(f'hf:{out}').vocab_size
  return counts


FLAGS = flags.FlagValues()
prepare.define_input_flags(FLAGS, 'text, jsonl or parquet (default: from each file\'s '
                           'extension)')
flags.DEFINE_integer('vocab_size', None, 'ids in the vocabulary, the two specials (BOS, '
                     'EOS) included; at least 258', flag_values=FLAGS)
flags.DEFINE_integer('min_frequency', 2, 'merges of pairs seen fewer times are not learned',
                     flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m data.train_tokenizer ARGS` (argv without the program name)."""
  args = cli.parse(FLAGS, argv, doc=__doc__, prog='python -m data.train_tokenizer',
                   required=('input', 'vocab_size', 'out'))
  counts = train_tokenizer(args.input, args.out, args.vocab_size, format=args.format,
                           text_field=args.text_field, min_frequency=args.min_frequency)
  print(f'wrote {args.out}: {counts["vocab_size"]:,} ids from {counts["documents"]:,} '
        f'documents ({counts["bad_rows"]} bad rows skipped); use '
        f"--config.data.tokenizer='hf:{args.out}'")
  return 0


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
