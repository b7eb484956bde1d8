"""TFDS builders of ours: the generated benchmarks (`triangle`, `sort_of_clevr`) and the datasets
built from their published archives (`cifar10`, `cifar100`, `oxford_iiit_pet`).

All write ArrayRecord through TFDS's own writer, which needs no TensorFlow for these features
(images are encoded with Pillow here); the downloaded ones keep the TFDS catalog's name, version,
splits and features, so either can read what the other wrote. The same config gives the same
bytes in every process (`build`).
"""
from collections.abc import Iterator
import contextlib
import dataclasses
import inspect
import io
import sys
import tarfile
import zlib

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core.utils import tqdm_utils
import tqdm

from ait_jax import errors
from ait_jax.data import cifar
from ait_jax.data import oxford_iiit_pet as pet
from ait_jax.data import sort_of_clevr as clevr
from ait_jax.data import triangle as tri

# Chunks keep memory flat while generating; one chunk per seed keeps the output independent of
# how many workers a future version might use.
_CHUNK = 1000


@dataclasses.dataclass(eq=True, frozen=False)
class GeneratedConfig(tfds.core.BuilderConfig):
  """Split sizes and seed; 'full' is the dataset of docs/data.md, 'small' is for tests and smoke
  runs."""
  num_train: int = 0
  num_test: int = 0
  seed: int = 0
  closest_quirk: bool = False  # Sort-of-CLEVR: the original generator's "closest" answers


def _chunked(generate, num_images: int, seed: list[int], **kwargs):
  """Yields (index, example-dict) from `generate(n, seed, **kwargs)` on fixed-size chunks."""
  for start in range(0, num_images, _CHUNK):
    n = min(_CHUNK, num_images - start)
    # SeedSequence-style entropy makes every chunk of every split an independent stream.
    data = generate(n, [*seed, start], **kwargs)
    for i in range(n):
      yield start + i, {k: v[i] for k, v in data.items()}


class _OwnBuilder(tfds.core.GeneratorBasedBuilder):
  """What all our builders share; abstract, so TFDS does not register it."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources`, which TFDS does not install.
    return epath.Path(inspect.getfile(cls))

  # TFDS prints "Downloading and preparing dataset ... (download: ...)" and "... downloaded and
  # prepared" around every build; `prepare` says what happens in its own words.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _counted(self, splits: dict[str, tuple[int, Iterator]]) -> dict[str, Iterator]:
    """The split generators {split: (examples, generator)}, counted on one progress bar (TFDS's
    own bars, one per split and per shuffle, are off while `build` runs)."""
    name = f'{self.name}/{self.builder_config.name}' if self.builder_config else self.name
    self.progress = tqdm.tqdm(total=sum(n for n, _ in splits.values()), unit=' examples',
                              desc=f'Writing {name}', file=sys.stderr, mininterval=0.5)

    def counted(generator):
      for item in generator:
        self.progress.update()
        yield item

    return {split: counted(generator) for split, (_, generator) in splits.items()}


class _GeneratedBuilder(_OwnBuilder):
  """The generated benchmarks: two splits drawn from the config's seed."""

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return self._counted({
        'train': (c.num_train, self._generate_examples(c.num_train, [c.seed, 0])),
        'test': (c.num_test, self._generate_examples(c.num_test, [c.seed, 1])),
    })


class _ArchiveBuilder(_OwnBuilder):
  """Built from the published archives ARCHIVES (file names of `downloads.ARCHIVES`), which
  `build` hands over as `archives` {file name: local path}; no TFDS download manager."""
  ARCHIVES: tuple[str, ...] = ()
  archives: dict[str, str] = {}


class ArchiveError(errors.InputError):
  """An archive (checksummed, or put there by hand) that does not read as the published one."""


@contextlib.contextmanager
def _reading(path: str):
  """Turns what a damaged archive raises while it is read into one ArchiveError sentence."""
  try:
    yield
  except (ValueError, EOFError, OSError, tarfile.TarError, zlib.error) as e:
    raise ArchiveError(f'{path} cannot be read as the published archive ({e}); delete or '
                       'replace it and run the command again.') from None


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


_CIFAR_HOMEPAGE = 'https://www.cs.toronto.edu/~kriz/cifar.html'


