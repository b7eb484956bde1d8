"""Input pipelines: TFDS catalog datasets, generated benchmarks, grain readers, augmentation."""
