"""Oxford-IIIT Pet read from its published archives with Pillow: the trainval/test lists, head boxes
and trimaps of annotations.tar.gz, and the JPEGs of images.tar.gz, streamed in archive order.

The TFDS builder in `builders.py` writes what this reads, with the TFDS catalog's features.
"""
from collections.abc import Iterator
import dataclasses
import io
import tarfile
import xml.etree.ElementTree as ET

import PIL.Image

# The 37 breeds in the order of the lists' class ids 1..37 (the TFDS catalog's label names).
LABEL_NAMES = (
    'Abyssinian', 'american_bulldog', 'american_pit_bull_terrier', 'basset_hound', 'beagle',
    'Bengal', 'Birman', 'Bombay', 'boxer', 'British_Shorthair', 'chihuahua', 'Egyptian_Mau',
    'english_cocker_spaniel', 'english_setter', 'german_shorthaired', 'great_pyrenees',
    'havanese', 'japanese_chin', 'keeshond', 'leonberger', 'Maine_Coon', 'miniature_pinscher',
    'newfoundland', 'Persian', 'pomeranian', 'pug', 'Ragdoll', 'Russian_Blue', 'saint_bernard',
    'samoyed', 'scottish_terrier', 'shiba_inu', 'Siamese', 'Sphynx', 'staffordshire_bull_terrier',
    'wheaten_terrier', 'yorkshire_terrier',
)
SPECIES_NAMES = ('Cat', 'Dog')
IMAGES_ARCHIVE = 'images.tar.gz'
ANNOTATIONS_ARCHIVE = 'annotations.tar.gz'
# Files of images.tar.gz that are not clean JPEGs (another format, an alpha channel, or data that
# decoders warn about); the TFDS catalog re-encodes them, and so does `clean_jpeg`.
_DAMAGED = frozenset((
    'beagle_116', 'chihuahua_121', 'Abyssinian_5', 'Abyssinian_34', 'Egyptian_Mau_14',
    'Egyptian_Mau_139', 'Egyptian_Mau_145', 'Egyptian_Mau_156', 'Egyptian_Mau_167',
    'Egyptian_Mau_177', 'Egyptian_Mau_186', 'Egyptian_Mau_191',
))
_SPLIT_LISTS = {'train': 'annotations/trainval.txt', 'test': 'annotations/test.txt'}
NO_BOX = (0.0, 0.0, 0.0, 0.0)  # test images have no head box; the catalog stores zeros


@dataclasses.dataclass
class Annotations:
  """Per split, the (image name, label, species) of its list; per image, trimap and head box."""
  lists: dict[str, list[tuple[str, int, int]]]
  trimaps: dict[str, bytes]  # PNG bytes, as published
  head_boxes: dict[str, tuple[float, float, float, float]]  # (ymin, xmin, ymax, xmax) in [0, 1]


def _head_box(xml: bytes) -> tuple[float, float, float, float]:
  root = ET.fromstring(xml)
  width, height = (float(root.find(f'size/{k}').text) for k in ('width', 'height'))
  box = root.find('object/bndbox')
  xmin, ymin, xmax, ymax = (float(box.find(k).text) for k in ('xmin', 'ymin', 'xmax', 'ymax'))
  clip = lambda v: min(max(v, 0.0), 1.0)  # a box edge on the border may round past it
  return clip(ymin / height), clip(xmin / width), clip(ymax / height), clip(xmax / width)


def read_annotations(path: str) -> Annotations:
  """Reads annotations.tar.gz; raises ValueError naming what is missing or malformed."""
  lists, trimaps, boxes = {}, {}, {}
  with tarfile.open(path, 'r:*') as tar:
    for member in tar:
      name = member.name
      if not member.isfile() or '/._' in name:  # skip the archive's macOS resource forks
        continue
      if name in _SPLIT_LISTS.values():
        lists[name] = tar.extractfile(member).read().decode()
      elif name.startswith('annotations/trimaps/') and name.endswith('.png'):
        trimaps[name[len('annotations/trimaps/'):-len('.png')]] = tar.extractfile(member).read()
      elif name.startswith('annotations/xmls/') and name.endswith('.xml'):
        try:
          boxes[name[len('annotations/xmls/'):-len('.xml')]] = _head_box(
              tar.extractfile(member).read())
        except (ET.ParseError, AttributeError, TypeError, ValueError, ZeroDivisionError):
          raise ValueError(f'has a malformed {name}') from None
  out = {}
  for split, list_name in _SPLIT_LISTS.items():
    if list_name not in lists:
      raise ValueError(f'has no {list_name}')
    rows = []
    for line in lists[list_name].splitlines():
      if not line.strip() or line.startswith('#'):
        continue
      fields = line.split()
      try:
        image, label, species = fields[0], int(fields[1]) - 1, int(fields[2]) - 1
      except (IndexError, ValueError):
        raise ValueError(f'has a malformed line in {list_name}: {line[:60]!r}') from None
      if not (0 <= label < len(LABEL_NAMES) and 0 <= species < len(SPECIES_NAMES)):
        raise ValueError(f'has a class id out of range in {list_name}: {line[:60]!r}')
      if image not in trimaps:
        raise ValueError(f'has no annotations/trimaps/{image}.png')
      rows.append((image, label, species))
    out[split] = rows
  return Annotations(out, trimaps, boxes)


def images(path: str, names: set[str]) -> Iterator[tuple[str, bytes]]:
  """(image name, file bytes) of the `names` in images.tar.gz, in archive order (one pass; the
  published archive is an uncompressed tar despite its name, which 'r:*' reads either way)."""
  with tarfile.open(path, 'r:*') as tar:
    for member in tar:
      name = member.name
      if member.isfile() and name.startswith('images/') and name.endswith('.jpg'):
        image = name[len('images/'):-len('.jpg')]
        if image in names:
          yield image, tar.extractfile(member).read()


def clean_jpeg(image: str, data: bytes) -> bytes:
  """The file as stored: as published, except the known damaged files and anything that is not a
  JPEG, which are decoded and saved again as RGB JPEG (as the TFDS catalog does)."""
  if image not in _DAMAGED and data[:2] == b'\xff\xd8':
    return data
  buffer = io.BytesIO()
  with PIL.Image.open(io.BytesIO(data)) as decoded:
    decoded.convert('RGB').save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()
