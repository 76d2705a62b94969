"""Tests of checkpoint.py and tensor_pickle.py: safe parsing, validation errors, loading onto devices, byte-exact saving.

The reference checkpoints are the Grok-1 fixtures `grok1-tiny`,
`grok1-tiny-kv8` and `grok1-tiny-vocab` (see `FIXTURES`), written by xAI's
original code with CPython 3.11.7 and numpy 1.26.4. Tests that need them are
skipped when they are absent. Expected values come from the
fixtures' `tensor-index.json`, from their bytes, or from `pickle.load` with an
allow-list `find_class` (used here only as an independent reference).
"""

import dataclasses
import functools
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import checkpoint
import tensor_pickle
from checkpoint import CheckpointError, QuantizedInfo
from model import (
    LanguageModelConfig,
    QuantizedWeight8bit,
    TransformerConfig,
    grok_1_config,
    partition_spec_for,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
FIXTURE_NAMES = ("grok1-tiny", "grok1-tiny-kv8", "grok1-tiny-vocab")


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "ckpt-0").is_dir():
        pytest.skip(f"Grok-1 reference fixture {name} not found at {path}")
    return path


def fixture_file_names(name: str) -> list[str]:
    return sorted(os.listdir(fixture_dir(name) / "ckpt-0"))


@functools.lru_cache(maxsize=None)
def model_config(name: str) -> LanguageModelConfig:
    """Build the model config from a fixture's config.json (fields named as in the reference)."""
    config = json.loads((fixture_dir(name) / "config.json").read_text())
    lm, tc = config["LanguageModelConfig"], config["TransformerConfig"]
    transformer_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    lm_fields = {f.name for f in dataclasses.fields(LanguageModelConfig)}
    transformer = TransformerConfig(**{k: v for k, v in tc.items() if k in transformer_fields})
    return LanguageModelConfig(
        model=transformer, **{k: v for k, v in lm.items() if k in lm_fields and k != "model"}
    )


def abstract_params(config: LanguageModelConfig):
    init = hk.transform(lambda tokens: config.make()(tokens)).init
    return jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


@functools.lru_cache(maxsize=None)
def model_shapes(name: str):
    return abstract_params(model_config(name))


def tensor_index(name: str) -> list[dict]:
    return json.loads((fixture_dir(name) / "tensor-index.json").read_text())


class AllowListUnpickler(pickle.Unpickler):
    """Reference reader: `pickle.load` that resolves only the checkpoint format's globals."""

    def find_class(self, module, name):
        import numpy._core.multiarray as multiarray

        allowed = {
            ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} not allowed")
        return allowed[(module, name)]


def reference_load(path: Path):
    with open(path, "rb") as file:
        return AllowListUnpickler(file).load()


