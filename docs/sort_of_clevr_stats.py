"""Sort-of-CLEVR answer statistics quoted in docs/data.md, recomputed from the generator's rules.

Majority-answer baselines per question type (the majority answer of each subtype, taken on the
train split, scored on train and test) and the share of "closest" answers that the original
generator's quirk changes (the answers of the builder config `sort_of_clevr/full_faithful`,
`clevr.answer(..., closest_quirk=True)`, against those of `full`). Reads no files: it replays the
seeds the TFDS builder uses (`builders._chunked`) without drawing images, which draws no random
numbers. About 12 s of CPU time.

  PYTHONPATH=. python docs/sort_of_clevr_stats.py
"""
import collections

import numpy as np

from ait_jax.data import builders
from ait_jax.data import sort_of_clevr as clevr

def scenes(split: int, num_images: int, seed: int = 0):
  """Yields (centers, shapes, questions, answers) exactly as the builder's split `split` holds."""
  for start in range(0, num_images, builders._CHUNK):  # pylint: disable=protected-access
    rng = np.random.default_rng([seed, split, start])
    for _ in range(min(builders._CHUNK, num_images - start)):  # pylint: disable=protected-access
      centers, shapes = clevr.sample_objects(rng)
      questions, answers = clevr.sample_questions(rng, centers, shapes)
      yield centers, shapes, questions, answers


def quirk_changes(centers, shapes, a: int) -> bool:
  """Whether the original's "closest to A" answer (A's own squared distance set to 999, as the
  builder config full_faithful stores it) differs from the truly closest object's shape."""
  closest = (1, 0)  # binary question, subtype closest_shape
  return (clevr.answer(centers, shapes, *closest, a, closest_quirk=True) !=
          clevr.answer(centers, shapes, *closest, a))


def main():
  counts = {s: collections.defaultdict(collections.Counter) for s in ('train', 'test')}
  closest = changed = 0
  for name, split, n in (('train', 0, clevr.NUM_TRAIN), ('test', 1, clevr.NUM_TEST)):
    for centers, shapes, questions, answers in scenes(split, n):
      for q, ans in zip(questions, answers):
        qtype, sub, a, _ = clevr.decode_question(q)
        counts[name][qtype, sub][int(ans)] += 1
        if name == 'train' and (qtype, sub) == (1, 0):
          closest += 1
          changed += quirk_changes(centers, shapes, a)
  train = counts['train']
  for t, tname in enumerate(clevr.QUESTION_TYPES):
    majority = {s: train[t, s].most_common(1)[0][0] for s in range(3)}
    words = ', '.join(f'{clevr.SUBTYPES[t][s]}: {clevr.ANSWERS[majority[s]]}' for s in range(3))
    for name in ('train', 'test'):
      c = counts[name]
      right = sum(c[t, s][majority[s]] for s in range(3))
      total = sum(sum(c[t, s].values()) for s in range(3))
      print(f'{tname:15s} majority baseline {name:5s} {100 * right / total:5.1f}%  ({words})')
  binary = [train[1, s] for s in range(3)]
  solved = sum(binary[0].values()) + sum(binary[1].values()) + max(binary[2].values())
  print(f'binary, closest/furthest solved and counts guessed: '
        f'{100 * solved / sum(sum(c.values()) for c in binary):.1f}% (train)')
  print(f'closest-object quirk changes {100 * changed / closest:.2f}% of closest answers, '
        f'{100 * changed / sum(sum(c.values()) for c in binary):.2f}% of binary answers (train)')


if __name__ == '__main__':
  main()
