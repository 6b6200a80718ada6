"""`next_line`'s design, with a model-free scorer: the passage carries signal
about its line, a line's own likelihood drowns it in the plain ranking, and
the calibrated ranking (minus the score after the neutral prompt) recovers it."""

import re

import numpy as np

from train import tasks


def _words(text):
  return set(re.findall(r'[A-Za-z_]\w+', text))


def test_calibration_recovers_what_the_passage_says_under_the_lines_own_score():
  examples = tasks.next_line_examples(400)
  task = tasks.Task('next_line', examples, 128, neutral='\n')

  def own(line):       # a line's own score: large, integer (sums stay exact)
    return -1000 * len(line) + tasks._hash(line) % 997  # pylint: disable=protected-access

  def overlap(context, line):   # what the last 128 characters say about the line
    return len(_words(line) & _words(context[-128:]))

  scores = [own(x) + overlap(c, x) for e in examples for c, x in zip(e.contexts, e.choices)]
  scores += [own(x) for x in task.distinct_choices()]          # after the neutral prompt
  m = tasks.task_metrics(task, np.asarray(scores, np.float64), np.zeros(len(scores), bool))

  # The plain ranking follows the lines' own scores: exactly chance (each
  # candidate is the true line of one example of its group of four).
  assert m['accuracy'] == m['accuracy_norm'] == 0.25
  # The calibrated ranking is the overlap's ranking (first index on ties,
  # as np.argmax), and the overlap is far above chance.
  want = np.mean([np.argmax([overlap(c, x) for c, x in zip(e.contexts, e.choices)]) == e.label
                  for e in examples])
  assert m['accuracy_calibrated'] == want
  assert m['accuracy_calibrated_ci95'][0] > 0.5, m
