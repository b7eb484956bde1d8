"""Every fact about a dataset in one place: shapes, classes, splits, label names, the question
size, and its preprocessing (crop, flip, normalisation, channels, host resize).

The input pipeline, the on-device preprocessing, the trainer and the figures all read a dataset's
`DatasetInfo` from here (docs/data.md), so adding a dataset is one entry in `DATASETS`.
"""
from collections.abc import Sequence
import dataclasses

from ait_jax import errors
from ait_jax.data import imagenet100 as inet
from ait_jax.data import sort_of_clevr as clevr
from ait_jax.data import triangle as tri

# The reference recipe normalises every natural-image dataset with the CIFAR statistics
# (docs/training.md#recipe).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# Pet images come in many sizes; they are resized on the host to this fixed size (bilinear, PIL)
# because the TFDS catalog stores the original JPEGs and JPEG decoding happens on the host anyway.
PET_IMAGE_SIZE = 224
# ImageNet-100 JPEGs are decoded and resized on the host the same way, to the usual ViT input
# size (configs/imagenet100.py says why).
IMAGENET100_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline, preprocessing and trainer need to know about one dataset.

  image_shape is as stored (before preprocessing); num_train/num_test count examples, which for
  Sort-of-CLEVR are (image, question) pairs of the selected question types.
  """
  name: str
  tfds_name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int
  train_split: str = 'train'
  test_split: str = 'test'
  label_names: tuple[str, ...] | None = None
  question_dim: int = 0  # > 0: every example has a question vector of this size
  # The question types (index = an example's 'qtype'), each with this many subtypes ('qsubtype'),
  # by which evaluation reports accuracies.
  question_types: tuple[str, ...] = ()
  question_subtypes: int = 0
  generated: bool = False  # built locally by a TFDS builder of `builders.py`, no download
  crop_padding: int = 0  # > 0: random crop after zero padding by this much (training)
  flip: bool = False  # random left-right flip (training)
  mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # after scaling to [0, 1]
  # Keep only these classes of the TFDS label space, relabelled 0..n-1 in this order; the other
  # records are skipped (through an index cached next to the TFDS data, see imagenet100.py).
  tfds_classes: tuple[str, ...] | None = None
  # Files the user must fetch by hand into <data_dir>/downloads/manual/ (TFDS manual download).
  manual_download: tuple[str, ...] = ()

  @property
  def has_question(self) -> bool:
    return self.question_dim > 0

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """Image shape the model sees after preprocessing: one-channel images become RGB."""
    h, w, _ = self.image_shape
    return (h, w, 3)

  def num_examples(self, split: str) -> int:
    return {self.train_split: self.num_train, self.test_split: self.num_test}[split]


_NATURAL = dict(flip=True, mean_std=(CIFAR_MEAN, CIFAR_STD))
_Q = clevr.QUESTIONS_PER_IMAGE
DATASETS = {
    'cifar10': DatasetInfo('cifar10', 'cifar10', (32, 32, 3), 10, 50_000, 10_000,
                           crop_padding=4, **_NATURAL),
    'cifar100': DatasetInfo('cifar100', 'cifar100', (32, 32, 3), 100, 50_000, 10_000,
                            crop_padding=4, **_NATURAL),
    'oxford_iiit_pet': DatasetInfo('oxford_iiit_pet', 'oxford_iiit_pet',
                                   (PET_IMAGE_SIZE, PET_IMAGE_SIZE, 3), 37, 3_680, 3_669,
                                   **_NATURAL),
    # num_train is the count usually reported for this class list (ILSVRC2012 has 732 to 1,300
    # training images per class); num_test is 100 classes x 50 validation images, checked against
    # the validation labels TFDS ships (tests/test_data_imagenet100.py).
    'imagenet100': DatasetInfo('imagenet100', inet.TFDS_NAME,
                               (IMAGENET100_IMAGE_SIZE, IMAGENET100_IMAGE_SIZE, 3), 100, 126_689,
                               5_000, test_split='validation', label_names=inet.WNIDS,
                               tfds_classes=inet.WNIDS, manual_download=inet.MANUAL_FILES,
                               **_NATURAL),
    'triangle': DatasetInfo('triangle', 'triangle/full', (tri.IMAGE_SIZE, tri.IMAGE_SIZE, 1), 2,
                            tri.NUM_TRAIN, tri.NUM_TEST, label_names=tri.LABEL_NAMES,
                            generated=True),
    'sort_of_clevr': DatasetInfo('sort_of_clevr', 'sort_of_clevr/full',
                                 (clevr.IMAGE_SIZE, clevr.IMAGE_SIZE, 3), clevr.NUM_ANSWERS,
                                 clevr.NUM_TRAIN * _Q, clevr.NUM_TEST * _Q,
                                 label_names=clevr.ANSWERS, question_dim=clevr.QUESTION_DIM,
                                 question_types=clevr.QUESTION_TYPES,
                                 question_subtypes=len(clevr.SUBTYPES[0]), generated=True),
}


def get_info(name: str, question_types: Sequence[str] | None = None) -> DatasetInfo:
  """Info for a dataset name; generated datasets accept a builder config, e.g. 'triangle/small'.

  For sort_of_clevr, num_train/num_test count the (image, question) examples of `question_types`.
  """
  base, _, config = name.partition('/')
  if base not in DATASETS:
    raise errors.ConfigError(f'Unknown dataset {name!r}; use one of {sorted(DATASETS)}.')
  info = DATASETS[base]
  if config:
    from ait_jax.data import builders  # pylint: disable=g-import-not-at-top  (imports TFDS)
    if not info.generated:
      raise errors.ConfigError(
          f'Only {sorted(builders.GENERATED)} take a config suffix, got {name!r}.')
    configs = {c.name: c for c in builders.GENERATED[base].BUILDER_CONFIGS}
    if config not in configs:
      raise errors.ConfigError(f'Unknown config in {name!r}; use one of {sorted(configs)}.')
    c = configs[config]
    per_image = _Q if info.has_question else 1
    info = dataclasses.replace(info, name=name, tfds_name=f'{base}/{config}',
                               num_train=c.num_train * per_image, num_test=c.num_test * per_image)
  if info.has_question:
    kept = len(clevr.question_type_indices(question_types)) / 3
    info = dataclasses.replace(info, num_train=round(info.num_train * kept),
                               num_test=round(info.num_test * kept))
  elif question_types:
    raise errors.ConfigError(f'question_types is only for datasets with questions, not {name!r}.')
  return info