class Cifar10(_ArchiveBuilder, skip_registration=True):
  """CIFAR-10 from cifar-10-binary.tar.gz: 50,000 train and 10,000 test 32×32 images, 10
  classes."""
  name = 'cifar10'  # the catalog's name and version; registered by the catalog, not here
  VERSION = tfds.core.Version('3.0.2')
  LAYOUT = cifar.CIFAR10
  ARCHIVES = (cifar.CIFAR10.archive,)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(shape=cifar.IMAGE_SHAPE),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage=_CIFAR_HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    path = self.archives[self.LAYOUT.archive]
    with _reading(path):
      names, splits = cifar.read(path, self.LAYOUT)
    for key, label_names in names.items():
      self.info.features[key].names = label_names
    return self._counted({
        split: (len(images), self._generate_examples(f'{split}_', labels, images))
        for split, (labels, images) in splits.items()})

  def _generate_examples(self, prefix, labels, images):
    keys = self.LAYOUT.label_keys
    for i, (label, image) in enumerate(zip(labels.tolist(), images)):
      # The index is the key, as in the catalog, so TFDS's shuffle gives the catalog's order.
      yield i, {'id': f'{prefix}{i:05d}', 'image': _png(image), **dict(zip(keys, label))}


class Cifar100(Cifar10, skip_registration=True):
  """CIFAR-100 from cifar-100-binary.tar.gz: 50,000 train and 10,000 test 32×32 images, 100 fine
  classes ('label') in 20 superclasses ('coarse_label')."""
  name = 'cifar100'
  VERSION = tfds.core.Version('3.0.2')
  LAYOUT = cifar.CIFAR100
  ARCHIVES = (cifar.CIFAR100.archive,)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(shape=cifar.IMAGE_SHAPE),
            'label': tfds.features.ClassLabel(num_classes=100),
            'coarse_label': tfds.features.ClassLabel(num_classes=20),
        }),
        supervised_keys=('image', 'label'),
        homepage=_CIFAR_HOMEPAGE,
    )