def assert_same_array(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    # Compare bit patterns so that bfloat16 and NaNs compare exactly.
    assert actual.tobytes() == expected.tobytes()


def assert_same_tensor(actual, expected):
    if isinstance(expected, QuantizedWeight8bit):
        assert isinstance(actual, QuantizedWeight8bit)
        assert_same_array(actual.weight, expected.weight)
        assert_same_array(actual.scales, expected.scales)
    else:
        assert not isinstance(actual, QuantizedWeight8bit)
        assert_same_array(actual, expected)


def copy_fixture_checkpoint(name: str, destination: Path) -> Path:
    """Copy a fixture's ckpt-0 into `destination/ckpt-0` as writable files."""
    target = destination / "ckpt-0"
    shutil.copytree(fixture_dir(name) / "ckpt-0", target, copy_function=shutil.copyfile)
    return target


def validation_error(directory: Path, shapes) -> str:
    with pytest.raises(CheckpointError) as raised:
        checkpoint.validate_checkpoint(directory, shapes)
    return str(raised.value)


def parameter_of(name: str, file_name: str) -> str:
    entry = next(e for e in tensor_index(name) if e["file"] == file_name)
    return entry["path"].removeprefix("params/")


class EvilReduce:
    """Unpickling this object would run `os.system(command)`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---------------------------------------------------------------------------
# Parsing the fixtures


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_parses_like_tensor_index(name):
    entries = tensor_index(name)
    assert [e["file"] for e in entries] == fixture_file_names(name)

    for entry in entries:
        info = checkpoint.parse_tensor_file(fixture_dir(name) / "ckpt-0" / entry["file"])
        if entry["stored"] == "float32":
            assert not isinstance(info, QuantizedInfo), entry["file"]
            assert list(info.shape) == entry["shape"], entry["file"]
            assert str(info.dtype.newbyteorder("=")) == entry["dtype"], entry["file"]
        else:
            assert isinstance(info, QuantizedInfo), entry["file"]
            assert list(info.weight.shape) == entry["weight_shape"], entry["file"]
            assert str(info.weight.dtype) == entry["weight_dtype"], entry["file"]
            assert list(info.scales.shape) == entry["scales_shape"], entry["file"]
            assert str(info.scales.dtype) == entry["scales_dtype"], entry["file"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_values_match_reference_unpickler(name):
    for file_name in fixture_file_names(name):
        path = fixture_dir(name) / "ckpt-0" / file_name
        assert_same_tensor(checkpoint.read_tensor(path), reference_load(path))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_validates_against_model(name):
    files = checkpoint.validate_checkpoint(fixture_dir(name) / "ckpt-0", model_shapes(name))

    expected = [e["path"].removeprefix("params/") for e in tensor_index(name)]
    assert [f.parameter for f in files] == expected
    assert [f.path.name for f in files] == fixture_file_names(name)


def test_payload_offsets_point_at_array_bytes():
    path = fixture_dir("grok1-tiny") / "ckpt-0" / "tensor00005_000"
    info = checkpoint.parse_tensor_file(path)
    reference = reference_load(path)
    data = path.read_bytes()

    weight = data[info.weight.offset:info.weight.end]
    scales = data[info.scales.offset:info.scales.end]
    assert weight == reference.weight.tobytes()
    assert scales == reference.scales.tobytes()


def test_numpy2_pickles_parse():
    """Arrays pickled by the installed numpy (2.x names `numpy._core`) read back equal."""
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((5, 7)).astype(np.float32),
        np.asfortranarray(rng.standard_normal((6, 3)).astype(np.float32)),
        rng.integers(-127, 128, (4, 100000), dtype=np.int8),
        rng.standard_normal((3, 9)).astype(ml_dtypes.bfloat16),
        np.array(3.5, np.float32),
        rng.standard_normal(10).astype(">f4"),
        np.array([True, False, True]),
        np.zeros((0, 4), np.int32),
    ]
    for protocol in (3, 4):
        for array in arrays:
            data = pickle.dumps(array, protocol=protocol)
            parsed = tensor_pickle.PickleParser(data, len(data)).parse()
            assert parsed.shape == array.shape
            assert parsed.dtype == array.dtype
            numpy_writes_fortran = array.flags.f_contiguous and not array.flags.c_contiguous
            assert parsed.fortran_order == numpy_writes_fortran
            payload = np.frombuffer(data[parsed.offset:parsed.end], np.uint8)
            assert payload.tobytes() == array.tobytes(order="A")


def test_read_tensor_converts_big_endian(tmp_path):
    values = np.arange(12, dtype=">f4").reshape(3, 4)
    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.dumps(values, protocol=4))

    result = checkpoint.read_tensor(path)
    assert result.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(result, values)


@pytest.mark.parametrize("order", ["C", "F"])
def test_reader_regions_match_numpy_indexing(tmp_path, order):
    values = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    values = np.asfortranarray(values) if order == "F" else values
    path = tmp_path / "tensor00000_000"
    checkpoint.write_tensor_file(path, values)
    info = checkpoint.parse_tensor_file(path)
    assert info.fortran_order == (order == "F")

    indices = [
        (slice(None), slice(None), slice(None)),
        (slice(1, 3), slice(None), slice(None)),
        (slice(2, 3), slice(1, 4), slice(None)),
        (slice(3, 4), slice(5, 6), slice(1, 4)),
        (slice(None), slice(None), slice(0, 2)),
        (slice(None), slice(2, 4), slice(None)),
        (slice(0, 0), slice(None), slice(None)),
        (slice(None, None, 2), slice(None), slice(None)),
    ]
    with open(path, "rb") as file:
        reader = checkpoint._PayloadReader(path, file)
        try:
            for index in indices:
                region = reader.read(info, index)
                np.testing.assert_array_equal(region, values[index], err_msg=str(index))
                assert region.flags.c_contiguous
        finally:
            reader.close()


# ---------------------------------------------------------------------------
# Rejecting code in pickles


def assert_rejected_without_running(path: Path, sentinel: Path, global_name: str):
    with pytest.raises(CheckpointError) as raised:
        checkpoint.parse_tensor_file(path)
    message = str(raised.value)
    assert path.name in message
    assert global_name in message
    assert not sentinel.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4])
def test_os_system_pickle_rejected(tmp_path, protocol):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.dumps(EvilReduce(f"touch {sentinel}"), protocol=protocol))

    assert_rejected_without_running(path, sentinel, f"{os.system.__module__}.system")


def test_os_system_in_quantized_state_rejected(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    weight = QuantizedWeight8bit(weight=np.zeros((2, 2), np.int8), scales=EvilReduce(f"touch {sentinel}"))
    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.dumps(weight, protocol=4))

    # pickle names the class by its real module; rename it to the format's __main__.
    data = path.read_bytes().replace(b"\x8c\x05model", b"\x8c\x08__main__")
    path.write_bytes(data)

    assert_rejected_without_running(path, sentinel, f"{os.system.__module__}.system")


def test_builtins_eval_rejected(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    command = f"__import__('os').system('touch {sentinel}')".encode()
    data = (
        b"\x80\x04"
        + b"\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94"
        + b"\x8c" + bytes([len(command)]) + command + b"\x94\x85\x94R\x94."
    )
    path = tmp_path / "tensor00000_000"
    path.write_bytes(data)

    assert_rejected_without_running(path, sentinel, "builtins.eval")


def test_malicious_file_fails_load(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    sentinel = tmp_path / "SENTINEL"
    (directory / "tensor00005_000").write_bytes(pickle.dumps(EvilReduce(f"touch {sentinel}"), protocol=4))

    with pytest.raises(CheckpointError) as raised:
        checkpoint.load_checkpoint(directory, model_shapes("grok1-tiny"), SingleDeviceSharding(jax.devices()[0]))
    message = str(raised.value)
    assert "tensor00005_000" in message
    assert parameter_of("grok1-tiny", "tensor00005_000") in message
    assert f"{os.system.__module__}.system" in message
    assert not sentinel.exists()


def test_unsupported_opcode_named(tmp_path):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.dumps([1, 2], protocol=4))

    with pytest.raises(CheckpointError) as raised:
        checkpoint.parse_tensor_file(path)
    message = str(raised.value)
    assert "EMPTY_LIST" in message
    assert "offset 11" in message
    assert path.name in message


def test_allowed_global_called_wrongly_rejected(tmp_path):
    # numpy.ndarray(...) through REDUCE is not how the format builds arrays.
    data = b"\x80\x04\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x03\x85\x94R\x94."
    path = tmp_path / "tensor00000_000"
    path.write_bytes(data)

    with pytest.raises(CheckpointError, match="REDUCE calls <global numpy.ndarray>"):
        checkpoint.parse_tensor_file(path)


# ---------------------------------------------------------------------------
# Damaged checkpoints


def test_truncated_file_named_with_sizes(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00002_000"
    full_size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100_000])

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00002_000" in message
    assert parameter_of("grok1-tiny", "tensor00002_000") in message
    assert "truncated" in message
    assert f"{full_size:,}" in message
    assert "100,000" in message


def test_truncated_header_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00009_000"
    path.write_bytes(path.read_bytes()[:60])

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00009_000" in message
    assert "truncated" in message
    assert "has 60" in message


@pytest.mark.parametrize(
    "case, content, expected",
    [
        ("empty", b"", "is empty"),
        ("lfs", b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 181945\n",
         "Git LFS pointer"),
        ("html", b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head></html>\n", "HTML"),
        ("xml", b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>', "HTML/XML"),
        ("text", b"404: Not Found\n", "text file"),
    ],
)
def test_broken_download_named(tmp_path, case, content, expected):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    (directory / "tensor00004_000").write_bytes(content)

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00004_000" in message
    assert parameter_of("grok1-tiny", "tensor00004_000") in message
    assert expected in message


def test_lfs_pointer_says_pointer_not_data(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"cd" * 32 + b"\nsize 181945\n"
    (directory / "tensor00004_000").write_bytes(pointer)

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "fetched the pointer, not the data" in message
    assert "181,945" in message


def test_zero_filled_file_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00003_000"
    path.write_bytes(bytes(path.stat().st_size))

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00003_000" in message
    assert parameter_of("grok1-tiny", "tensor00003_000") in message
    assert "zero-filled" in message


def test_zero_filled_tail_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00000_000"
    data = bytearray(path.read_bytes())
    data[-5000:] = bytes(5000)
    path.write_bytes(bytes(data))

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00000_000" in message
    assert "zero-filled from byte" in message


def test_trailing_bytes_rejected(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00001_000"
    path.write_bytes(path.read_bytes() + b"extra")

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00001_000" in message
    assert "5 unexpected bytes" in message


def test_missing_files_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    (directory / "tensor00007_000").unlink()
    (directory / "tensor00100_000").unlink()

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert f"tensor00007_000 ({parameter_of('grok1-tiny', 'tensor00007_000')}) is missing" in message
    assert f"tensor00100_000 ({parameter_of('grok1-tiny', 'tensor00100_000')}) is missing" in message
    assert "144 tensor files but the model has 146" in message


def test_extra_files_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    shutil.copyfile(directory / "tensor00145_000", directory / "tensor00146_000")
    (directory / "tensor00003_001").write_bytes(b"x")
    (directory / "tensor00004_000.part").write_bytes(b"x")
    (directory / "notes.txt").write_text("x")
    (directory / ".cache").mkdir()

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00146_000 is not part of this model's checkpoint" in message
    assert "tensor00003_001 is shard 001" in message
    assert "tensor00004_000.part is an unfinished download" in message
    assert "notes.txt is an unexpected file" in message
    assert ".cache" not in message


def test_all_problems_listed_together(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    (directory / "tensor00010_000").unlink()
    (directory / "tensor00020_000").write_bytes(b"")
    (directory / "tensor00030_000").write_bytes(b"<html>error</html>")
    path = directory / "tensor00040_000"
    path.write_bytes(path.read_bytes()[:50])

    message = validation_error(directory, model_shapes("grok1-tiny"))
    for name in ("tensor00010_000", "tensor00020_000", "tensor00030_000", "tensor00040_000"):
        assert name in message
    assert "4 problems" in message


def test_empty_directory_says_where_to_download(tmp_path):
    directory = tmp_path / "ckpt-0"
    directory.mkdir()

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "all 146 tensor files" in message
    assert "xai-org/grok-1" in message
    assert "checkpoints/ckpt-0" in message


def test_broken_checkpoint_fails_before_reading(tmp_path, monkeypatch):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    (directory / "tensor00145_000").write_bytes(b"")

    def fail(*args, **kwargs):
        raise AssertionError("payload read or device allocation before validation finished")

    monkeypatch.setattr(jax, "make_array_from_callback", fail)
    monkeypatch.setattr(checkpoint._PayloadReader, "read_regions", fail)
    monkeypatch.setattr(checkpoint, "_pread_into", fail)
    with pytest.raises(CheckpointError, match="tensor00145_000"):
        checkpoint.load_checkpoint(directory, model_shapes("grok1-tiny"), SingleDeviceSharding(jax.devices()[0]))


# ---------------------------------------------------------------------------
# Mismatches with the model


def test_shape_mismatch_named(tmp_path):
    # grok1-tiny-kv8 has 16 query and 8 KV heads where grok1-tiny has 4 and 2.
    message = validation_error(fixture_dir("grok1-tiny") / "ckpt-0", model_shapes("grok1-tiny-kv8"))
    assert "tensor00005_000 (transformer/decoder_layer_0/multi_head_attention/key/w)" in message
    assert "weight has shape [64, 32], the model expects [64, 128]" in message
    assert "scales has shape [1, 32], the model expects [1, 128]" in message


def test_embedding_shape_mismatch_named():
    # grok1-tiny-vocab has 131072 tokens where grok1-tiny has 1024.
    message = validation_error(fixture_dir("grok1-tiny") / "ckpt-0", model_shapes("grok1-tiny-vocab"))
    assert (
        "tensor00000_000 (language_model/in_out_embed/embeddings) has shape [1024, 64], "
        "the model expects [131072, 64]"
    ) in message


def test_scales_shape_mismatch_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00003_000"
    stored = checkpoint.read_tensor(path)
    wrong = QuantizedWeight8bit(weight=stored.weight, scales=stored.scales[:, :1, :])
    checkpoint.write_tensor_file(path, wrong)

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00003_000 (transformer/decoder_layer_0/moe/linear_1/w)" in message
    assert "scales has shape [8, 1, 64], the model expects [8, 8, 64]" in message


def test_dtype_mismatch_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00000_000"
    checkpoint.write_tensor_file(path, checkpoint.read_tensor(path).astype(ml_dtypes.bfloat16))

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00000_000 (language_model/in_out_embed/embeddings) has dtype bfloat16" in message
    assert "the model expects float32" in message


def test_plain_array_for_quantized_named(tmp_path):
    directory = copy_fixture_checkpoint("grok1-tiny", tmp_path)
    path = directory / "tensor00005_000"
    checkpoint.write_tensor_file(path, np.zeros((64, 32), np.float32))

    message = validation_error(directory, model_shapes("grok1-tiny"))
    assert "tensor00005_000" in message
    assert "stores a plain float32 array [64, 32], the model expects a QuantizedWeight8bit" in message


# ---------------------------------------------------------------------------
# Locating the checkpoint directory


def make_tensor_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "tensor00000_000").write_bytes(b"")
    return path


def test_resolve_accepts_released_layouts(tmp_path):
    root = tmp_path / "a" / "checkpoints"
    ckpt0 = make_tensor_dir(root / "ckpt-0")
    assert checkpoint.resolve_checkpoint_dir(root) == ckpt0
    assert checkpoint.resolve_checkpoint_dir(ckpt0) == ckpt0

    old_root = tmp_path / "b" / "checkpoints"
    old = make_tensor_dir(old_root / "ckpt")
    assert checkpoint.resolve_checkpoint_dir(old_root) == old
    assert checkpoint.resolve_checkpoint_dir(old) == old
    assert checkpoint.resolve_checkpoint_dir(old_root / "ckpt-0") == old


def test_resolve_prefers_directory_with_files(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "ckpt-0").mkdir(parents=True)
    old = make_tensor_dir(root / "ckpt")
    assert checkpoint.resolve_checkpoint_dir(root) == old

    empty_root = tmp_path / "empty" / "checkpoints"
    (empty_root / "ckpt-0").mkdir(parents=True)
    assert checkpoint.resolve_checkpoint_dir(empty_root) == empty_root / "ckpt-0"


def test_resolve_missing_directory_explains_download(tmp_path):
    missing = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError) as raised:
        checkpoint.resolve_checkpoint_dir(missing)
    message = str(raised.value)
    assert str(missing) in message
    assert "not found" in message
    assert "checkpoints/ckpt-0" in message
    assert "torrent" in message
    assert "xai-org/grok-1" in message


def test_resolve_rejects_file_and_unrelated_directory(tmp_path):
    file_path = tmp_path / "weights.bin"
    file_path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        checkpoint.resolve_checkpoint_dir(file_path)

    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "README.md").write_text("x")
    with pytest.raises(CheckpointError, match="contains no tensor files"):
        checkpoint.resolve_checkpoint_dir(unrelated)


# ---------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_resave_fixture_files_byte_identical(tmp_path, name):
    for file_name in fixture_file_names(name):
        original = fixture_dir(name) / "ckpt-0" / file_name
        copy = tmp_path / file_name
        checkpoint.write_tensor_file(copy, reference_load(original))
        assert copy.read_bytes() == original.read_bytes(), file_name


def test_save_checkpoint_reproduces_fixture(tmp_path):
    source = fixture_dir("grok1-tiny") / "ckpt-0"
    _, treedef = checkpoint.flatten_parameters(model_shapes("grok1-tiny"))
    leaves = [checkpoint.read_tensor(source / name) for name in fixture_file_names("grok1-tiny")]
    params = jax.tree_util.tree_unflatten(treedef, leaves)

    paths = checkpoint.save_checkpoint(tmp_path / "ckpt-0", params)

    assert [p.name for p in paths] == fixture_file_names("grok1-tiny")
    assert sorted(os.listdir(tmp_path / "ckpt-0")) == fixture_file_names("grok1-tiny")
    for path in paths:
        assert path.read_bytes() == (source / path.name).read_bytes(), path.name


@pytest.mark.parametrize(
    "value",
    [
        (1, b"x" * 40000, (2, 3), b"y" * 30000, 5, "abc"),
        ((b"a" * 40000, b"b" * 30000), 1),
        {"a": b"q" * 70000, "b": (1, -5, 2**40, -(2**70), 300, 70000, None, True, False)},
        ("s" * 300, b"z" * 65536, ()),
    ],
)
def test_writer_matches_cpython_pickle(value):
    """Framing and memo rules match CPython's pickler on plain values."""
    output = io.BytesIO()
    tensor_pickle.PickleWriter(output.write).dump(value)
    assert output.getvalue() == pickle.dumps(value, protocol=4)


def test_released_file_sizes():
    """File sizes of the released 314B checkpoint, as listed for its download."""
    f32, i8, bf16 = np.float32, np.int8, ml_dtypes.bfloat16

    def quantized(weight_shape, scales_shape):
        return QuantizedWeight8bit(
            weight=jax.ShapeDtypeStruct(weight_shape, i8), scales=jax.ShapeDtypeStruct(scales_shape, bf16)
        )

    cases = [
        (jax.ShapeDtypeStruct((131072, 6144), f32), 3_221_225_637),
        (jax.ShapeDtypeStruct((6144,), f32), 24_727),
        (jax.ShapeDtypeStruct((6144, 8), f32), 196_770),
        (quantized((6144, 1024), (1, 1024)), 6_293_814),
        (quantized((6144, 6144), (1, 6144)), 37_761_334),
        (quantized((6144, 6144), (8, 6144)), 37_847_359),
        (quantized((8, 6144, 32768), (8, 1, 32768)), 1_611_137_347),
        (quantized((8, 32768, 6144), (8, 8, 6144)), 1_611_399_491),
    ]
    for leaf, size in cases:
        assert checkpoint.released_file_size(leaf) == size


def test_released_checkpoint_layout():
    """The full model's leaves map to the 770 released files, 318,239,886,140 bytes in all."""
    named, _ = checkpoint.flatten_parameters(abstract_params(grok_1_config()))

    assert len(named) == 770
    assert named[0][0] == "language_model/in_out_embed/embeddings"
    assert named[1][0] == "language_model/rms_norm/scale"
    assert named[26][0] == "transformer/decoder_layer_10/moe/linear/w"
    assert named[146][0] == "transformer/decoder_layer_2/moe/linear/w"
    assert sum(checkpoint.released_file_size(leaf) for _, leaf in named) == 318_239_886_140


def test_released_file_size_matches_fixture_files():
    for entry in tensor_index("grok1-tiny"):
        path = fixture_dir("grok1-tiny") / "ckpt-0" / entry["file"]
        leaf = reference_load(path)
        assert checkpoint.released_file_size(leaf) == path.stat().st_size, entry["file"]


def random_params(shapes, seed: int = 0):
    """Random numpy values of the model's parameter shapes and dtypes."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        dtype = np.dtype(leaf.dtype)
        if dtype == np.int8:
            return rng.integers(-127, 128, leaf.shape, dtype=np.int8)
        return rng.standard_normal(leaf.shape).astype(dtype)

    return jax.tree_util.tree_map(fill, shapes)


def test_save_load_round_trip(tmp_path):
    shapes = model_shapes("grok1-tiny")
    params = random_params(shapes)
    router = params["transformer/decoder_layer_3/router"]
    router["w"] = np.asfortranarray(router["w"])

    checkpoint.save_checkpoint(tmp_path / "ckpt-0", params)
    loaded = checkpoint.load_checkpoint(tmp_path, shapes, SingleDeviceSharding(jax.devices()[0]))

    expected, _ = checkpoint.flatten_parameters(params)
    actual, _ = checkpoint.flatten_parameters(loaded)
    assert [name for name, _ in actual] == [name for name, _ in expected]
    for (name, got), (_, want) in zip(actual, expected):
        assert_same_tensor(jax.device_get(got), want)


def test_saved_fortran_array_reads_with_reference(tmp_path):
    values = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(4, 6))
    path = tmp_path / "tensor00000_000"
    checkpoint.write_tensor_file(path, values)

    assert checkpoint.parse_tensor_file(path).fortran_order
    np.testing.assert_array_equal(reference_load(path), values)
    np.testing.assert_array_equal(checkpoint.read_tensor(path), values)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "tensor00000_000"
    checkpoint.write_tensor_file(path, np.ones(100_000, np.float32))
    previous = path.read_bytes()

    def fail_midway(sink, array, order):
        sink(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tensor_pickle, "write_array_bytes", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_tensor_file(path, np.zeros(100_000, np.float32))

    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == ["tensor00000_000"]


def test_save_rejects_unsupported_dtype(tmp_path):
    params = {"layer": {"w": np.ones(3, np.float32), "z": np.ones(3, np.complex64)}}
    with pytest.raises(CheckpointError, match="layer/z has dtype complex64"):
        checkpoint.save_checkpoint(tmp_path / "ckpt-0", params)
    assert not (tmp_path / "ckpt-0" / "tensor00000_000").exists()


def test_save_rejects_stale_tensor_files(tmp_path):
    directory = tmp_path / "ckpt-0"
    checkpoint.save_checkpoint(directory, {"a": {"w": np.ones(2, np.float32), "v": np.ones(2, np.float32)}})
    with pytest.raises(CheckpointError, match="tensor00001_000"):
        checkpoint.save_checkpoint(directory, {"a": {"w": np.ones(2, np.float32)}})


# ---------------------------------------------------------------------------
# Loading onto devices


def test_load_onto_one_device():
    name = "grok1-tiny"
    device = jax.devices()[0]
    params = checkpoint.load_checkpoint(fixture_dir(name), model_shapes(name), SingleDeviceSharding(device))

    loaded, _ = checkpoint.flatten_parameters(params)
    for (parameter, value), file_name in zip(loaded, fixture_file_names(name)):
        expected = reference_load(fixture_dir(name) / "ckpt-0" / file_name)
        arrays = (value.weight, value.scales) if isinstance(value, QuantizedWeight8bit) else (value,)
        for array in arrays:
            assert isinstance(array, jax.Array), parameter
            assert array.devices() == {device}, parameter
        assert_same_tensor(jax.device_get(value), expected)

    quantized = params["transformer/decoder_layer_0/moe/linear"]["w"]
    assert quantized.weight.dtype == jnp.int8
    assert quantized.scales.dtype == jnp.bfloat16
    assert params["language_model/in_out_embed"]["embeddings"].dtype == jnp.float32


def model_shardings(shapes, mesh: Mesh):
    """NamedShardings from the model's partition rules, dropping axes that do not divide."""

    def spec_for(spec: P, shape) -> P:
        axes = [axis if axis is None or shape[i] % mesh.shape[axis] == 0 else None for i, axis in enumerate(spec)]
        return P(*axes)

    named, treedef = checkpoint.flatten_parameters(shapes)
    shardings = []
    for path, leaf in named:
        if isinstance(leaf, QuantizedWeight8bit):
            shardings.append(
                QuantizedWeight8bit(
                    weight=NamedSharding(mesh, spec_for(partition_spec_for(path), leaf.weight.shape)),
                    scales=NamedSharding(mesh, spec_for(partition_spec_for(path, weight=False), leaf.scales.shape)),
                )
            )
        else:
            shardings.append(NamedSharding(mesh, spec_for(partition_spec_for(path), leaf.shape)))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def test_load_onto_eight_device_mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py sets XLA_FLAGS for 8 CPU devices"
    name = "grok1-tiny"
    mesh = Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "model"))
    shapes = model_shapes(name)
    shardings = model_shardings(shapes, mesh)

    params = checkpoint.load_checkpoint(fixture_dir(name), shapes, shardings)

    loaded, _ = checkpoint.flatten_parameters(params)
    expected_shardings, _ = jax.tree_util.tree_flatten(shardings, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))
    for (parameter, value), sharding, file_name in zip(loaded, expected_shardings, fixture_file_names(name)):
        expected = reference_load(fixture_dir(name) / "ckpt-0" / file_name)
        if isinstance(value, QuantizedWeight8bit):
            assert value.weight.sharding == sharding.weight, parameter
            assert value.scales.sharding == sharding.scales, parameter
        else:
            assert value.sharding == sharding, parameter
        assert_same_tensor(jax.device_get(value), expected)

    gate = params["transformer/decoder_layer_0/moe/linear"]["w"]
    assert {shard.data.shape for shard in gate.weight.addressable_shards} == {(8, 64, 43)}
    assert len(gate.weight.addressable_shards) == 8


