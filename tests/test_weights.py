"""Weights I/O: canonical keys, metadata, and rejection of every malformed file, without loading it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fedfs.errors import IntegrityError, SchemaError, TooLarge, ValidationError
from fedfs.weights.header import inspect_weights, safetensors_header
from fedfs.weights.tensors import (
    canonical_state,
    load_weights,
    relative_change,
    save_weights,
    validate_update,
    weights_metadata,
)


def write_raw(path, header: dict, data: bytes, length: int | None = None) -> str:
    """A safetensors file written by hand, so that it can be wrong in any way."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return str(path)


def f32(*values: float) -> bytes:
    return torch.tensor(values, dtype=torch.float32).numpy().tobytes()


class Shared(torch.nn.Module):
    """Like nnU-Net: the decoder holds a reference to the encoder, so state_dict() aliases it."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(2, 3)
        self.decoder = torch.nn.Module()
        self.decoder.encoder = self.encoder
        self.decoder.head = torch.nn.Linear(3, 1)
        self.norm = torch.nn.BatchNorm1d(3)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


# ---- canonical_state -----------------------------------------------------------
def test_canonical_state_of_module_drops_aliases_and_nonpersistent_buffers():
    # Prepare
    net = Shared()
    # Execute
    state = canonical_state(net)
    # Assert
    assert len(net.state_dict()) > len(state)
    assert sorted(state) == sorted([
        "encoder.weight", "encoder.bias", "decoder.head.weight", "decoder.head.bias",
        "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"])


def test_canonical_state_of_state_dict_keeps_first_of_each_alias():
    # Prepare
    net = Shared()
    # Execute
    from_dict = canonical_state(net.state_dict())
    # Assert
    assert sorted(from_dict) == sorted(canonical_state(net))


def test_canonical_state_strips_torch_compile_prefix():
    # Prepare: what torch.compile's OptimizedModule looks like from outside
    wrapper = torch.nn.Module()
    wrapper._orig_mod = torch.nn.Linear(2, 2)
    # Execute
    state = canonical_state(wrapper)
    # Assert
    assert sorted(state) == ["bias", "weight"]


def test_save_refuses_non_string_metadata_and_unsupported_dtype(tmp_path):
    with pytest.raises(ValidationError):
        save_weights(tmp_path / "a.safetensors", {"a": torch.zeros(2)}, {"num_cases": 3})  # type: ignore[dict-item]
    with pytest.raises(ValidationError, match="dtype"):
        save_weights(tmp_path / "b.safetensors", {"a": torch.zeros(2, dtype=torch.int32)})


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    # Prepare
    meta = weights_metadata(federation="fed", site="A", version=3, base_version=2, num_cases=12, plans_digest="ab")
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(5)}
    path = tmp_path / "u.safetensors"
    # Execute
    save_weights(path, tensors, meta)
    info = inspect_weights(path, expected={"w": (2, 3), "n": ()})
    loaded, loaded_meta = load_weights(path)
    # Assert
    assert info.metadata == {"federation": "fed", "site": "A", "version": "3", "base_version": "2",
                             "num_cases": "12", "plans_digest": "ab"}
    assert info.shapes() == {"n": (), "w": (2, 3)} and info.num_params == 7
    assert loaded_meta == dict(info.metadata)
    assert torch.equal(loaded["w"], tensors["w"]) and loaded["n"].item() == 5


def test_own_header_writer_is_readable_by_safetensors(tmp_path):
    # Prepare
    header, offsets = safetensors_header([("a", "F32", (2,)), ("b", "F32", (1,))], {"k": "v"})
    path = tmp_path / "h.safetensors"
    path.write_bytes(header + f32(1, 2) + f32(3))
    # Execute
    tensors, meta = load_weights(path)
    # Assert
    assert offsets == [0, 8] and len(header) % 8 == 0
    assert tensors["a"].tolist() == [1, 2] and tensors["b"].tolist() == [3] and meta == {"k": "v"}



def test_save_is_byte_deterministic_and_readable_by_safetensors(tmp_path):
    """Same weights and metadata, same bytes (safetensors' own writer orders a metadata map of two or
    more keys at random, so a re-published update after a crash was a different blob)."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {"b.w": torch.randn(3, 4), "a.n": torch.arange(5, dtype=torch.int64), "c.h": torch.randn(2).half(),
             "d.bf": torch.randn(2, 2).bfloat16(), "e.scalar": torch.tensor(3.0), "f.empty": torch.zeros(0, 3)}
    meta = {"site": "A", "num_cases": "12", "base_version": "3", "round": "4"}
    digests = set()
    for i in range(6):
        save_weights(tmp_path / f"{i}.safetensors", state, dict(reversed(list(meta.items()))) if i % 2 else meta)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    back = load_file(str(tmp_path / "0.safetensors"))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype
                                           for k in state)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == meta
    assert inspect_weights(tmp_path / "0.safetensors").metadata == meta


