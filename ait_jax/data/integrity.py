"""Whether a prepared dataset folder is whole: a dataset_info.json that parses, every ArrayRecord
shard it names with the record count it records and, when asked, every record read back.

ArrayRecord files carry a checksum per chunk, so a full read catches damage anywhere in a file;
the quick check (footers and counts) is what a training start can afford on every run. A remote
folder (gs://) is checked for its files only.
"""
from array_record.python import array_record_module
from etils import epath
from google.protobuf import json_format
import tensorflow_datasets as tfds
from tensorflow_datasets.core.proto import dataset_info_pb2

_READ_CHUNK = 1024  # records per read in a full check


def problem(version_dir: epath.PathLike, read_all: bool = False) -> str | None:
  """None if version_dir holds a whole ArrayRecord dataset; else what is wrong, as a phrase that
  follows the folder's name ('has no dataset_info.json', ...)."""
  version_dir = epath.Path(version_dir)
  info_file = version_dir / 'dataset_info.json'
  if not info_file.is_file():
    return 'has no dataset_info.json'
  try:
    info = json_format.Parse(info_file.read_text(), dataset_info_pb2.DatasetInfo(),
                             ignore_unknown_fields=True)
  except (json_format.ParseError, UnicodeDecodeError) as e:
    return f'has a dataset_info.json that does not parse ({_first_line(e)})'
  if info.file_format != 'array_record':
    return f'is stored as {info.file_format or "tfrecord"}, not ArrayRecord'
  if not info.splits:
    return 'has a dataset_info.json without splits'
  for split in info.splits:
    if not split.shard_lengths:
      return f'has no record count for its {split.name} split in dataset_info.json'
    template = tfds.core.ShardedFileTemplate(
        data_dir=version_dir, template=split.filepath_template, dataset_name=info.name,
        split=split.name, filetype_suffix='array_record')
    for path, expected in zip(template.sharded_filepaths(len(split.shard_lengths)),
                              split.shard_lengths):
      found = _records(epath.Path(path), read_all)
      if isinstance(found, str):
        return found
      if found is not None and found != expected:
        return (f'has {found} records in {epath.Path(path).name}, not the {expected} of its '
                'dataset_info.json')
  return None


def _records(path: epath.Path, read_all: bool) -> int | str | None:
  """The record count of one shard, or what is wrong with it; None for a remote file that is
  there (opening each shard of a bucket at every start would cost more than it catches)."""
  if not path.is_file():
    return f'lacks {path.name}'
  if '://' in str(path):
    return None
  try:  # Riegeli raises several types, from opening, reading and closing alike
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
      count = reader.num_records()
      if read_all:
        for start in range(0, count, _READ_CHUNK):
          reader.read(start, min(start + _READ_CHUNK, count))
    finally:
      reader.close()
  except Exception as e:  # pylint: disable=broad-except
    return f'has a damaged {path.name} ({_first_line(e)})'
  return count


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:160]