def recorded_reads(monkeypatch) -> list[int]:
    """Record the byte count of every read the loader makes from a tensor file."""
    reads = []
    pread_into = checkpoint._pread_into

    def recording_pread_into(fd, buffer, offset, path):
        reads.append(len(buffer))
        return pread_into(fd, buffer, offset, path)

    def no_mmap(*args, **kwargs):
        raise AssertionError("C-order regions must not be read through mmap")

    monkeypatch.setattr(checkpoint, "_pread_into", recording_pread_into)
    monkeypatch.setattr(checkpoint._PayloadReader, "_copy_from_mmap", no_mmap)
    return reads


@pytest.mark.parametrize(
    "mesh_shape, spec, expected_reads",
    [
        ((1, 8), P("model", None), 8),  # 8 row blocks, one per device
        ((1, 8), P(None, "model"), 1),  # 8 column blocks, read in one pass over the rows
        ((2, 4), P("model", None), 4),  # each row block is on 2 devices but read once
        ((2, 4), P(None, "model"), 1),  # column blocks on 2 devices each, one pass over the rows
        ((2, 4), P(None, None), 1),  # replicated: read once
    ],
)
def test_load_reads_each_shard_once(tmp_path, monkeypatch, mesh_shape, spec, expected_reads):
    values = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    checkpoint.save_checkpoint(tmp_path / "ckpt-0", {"layer": {"w": values}})
    shapes = {"layer": {"w": jax.ShapeDtypeStruct(values.shape, values.dtype)}}
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "model"))
    reads = recorded_reads(monkeypatch)

    params = checkpoint.load_checkpoint(tmp_path, shapes, {"layer": {"w": NamedSharding(mesh, spec)}})

    assert len(reads) == expected_reads
    assert sum(reads) == values.nbytes
    np.testing.assert_array_equal(jax.device_get(params["layer"]["w"]), values)