def test_header_parsing_never_imports_torch():
    # Execute: a fresh interpreter reads keys and shapes through fedfs.weights.header
    code = ("import sys, fedfs.weights.header as h, fedfs.fl.combination; "
            "assert h.ALLOWED_DTYPES['BF16'] == 2; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # Assert
    assert out.strip() == "False"


def test_relative_change_over_shared_float_tensors(tmp_path):
    # Prepare: base w = (3, 4), x w = (3, 4) + (0, 5); "n" (integer) and "extra" (not in base) are skipped
    base, x = tmp_path / "base.safetensors", tmp_path / "x.safetensors"
    save_weights(base, {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(1)})
    save_weights(x, {"w": torch.tensor([3.0, 9.0]), "n": torch.tensor(9), "extra": torch.tensor([100.0])})
    # Execute / Assert: ||(0, 5)|| / ||(3, 4)|| = 1
    assert relative_change(str(x), str(base)) == pytest.approx(1.0)
    assert relative_change(str(base), str(base)) == 0.0


# ---- rejections ----------------------------------------------------------------
def test_pickle_renamed_safetensors_is_rejected(tmp_path):
    # Prepare: torch.save writes a zip; a bare pickle starts with the PROTO opcode
    zipped = tmp_path / "torch.safetensors"
    torch.save({"a": torch.zeros(2)}, zipped)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
    # Execute / Assert
    with pytest.raises(SchemaError, match="zip archive.*never unpickles"):
        inspect_weights(zipped)
    with pytest.raises(SchemaError, match="pickle"):
        inspect_weights(bare)


def test_oversized_header_is_rejected_before_it_is_read(tmp_path):
    # Prepare
    huge = write_raw(tmp_path / "huge.safetensors", {}, b"", length=17 * 1024 * 1024)
    small = write_raw(tmp_path / "small.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                      f32(1))
    # Execute / Assert
    with pytest.raises(TooLarge, match="exceeds"):
        inspect_weights(huge)
    with pytest.raises(TooLarge):
        inspect_weights(small, max_header=16)


def test_truncated_file_is_rejected(tmp_path):
    # Prepare
    path = tmp_path / "t.safetensors"
    save_weights(path, {"a": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:-10])
    # Execute / Assert
    with pytest.raises(IntegrityError, match="truncated") as err:
        inspect_weights(path)
    assert str(path) in str(err.value)


def test_trailing_bytes_and_overlaps_are_rejected(tmp_path):
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    with pytest.raises(IntegrityError, match="trailing"):
        inspect_weights(write_raw(tmp_path / "a.safetensors", {"a": entry}, f32(1, 2)))
    with pytest.raises(IntegrityError, match="overlapping"):
        inspect_weights(write_raw(tmp_path / "b.safetensors", {"a": entry, "b": entry}, f32(1, 2)))


@pytest.mark.parametrize("header, reason", [
    ({"a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, "dtype 'I32'"),
    ({"a": {"dtype": "BOOL", "shape": [4], "data_offsets": [0, 4]}}, "dtype 'BOOL'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1]}}, "exactly dtype"),
    ({"__metadata__": {"n": 3}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "strings"),
])
def test_malformed_headers_are_rejected_with_their_reason(tmp_path, header, reason):
    # Prepare
    path = write_raw(tmp_path / "m.safetensors", header, f32(1))
    # Execute / Assert
    with pytest.raises(SchemaError, match=reason) as err:
        inspect_weights(path)
    assert path in str(err.value)


def test_duplicate_keys_and_non_json_are_rejected(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "d.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + f32(1))
    with pytest.raises(SchemaError, match="duplicate"):
        inspect_weights(path)
    path.write_bytes((4).to_bytes(8, "little") + b"nope" + f32(1))
    with pytest.raises(SchemaError, match="malformed"):
        inspect_weights(path)


@pytest.mark.parametrize("expected, reason", [
    ({"w": (2,), "b": (1,), "extra": (3,)}, "missing tensor 'extra'"),
    ({"w": (2,)}, "unexpected tensor 'b'"),
    ({"w": (3,), "b": (1,)}, "tensor 'w' has shape \\[2\\], expected \\[3\\]"),
])
def test_keys_and_shapes_must_match_the_declared_architecture(tmp_path, expected, reason):
    # Prepare
    path = tmp_path / "s.safetensors"
    save_weights(path, {"w": torch.zeros(2), "b": torch.zeros(1)})
    # Execute / Assert
    with pytest.raises(SchemaError, match=reason):
        inspect_weights(path, expected=expected)


@pytest.mark.parametrize("bad, what", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
def test_validate_update_rejects_non_finite_values(tmp_path, bad, what):
    # Prepare
    path = tmp_path / "nf.safetensors"
    save_weights(path, {"fine": torch.zeros(3), "w": torch.tensor([1.0, bad, 2.0], dtype=torch.float16)})
    # Execute / Assert
    inspect_weights(path)  # the header alone is fine
    with pytest.raises(ValidationError, match=f"tensor 'w' contains {what}"):
        validate_update(path)


def test_validate_update_accepts_a_clean_file_in_chunks(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_weights(path, {"big": torch.randn(1_100_000), "count": torch.tensor(3)})
    assert validate_update(path, {"big": (1_100_000,), "count": ()}).num_params == 1_100_001


def test_every_error_is_a_validation_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValidationError, match="missing.safetensors"):
        inspect_weights(missing)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValidationError, match=os.path.basename(empty)):
        inspect_weights(empty)


def test_a_real_nnunet_network_saves_without_aliases_and_loads_back(tmp_path):
    # Prepare: the 2D 5-stage network nnU-Net builds from plans (state_dict: 240 keys, 88 tensors)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from test_align import plans_configuration

    cm = ConfigurationManager(plans_configuration(5))

    def build() -> torch.nn.Module:
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)

    net, fresh = build(), build()
    path = tmp_path / "net.safetensors"
    # Execute
    save_weights(path, net, weights_metadata(federation="f", site="A", version=1, num_cases=4))
    tensors, _ = load_weights(path)
    _, unexpected = fresh.load_state_dict(tensors, strict=False)
    # Assert: the keys strict=False skips are aliases, so the fresh net now equals the saved one
    assert len(net.state_dict()) == 240 and len(tensors) == 88 and not unexpected
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in net.state_dict().items())
