"""islkeras.utils: atomic JSON writing of what the pipeline really hands it."""
import collections.abc
import json

import numpy as np

from islkeras.utils import atomic_write_json


class _Proxy(collections.abc.Mapping):
    """A mapping that is not a dict, as TensorFlow's _DictWrapper (a dict kept on a Keras model attribute) is
    on Python 3.13, where the json encoder no longer takes it for a dict."""

    def __init__(self, d):
        self._d = d

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def test_atomic_write_json_takes_mapping_and_sequence_lookalikes(tmp_path):
    class _Seq(collections.abc.Sequence):
        def __getitem__(self, i):
            return (1, 2)[i]

        def __len__(self):
            return 2

    obj = {"calibration": _Proxy({"t": np.float32(0.5), "slope": 29.9}), "copied": _Seq(), "a": np.arange(3)}
    atomic_write_json(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text()) == {
        "calibration": {"t": 0.5, "slope": 29.9}, "copied": [1, 2], "a": [0, 1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_atomic_write_json_names_what_it_cannot_write(tmp_path):
    import pytest

    with pytest.raises(TypeError, match="object"):
        atomic_write_json(tmp_path / "y.json", {"x": object()})
    assert not (tmp_path / "y.json").exists()