@pytest.mark.parametrize(
    "indices, expected_bytes",
    [
        # 2 of 8 row blocks of a [8, 64, 32] array: only those blocks.
        ([(slice(0, 1), slice(None), slice(None)), (slice(5, 6), slice(None), slice(None))], 2 * 64 * 32 * 4),
        # 2 of 8 blocks along the middle axis: 8 rows of each of the 8 leading entries.
        ([(slice(None), slice(0, 8), slice(None)), (slice(None), slice(40, 48), slice(None))], 2 * 8 * 8 * 32 * 4),
        # 2 of 4 column blocks: every row once, from the first to the last requested column.
        ([(slice(None), slice(None), slice(0, 8)), (slice(None), slice(None), slice(16, 24))], 8 * 64 * 24 * 4),
        # a column block of 3 of the 8 leading entries: only those columns of their rows.
        ([(slice(2, 5), slice(None), slice(8, 16))], 3 * 64 * 8 * 4),
    ],
)
def test_reader_reads_only_requested_rows(tmp_path, monkeypatch, indices, expected_bytes):
    """A process that holds only some shards reads only the rows and columns those shards touch."""
    values = np.arange(8 * 64 * 32, dtype=np.float32).reshape(8, 64, 32)
    path = tmp_path / "tensor00000_000"
    checkpoint.write_tensor_file(path, values)
    info = checkpoint.parse_tensor_file(path)
    reads = recorded_reads(monkeypatch)

    with open(path, "rb") as file:
        reader = checkpoint._PayloadReader(path, file)
        regions = reader.read_regions(info, indices)

    assert sum(reads) == expected_bytes
    for index in indices:
        region = regions[checkpoint.region_key(values.shape, index)]
        np.testing.assert_array_equal(region, values[index])


def test_load_logs_progress(caplog):
    name = "grok1-tiny"
    with caplog.at_level(logging.INFO, logger="checkpoint"):
        checkpoint.load_checkpoint(fixture_dir(name), model_shapes(name), SingleDeviceSharding(jax.devices()[0]))

    messages = [record.getMessage() for record in caplog.records if record.name == "checkpoint"]
    assert any(m.startswith("Validated 146 tensor files") for m in messages)
    final = [m for m in messages if m.startswith("Loaded 146/146 files")]
    assert len(final) == 1
    assert "MB/s" in final[0] or "GB/s" in final[0]


def test_load_rejects_mismatched_shardings_tree():
    name = "grok1-tiny"
    with pytest.raises(CheckpointError, match="structure of the parameter tree"):
        checkpoint.load_checkpoint(
            fixture_dir(name), model_shapes(name), {"only": SingleDeviceSharding(jax.devices()[0])}
        )
