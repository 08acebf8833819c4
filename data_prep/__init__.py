"""Raw videos (folders, CSVs, DMVR TFRecords) -> a tfds ArrayRecord dataset."""