class OxfordIiitPet(_ArchiveBuilder, skip_registration=True):
  """Oxford-IIIT Pet from images.tar.gz and annotations.tar.gz: 37 breeds, the trainval list as
  'train' (3,680 images) and the test list as 'test' (3,669), JPEGs of varying size."""
  name = 'oxford_iiit_pet'
  VERSION = tfds.core.Version('4.0.0')
  ARCHIVES = (pet.IMAGES_ARCHIVE, pet.ANNOTATIONS_ARCHIVE)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=pet.LABEL_NAMES),
            'species': tfds.features.ClassLabel(names=pet.SPECIES_NAMES),
            'file_name': tfds.features.Text(),
            'segmentation_mask': tfds.features.Image(shape=(None, None, 1), use_colormap=True),
            'head_bbox': tfds.features.BBoxFeature(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.robots.ox.ac.uk/~vgg/data/pets/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    path = self.archives[pet.ANNOTATIONS_ARCHIVE]
    with _reading(path):
      annotations = pet.read_annotations(path)
    return self._counted({split: (len(rows), self._generate_examples(rows, annotations))
                          for split, rows in annotations.lists.items()})

  def _generate_examples(self, rows, annotations):
    listed = {image: (label, species) for image, label, species in rows}
    path, found = self.archives[pet.IMAGES_ARCHIVE], 0
    with _reading(path):
      for image, data in pet.images(path, set(listed)):
        label, species = listed[image]
        found += 1
        yield f'{image}.jpg', {
            'image': pet.clean_jpeg(image, data),
            'label': label,
            'species': species,
            'file_name': f'{image}.jpg',
            'segmentation_mask': annotations.trimaps[image],
            'head_bbox': tfds.features.BBox(*annotations.head_boxes.get(image, pet.NO_BOX)),
        }
      if found != len(listed):
        raise ValueError(f'it lacks {len(listed) - found} of the images that '
                         f'{pet.ANNOTATIONS_ARCHIVE} lists')


class Triangle(_GeneratedBuilder):
  """Equilateral (label 0) vs random (label 1) triangles on a 64×64 canvas (docs/data.md)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Fixed by seed; one stored channel.',
      '1.1.0': 'The equilateral third vertex may reach 63 as in the original generator; record '
               'bytes identical across processes (features serialised in sorted order).',
  }
  BUILDER_CONFIGS = [
      GeneratedConfig(name='full', num_train=tri.NUM_TRAIN, num_test=tri.NUM_TEST, seed=0),
      GeneratedConfig(name='small', num_train=512, num_test=200, seed=0),
  ]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(64, 64, 1), dtype=np.uint8, encoding='zlib'),
            'label': tfds.features.ClassLabel(names=tri.LABEL_NAMES),
            'vertices': tfds.features.Tensor(shape=(3, 2), dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
    )

  def _generate_examples(self, num_images, seed):
    yield from _chunked(tri.generate, num_images, seed)


class SortOfClevr(_GeneratedBuilder):
  """Sort-of-CLEVR, ternary variant (docs/data.md): one record per image with its 30 questions.

  The input pipeline expands each record into one example per (image, question).
  """

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Fixed by seed; per-image records.',
      '1.1.0': 'Record bytes identical across processes (features serialised in sorted order); '
               'config full_faithful with the original generator\'s "closest" answers.',
  }
  BUILDER_CONFIGS = [
      GeneratedConfig(name='full', num_train=clevr.NUM_TRAIN, num_test=clevr.NUM_TEST, seed=0),
      GeneratedConfig(name='small', num_train=200, num_test=50, seed=0),
      # The same scenes and questions as 'full'; "closest" answers as the original generator
      # gives them (A's own shape when every other object is > 31.6 px away), docs/data.md.
      GeneratedConfig(name='full_faithful', num_train=clevr.NUM_TRAIN, num_test=clevr.NUM_TEST,
                      seed=0, closest_quirk=True),
  ]

  def _info(self):
    n, q = clevr.QUESTIONS_PER_IMAGE, clevr.QUESTION_DIM
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(75, 75, 3), dtype=np.uint8, encoding='zlib'),
            'questions': tfds.features.Tensor(shape=(n, q), dtype=np.float32),
            'answers': tfds.features.Tensor(shape=(n,), dtype=np.int32),
            'centers': tfds.features.Tensor(shape=(clevr.NUM_OBJECTS, 2), dtype=np.int32),
            'shapes': tfds.features.Tensor(shape=(clevr.NUM_OBJECTS,), dtype=np.int32),
        }),
    )

  def _generate_examples(self, num_images, seed):
    yield from _chunked(clevr.generate, num_images, seed,
                        closest_quirk=self.builder_config.closest_quirk)


# About how much space a build takes (its version folder), for the line a full disk gets: the
# TFDS catalog's "Dataset size" for the downloaded datasets (cifar10 132.40 MiB, cifar100
# 132.03 MiB, oxford_iiit_pet 773.68 MiB), and `du -sk` of the version folder that `prepare`
# wrote for the generated ones (on a tmpfs, triangle/small failed at 330 KiB and fit in 340).
DATASET_BYTES = {
    'cifar10': int(132.40 * 2**20),
    'cifar100': int(132.03 * 2**20),
    'oxford_iiit_pet': int(773.68 * 2**20),
    'triangle/full': 11_924 * 2**10,
    'triangle/small': 340 * 2**10,
    'sort_of_clevr/full': 5_904 * 2**10,
    'sort_of_clevr/full_faithful': 5_904 * 2**10,
    'sort_of_clevr/small': 336 * 2**10,
}

GENERATED = {'triangle': Triangle, 'sort_of_clevr': SortOfClevr}
DOWNLOADED = {'cifar10': Cifar10, 'cifar100': Cifar100, 'oxford_iiit_pet': OxfordIiitPet}
BUILDERS = {**GENERATED, **DOWNLOADED}  # every dataset that `prepare` builds itself


@contextlib.contextmanager
def _sorted_features():
  """Makes TFDS serialise every tf.train.Example with its features in sorted order.

  A record's features are a protobuf map, whose default serialisation order depends on the
  process's string hashing: two processes wrote the same examples as different bytes. TFDS
  builds its serializer inside `download_and_prepare`, with no hook, hence the scoped patch.
  """
  cls = example_serializer.ExampleSerializer
  original = cls.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  try:
    yield
  finally:
    cls.serialize_example = original


@contextlib.contextmanager
def _tfds_bars_off():
  active = getattr(tqdm_utils, '_active', True)
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    if active:
      tfds.enable_progress_bar()


def make(name: str, data_dir: str | None, config: str | None = None) -> tfds.core.DatasetBuilder:
  """Our builder of `name` ('triangle', 'cifar10', ...) over data_dir, to build or to read."""
  cls = BUILDERS[name]
  if cls.BUILDER_CONFIGS:
    return cls(config=config or 'full', data_dir=data_dir, file_format='array_record')
  return cls(data_dir=data_dir, file_format='array_record')


def build(name: str, data_dir: str, config: str | None = None,
          archives: dict[str, str] | None = None) -> str:
  """Builds dataset `name` as ArrayRecord in data_dir, from `archives` {file name: path} for the
  downloaded ones; returns the version folder it wrote. One progress bar, no TFDS banner.

  The record files are byte-identical for the same config (and archives), in any process.
  """
  builder = make(name, data_dir, config)
  if isinstance(builder, _ArchiveBuilder):
    builder.archives = dict(archives or {})
  try:
    with _sorted_features(), _tfds_bars_off():
      # Nothing is downloaded through TFDS: its download folder stays inside data_dir.
      builder.download_and_prepare(download_dir=f'{data_dir}/downloads')
  finally:
    if getattr(builder, 'progress', None) is not None:
      builder.progress.close()
  return str(builder.data_dir)


def prepare_generated(name: str, data_dir: str, config: str = 'full') -> str:
  """Builds a generated dataset in data_dir (tests and `prepare`); returns its version folder."""
  return build(name, data_dir, config)
