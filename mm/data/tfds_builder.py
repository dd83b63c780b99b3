"""TFDS builders (array_record format) for LLaVA-format data, built and read without TensorFlow.

TFDS needs TensorFlow to encode image features, so images are not TFDS `Image` features here: each example
is `{id: Text, record: bytes}` where `record` is `mm.data.sources.encode_record` (row JSON + the images'
encoded bytes), which TFDS stores without TF (DESIGN.md section 8). Reading goes through TFDS' array_record
data source; `TfdsRows` decodes the records into rows the pipeline takes like any other source.

`LlavaJson` builds from a LLaVA JSON + image root given at construction; `MmSyntheticLlava` is the dataset the
repo ships: the generated conversations of `mm.data.synthetic` (deterministic, no download).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from mm.data.pack import check_row
from mm.data.skips import SampleSkip, SkipCounter
from mm.data.sources import decode_record, encode_record, read_llava


def _features() -> Any:
    return tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                       "record": tfds.features.Tensor(shape=(), dtype=np.object_)})


class LlavaJson(tfds.core.GeneratorBasedBuilder):
    """A LLaVA JSON (+ image root) as a TFDS dataset with one `train` split; bad rows are skipped and counted
    (`self.skips`)."""

    VERSION = tfds.core.Version("1.0.0")

    # No checksums / metadata files next to the code (TFDS would look them up through importlib_resources,
    # which is not a dependency of this repo).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:  # type: ignore[override]
        return None

    def __init__(self, *, json_path: str | None = None, image_root: str | None = None, **kw: Any):
        self.json_path, self.image_root = json_path, image_root
        self.skips = SkipCounter(max_skip_fraction=1.0)
        kw.setdefault("file_format", "array_record")
        super().__init__(**kw)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(),
                                     description="LLaVA-format conversations with encoded image bytes")

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        if self.json_path is None:
            raise ValueError(f"{self.name}: json_path is needed to build")
        return {"train": self._generate_examples(self.json_path, self.image_root)}

    def _generate_examples(self, json_path: str, image_root: str | None) -> Iterator[tuple[str, dict]]:
        for row in read_llava(json_path):
            try:
                data = check_row(row, image_root)
            except SampleSkip as e:
                self.skips.add_skip(e.reason, e.row_id, e.message)
                continue
            self.skips.used += 1
            yield str(row["id"]), {"id": str(row["id"]), "record": encode_record(row, data)}


class MmSyntheticLlava(LlavaJson):
    """The generated LLaVA-format dataset (`mm.data.synthetic.write_llava_dataset`, seed 0)."""

    VERSION = tfds.core.Version("1.0.0")
    NUM_ROWS = 64

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        from mm.data.synthetic import write_llava_dataset

        tmp = tempfile.mkdtemp(prefix="mm_synthetic_llava_")
        path, root = write_llava_dataset(tmp, self.NUM_ROWS, seed=0)
        return {"train": self._generate_examples(path, root)}


class TfdsRows:
    """Random-access rows of a prepared builder's split (TFDS' array_record data source, decoded)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str = "train"):
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index]["record"])


def build(builder_cls: type = MmSyntheticLlava, data_dir: str | None = None, **kw: Any) -> tfds.core.DatasetBuilder:
    """Prepares (once) and returns the builder."""
    b = builder_cls(data_dir=data_dir or os.path.join(tempfile.gettempdir(), "mm_tfds"), **kw)
    b.download_and_prepare()
    return b
