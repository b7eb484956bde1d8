"""CIFAR-10 and CIFAR-100 read with NumPy from their published binary archives: fixed-size records
(one label byte per label kind, then a 32×32 image as 3,072 bytes in R, G, B planes).

The TFDS builders in `builders.py` write what this reads; the layouts name the archive members.
"""
import dataclasses
import tarfile

import numpy as np

IMAGE_SHAPE = (32, 32, 3)
_IMAGE_BYTES = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class Layout:
  """One archive's members, as the TFDS catalog's CIFAR builders read them."""
  archive: str  # the file name in downloads.ARCHIVES
  folder: str  # the archive's top folder
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  # Per label byte of a record, in record order: its feature name and the file of its names.
  label_keys: tuple[str, ...]
  label_files: tuple[str, ...]
  num_classes: tuple[int, ...]


CIFAR10 = Layout('cifar-10-binary.tar.gz', 'cifar-10-batches-bin',
                 tuple(f'data_batch_{i}.bin' for i in range(1, 6)), ('test_batch.bin',),
                 ('label',), ('batches.meta.txt',), (10,))
CIFAR100 = Layout('cifar-100-binary.tar.gz', 'cifar-100-binary', ('train.bin',), ('test.bin',),
                  ('coarse_label', 'label'), ('coarse_label_names.txt', 'fine_label_names.txt'),
                  (20, 100))


def parse_records(data: bytes, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels uint8 [n, num_labels], images uint8 [n, 32, 32, 3]) of one binary batch file."""
  size = num_labels + _IMAGE_BYTES
  if len(data) % size:
    raise ValueError(f'holds {len(data):,} bytes, not a whole number of {size}-byte records')
  rows = np.frombuffer(data, np.uint8).reshape(-1, size)
  images = rows[:, num_labels:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return rows[:, :num_labels], images


def read(path: str, layout: Layout) -> tuple[dict[str, list[str]], dict[str, tuple]]:
  """The label names per label key, and (labels, images) per split ('train', 'test').

  Raises ValueError naming the member when the archive is not in the published layout.
  """
  wanted = {f'{layout.folder}/{f}' for f in
            (*layout.train_files, *layout.test_files, *layout.label_files)}
  members = {}
  with tarfile.open(path, 'r:*') as tar:  # read in archive order: a .gz cannot seek back cheaply
    for member in tar:
      if member.name in wanted and member.isfile():
        members[member.name] = tar.extractfile(member).read()
  missing = sorted(wanted - members.keys())
  if missing:
    raise ValueError(f'has no {missing[0]}')
  names = {}
  for key, file, n in zip(layout.label_keys, layout.label_files, layout.num_classes):
    names[key] = [line.strip() for line in members[f'{layout.folder}/{file}'].decode().split('\n')
                  if line.strip()]
    if len(names[key]) != n:
      raise ValueError(f'lists {len(names[key])} names in {file}, not {n}')
  splits = {}
  for split, files in (('train', layout.train_files), ('test', layout.test_files)):
    parts = []
    for file in files:
      try:
        parts.append(parse_records(members[f'{layout.folder}/{file}'], len(layout.label_keys)))
      except ValueError as e:
        raise ValueError(f'{layout.folder}/{file} {e}') from None
    labels = np.concatenate([p[0] for p in parts])
    if (labels >= np.array(layout.num_classes, np.uint8)).any():
      raise ValueError(f'has labels out of range in its {split} files')
    splits[split] = (labels, np.concatenate([p[1] for p in parts]))
  return names, splits
