"""The checkpoint engine: every load, conversion and export of model weights in mm goes through it.

  errors          `ConversionError`, the one exception for bad input (names the file / tensor / key).
  name_map        `Entry(hf_name, hf_shape, mm_path, transform)`, `Transform`s, `NameMap`, `save_unit`, checks.
  safetensors_io  single / sharded safetensors files: streamed, sliceable reads; planned sharded writes.
  mm_dir          the mm directory format (mm_config.json, Orbax params/, tokenizer/).
  readers         SafetensorsReader, MMDirReader, TreeReader, ChainReader.
  writers         TreeWriter, PlacedWriter (onto shardings), MMDirWriter, SafetensorsWriter.
  engine          `convert(reader, name_map, writer, dtype=)`: checked, streamed, cast, with progress.
  staging         `staged_output`: a directory appears complete or not at all.

Nothing here knows a model family: families (their configs and name maps) live in `mm.convert`, whose
`registry` dispatches over them.
"""
