"""ImageNet-100: the fixed 100-class subset of ImageNet-1k on which the paper reports AiT-Medium
against ViT-Base, and the one-off index that keeps only its records of TFDS `imagenet2012`.

Filtering needs every record's label, which means reading the whole 1.28M-image split once; the
record indices of the kept classes are therefore cached as a .npy next to the TFDS data (written by
`prepare` or on first use), and every later start only loads that file.
"""
from collections.abc import Callable, Sequence
import concurrent.futures
import os
import pathlib

from absl import logging
import numpy as np

from ait_jax import errors

TFDS_NAME = 'imagenet2012'
# ImageNet cannot be downloaded automatically: TFDS's manual-download flow builds imagenet2012
# from these two archives of image-net.org, placed in <data_dir>/downloads/manual/.
MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
NUM_VAL_PER_CLASS = 50  # ILSVRC2012 validation: 50 images per class

# The 100 WordNet ids of ImageNet-100, in the order of the published list, which is the order of
# the labels 0..99. This is the list introduced with Contrastive Multiview Coding (Tian, Krishnan
# and Isola, "Contrastive Multiview Coding", arXiv:1906.05849, 2019), published as
# `imagenet100.txt` in github.com/HobbitLong/CMC, and the subset usually meant by "ImageNet-100".
# The AiT paper (arXiv:2309.12862) does not list its classes, and its published code
# (github.com/yuweisunn/associative-transformer) has no ImageNet loader, so this is the standard
# list, not one confirmed from the authors' code.
WNIDS = (
    'n02869837', 'n01749939', 'n02488291', 'n02107142', 'n13037406', 'n02091831', 'n04517823',
    'n04589890', 'n03062245', 'n01773797', 'n01735189', 'n07831146', 'n07753275', 'n03085013',
    'n04485082', 'n02105505', 'n01983481', 'n02788148', 'n03530642', 'n04435653', 'n02086910',
    'n02859443', 'n13040303', 'n03594734', 'n02085620', 'n02099849', 'n01558993', 'n04493381',
    'n02109047', 'n04111531', 'n02877765', 'n04429376', 'n02009229', 'n01978455', 'n02106550',
    'n01820546', 'n01692333', 'n07714571', 'n02974003', 'n02114855', 'n03785016', 'n03764736',
    'n03775546', 'n02087046', 'n07836838', 'n04099969', 'n04592741', 'n03891251', 'n02701002',
    'n03379051', 'n02259212', 'n07715103', 'n03947888', 'n04026417', 'n02326432', 'n03637318',
    'n01980166', 'n02113799', 'n02086240', 'n03903868', 'n02483362', 'n04127249', 'n02089973',
    'n03017168', 'n02093428', 'n02804414', 'n02396427', 'n04418357', 'n02172182', 'n01729322',
    'n02113978', 'n03787032', 'n02089867', 'n02119022', 'n03777754', 'n04238763', 'n02231487',
    'n03032252', 'n02138441', 'n02104029', 'n03837869', 'n03494278', 'n04136333', 'n03794056',
    'n03492542', 'n02018207', 'n04067472', 'n03930630', 'n03584829', 'n02123045', 'n04229816',
    'n02100583', 'n03642806', 'n04336792', 'n03259280', 'n02116738', 'n02108089', 'n03424325',
    'n01855672', 'n02090622',
)


def label_map(all_names: Sequence[str], kept: Sequence[str]) -> np.ndarray:
  """int32 array over the full label space: the new label 0..len(kept)-1 of each kept class in
  `kept`'s order, -1 for every other class."""
  position = {name: i for i, name in enumerate(all_names)}
  missing = [name for name in kept if name not in position]
  if missing or len(set(kept)) != len(kept):
    raise errors.ConfigError(f'The class subset must be distinct classes of the dataset; '
                             f'{missing or "duplicates"} are not.')
  out = np.full(len(all_names), -1, np.int32)
  out[[position[name] for name in kept]] = np.arange(len(kept), dtype=np.int32)
  return out


def index_path(data_dir: str, tfds_name: str, version: str, split: str, num_records: int,
               num_classes: int) -> pathlib.Path:
  """Where a subset's record indices live: in the TFDS dataset's own folder. The record count
  is part of the name, so an index never outlives the data it was made from."""
  return (pathlib.Path(data_dir) / tfds_name / version /
          f'subset{num_classes}_{split}_of_{num_records}.npy')


def load_or_build_index(path: pathlib.Path, num_records: int,
                        read_labels: Callable[[np.ndarray], np.ndarray], keep: np.ndarray,
                        chunk: int = 1024, threads: int = 8) -> np.ndarray:
  """int64 indices of the records whose label `keep` marks, in record order; read from `path`,
  or computed once with `read_labels(record_indices) -> labels` and saved there. Reads go in
  chunks of `chunk` records on `threads` threads (ImageNet records hold the JPEG, ~110 kB each)."""
  if path.exists():
    index = np.load(path)
    if index.ndim != 1 or (index.size and not 0 <= index.min() <= index.max() < num_records):
      raise errors.InputError(f'{path} is not an index of {num_records} records; delete it and run '
                              'again to rebuild it.')
    return index.astype(np.int64)
  logging.warning('Indexing the kept classes once: reading the labels of all %d records; the '
                  'result is saved to %s for later runs.', num_records, path)
  starts = range(0, num_records, chunk)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # record reads release the GIL
    labels = np.concatenate(list(pool.map(
        lambda s: np.asarray(read_labels(np.arange(s, min(s + chunk, num_records))), np.int64),
        starts))) if num_records else np.zeros(0, np.int64)
  index = np.flatnonzero(keep[labels]).astype(np.int64)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f'.tmp{os.getpid()}.npy')
    np.save(tmp, index)
    os.replace(tmp, path)  # atomic: processes that index at the same time never see half a file
  except OSError as e:
    raise OSError(f'Cannot write the class-subset index {path} ({e.strerror}); make the data_dir '
                  'writable or run `python -m ait_jax.data.prepare` once with write access.') from e
  logging.warning('Kept %d of %d records; index saved to %s.', index.size, num_records, path)
  return index
