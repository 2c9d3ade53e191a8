"""Sparse safetensors files: bit-exact round trips, the per-tensor format choice, sizes, and clear errors."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import lightning_prune.files.codec as codec
from lightning_prune import inspect_sparse, load_sparse, load_sparse_into, save_sparse
from lightning_prune.files.codec import SparseParts, join_sparse, split_sparse
from lightning_prune.files.packing import pack_bits, packed_size, unpack_bits
from lightning_prune.files.sparse_files import SparseFileInfo

BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def raw(t: Tensor) -> Tensor:
    """The bit patterns of a tensor (floating ones as integers, so that -0.0 differs from +0.0 and NaN equals)."""
    return t.view(BITS[t.dtype]) if t.dtype in BITS else t


def assert_bit_identical(loaded: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert list(loaded) == list(expected)
    for key, t in expected.items():
        got = loaded[key]
        assert got.dtype == t.dtype and got.shape == t.shape, key
        assert torch.equal(raw(got.contiguous()), raw(t.contiguous())), key
        if not t.is_floating_point() or not t.isnan().any():
            assert torch.equal(got, t), key


def sparse_tensor(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """Random values with about ``sparsity`` zeros, half of them -0.0, and a few NaN and infinities."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    u = torch.rand(shape, generator=g)
    t[u < sparsity / 2] = 0.0
    t[(u >= sparsity / 2) & (u < sparsity)] = -0.0
    flat = t.view(-1)
    if flat.numel() > 10 and sparsity < 1:
        flat[1], flat[3], flat[5] = float("nan"), float("inf"), float("-inf")
    return t


def roundtrip(tmp_path: Path, state: Any, **kwargs: Any) -> tuple[dict[str, Tensor], SparseFileInfo]:
    path = tmp_path / "model.safetensors"
    info = save_sparse(state, path, **kwargs)
    return load_sparse(path), info


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99, 1.0])
def test_save_sparse_roundtrip_bit_identical(tmp_path: Path, dtype: torch.dtype, sparsity: float) -> None:
    state = {
        "w": sparse_tensor((37, 29), sparsity, dtype),
        "conv": sparse_tensor((8, 3, 3, 3), sparsity, dtype, seed=1),
        "positive_zeros": sparse_tensor((50, 20), sparsity, dtype, seed=2).abs(),
    }
    loaded, info = roundtrip(tmp_path, state)
    assert_bit_identical(loaded, state)
    expected_format = "dense" if sparsity == 0 else "sparse"  # 30% zeros pay: 1/8 + 2/8 bytes < 0.3 * 2 bytes
    assert info.formats == dict.fromkeys(state, expected_format)
    if sparsity == 1.0:
        assert info.file_bytes < info.dense_bytes / 2  # bitmasks and the header; no values


def test_save_sparse_roundtrip_special_tensors(tmp_path: Path) -> None:
    base = sparse_tensor((16, 12), 0.9, torch.float32)
    state = {
        "scalar_zero": torch.tensor(-0.0),  # two bitmask bytes < 4 bytes
        "scalar": torch.tensor(2.5),
        "scalar_int": torch.tensor(3),
        "empty": torch.zeros(0, 3),
        "empty_half": torch.zeros(5, 0, dtype=torch.float16),
        "transposed": base.t(),
        "strided": sparse_tensor((40, 40), 0.95, torch.bfloat16)[::3, 1::2],
        "row_view": base[4:9],  # shares base's storage with another key, another view
        "base": base,
        "num_batches_tracked": torch.tensor(12345678901, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "ints": torch.tensor([[0, 0, 7], [0, 0, 0]], dtype=torch.int32),
        "complex": torch.zeros(4, dtype=torch.complex64),
    }
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    loaded, info = roundtrip(tmp_path, state)
    assert_bit_identical(loaded, state)
    sparse = ("transposed", "strided", "base", "scalar_zero")
    assert all(info.formats[key] == "sparse" for key in sparse)
    for key in ("scalar", "scalar_int", "empty", "empty_half", "num_batches_tracked", "flags", "ints", "complex"):
        assert info.formats[key] == "dense", key
    assert loaded["row_view"].data_ptr() != loaded["base"].data_ptr()


def test_save_sparse_chunks_and_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks (64 entries each) on two threads, with sizes that are not multiples of 8 or of a chunk."""
    monkeypatch.setattr(codec, "_CHUNK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    state = {f"t{n}": sparse_tensor((n,), 0.8, torch.float32, seed=n) for n in (1, 63, 64, 65, 1000, 4099)}
    loaded, info = roundtrip(tmp_path, state)
    assert_bit_identical(loaded, state)
    assert info.formats["t4099"] == info.formats["t1000"] == "sparse"


@pytest.mark.parametrize("populated", [False, True], ids=["malloc", "populated"])
@pytest.mark.parametrize("sparsity", [0.5, 0.88, 0.92, 0.97, 1.0])
def test_load_sparse_decoders_by_density(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparsity: float, populated: bool
) -> None:
    """Chunks (64 entries) with more and with fewer than one nonzero in ten find their entries in two ways; with
    ``populated``, every tensor is decoded into a populated memory map (as tensors of 32 MiB and more are)."""
    monkeypatch.setattr(codec, "_CHUNK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    if populated:
        monkeypatch.setattr(codec, "_POPULATED_BYTES", 0)
    state = {str(dtype): sparse_tensor((37, 29), sparsity, dtype, seed=i) for i, dtype in enumerate(BITS)}
    loaded, info = roundtrip(tmp_path, state)
    assert set(info.formats.values()) == {"sparse"}
    assert_bit_identical(loaded, state)
    for t in loaded.values():  # plain, writable tensors
        t.add_(1)


def test_save_sparse_tied_weights(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    with torch.no_grad():
        model.embed.weight.masked_fill_(model.embed.weight.abs() < 1.5, 0.0)
    loaded, info = roundtrip(tmp_path, model)
    assert info.formats == {"embed.weight": "sparse", "head.weight": "alias"}
    assert loaded["head.weight"] is loaded["embed.weight"]
    fresh = Tied()
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh.head.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


@pytest.mark.cuda
def test_save_sparse_cuda_tensors_come_back_bit_identical(tmp_path: Path) -> None:
    state = {"w": sparse_tensor((64, 64), 0.95, torch.bfloat16).cuda()}
    path = tmp_path / "gpu.safetensors"
    assert save_sparse(state, path).formats == {"w": "sparse"}
    loaded = load_sparse(path, device="cuda")
    assert loaded["w"].is_cuda and torch.equal(raw(loaded["w"]), raw(state["w"]))
    parts = split_sparse(state)["w"]
    assert isinstance(parts, SparseParts) and parts.values.is_cuda
    assert torch.equal(raw(join_sparse(parts)), raw(state["w"]))  # the masked_scatter_ decoder


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3))
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def prune_by_multiplying(model: nn.Module, sparsity: float) -> None:
    """Zero the smallest weights as torch's pruning does (weight * mask: -0.0 where a pruned weight was negative)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                k = int(sparsity * p.numel())
                threshold = p.abs().flatten().kthvalue(k).values
                p.mul_(p.abs() > threshold)


def test_load_sparse_into_fresh_model_strict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    prune_by_multiplying(model, 0.9)
    model.train()
    model(torch.randn(4, 3, 12, 12))  # BatchNorm running stats and num_batches_tracked change
    path = tmp_path / "cnn.safetensors"
    info = save_sparse(model, path, metadata={"epoch": "3"})
    fresh = SmallCNN()
    result = load_sparse_into(fresh, path)
    assert not result.missing_keys and not result.unexpected_keys
    assert_bit_identical(fresh.state_dict(), model.state_dict())
    assert int(fresh.features[1].num_batches_tracked) == 1
    model.eval()
    fresh.eval()
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(fresh(x), model(x))
    assert info.formats["features.0.weight"] == "sparse" and info.formats["features.1.running_var"] == "dense"
    assert inspect_sparse(path) == info and info.metadata == {"epoch": "3"}


# ------------------------------------------------------------------------------------------------ formats and sizes


@pytest.mark.parametrize(
    ("dtype", "negative_zero", "sparse_up_to"),
    [
        (torch.float32, False, 968),  # 125 + 4 * 968 = 3997 < 4000 bytes; 969 values: 4001
        (torch.bfloat16, False, 937),  # 125 + 2 * 937 = 1999 < 2000
        (torch.float32, True, 937),  # a second bitmask for the -0.0: 250 + 4 * 937 = 3998 < 4000
    ],
)
def test_save_sparse_format_break_even(
    tmp_path: Path, dtype: torch.dtype, negative_zero: bool, sparse_up_to: int
) -> None:
    for nnz, expected in ((sparse_up_to, "sparse"), (sparse_up_to + 1, "dense")):
        t = torch.zeros(1000, dtype=dtype)
        t[:nnz] = torch.arange(1, nnz + 1, dtype=dtype)
        if negative_zero:
            t[-1] = -0.0
        path = tmp_path / f"{nnz}.safetensors"
        save_sparse({"t": t}, path)
        assert inspect_sparse(path).formats == {"t": expected}, nnz
        assert torch.equal(raw(load_sparse(path)["t"]), raw(t))


def magnitude_pruned_linear(sparsity: float, *, multiply: bool = False) -> nn.Linear:
    """A 1000x1000 Linear (1M weights) with ``sparsity`` of its weights zeroed by magnitude."""
    torch.manual_seed(0)
    layer = nn.Linear(1000, 1000)
    if sparsity:
        if multiply:
            prune_by_multiplying(layer, sparsity)
        else:
            with torch.no_grad():
                threshold = layer.weight.abs().flatten().kthvalue(int(sparsity * layer.weight.numel())).values
                layer.weight.masked_fill_(layer.weight.abs() <= threshold, 0.0)
    return layer


def torch_save_bytes(state: dict[str, Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


@pytest.mark.parametrize(("sparsity", "at_most"), [(0.95, 0.10), (0.98, 0.06), (0.0, 1.01)])
def test_save_sparse_size_vs_torch_save(tmp_path: Path, sparsity: float, at_most: float) -> None:
    layer = magnitude_pruned_linear(sparsity)
    info = save_sparse(layer, tmp_path / "layer.safetensors")
    ratio = info.file_bytes / torch_save_bytes(layer.state_dict())
    assert ratio <= at_most
    assert info.formats["weight"] == ("sparse" if sparsity else "dense")


def test_save_sparse_negative_zeros_cost_one_bit(tmp_path: Path) -> None:
    """Pruning by multiplication leaves -0.0 in about half the pruned entries; keeping them costs 1 bit an entry,
    ``signed_zeros=False`` drops them (equal as numbers, not bit for bit)."""
    layer = magnitude_pruned_linear(0.95, multiply=True)
    assert (layer.weight.view(torch.int32) == torch.iinfo(torch.int32).min).sum() > 400_000
    dense = torch_save_bytes(layer.state_dict())
    exact = save_sparse(layer, tmp_path / "exact.safetensors")
    assert 0.10 < exact.file_bytes / dense <= 0.12
    assert torch.equal(raw(load_sparse(exact.path)["weight"]), raw(layer.weight.detach()))
    unsigned = save_sparse(layer, tmp_path / "unsigned.safetensors", signed_zeros=False)
    assert unsigned.file_bytes / dense <= 0.10
    loaded = load_sparse(unsigned.path)["weight"]
    assert torch.equal(loaded, layer.weight.detach()) and not loaded.signbit()[loaded == 0].any()


def test_load_sparse_plain_safetensors_file_as_is(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    tensors = {"b": torch.zeros(3), "a": torch.arange(4)}
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = load_sparse(path)
    assert sorted(loaded) == ["a", "b"] and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="without the 'lightning_prune.sparse' marker"):
        inspect_sparse(path)


# ------------------------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
def test_pack_bits_matches_reference(numel: int) -> None:
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.3
    reference = [sum(int(b) << (7 - i) for i, b in enumerate(mask[j : j + 8].tolist())) for j in range(0, numel, 8)]
    packed = pack_bits(mask)
    assert packed.tolist() == reference and packed.dtype == torch.uint8 and packed.numel() == packed_size(numel)
    assert torch.equal(unpack_bits(packed, (numel,)), mask.to(torch.uint8))
    assert torch.equal(pack_bits(mask.float() * -3), packed)  # nonzero = kept, whatever the dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_join_sparse_device_decoder_matches_cpu_decoder(dtype: torch.dtype) -> None:
    t = sparse_tensor((33, 17), 0.9, dtype)
    parts = split_sparse({"t": t})["t"]
    assert isinstance(parts, SparseParts) and parts.negative_zeros is not None
    assert torch.equal(raw(codec._decode_torch(parts)), raw(t))
    assert torch.equal(raw(join_sparse(parts)), raw(t))


# ------------------------------------------------------------------------------------------------ errors


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_header(path: Path, header: dict[str, Any], body: bytes) -> None:
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    path.write_bytes(len(raw_header).to_bytes(8, "little") + raw_header + body)


def edit_entries(path: Path, edit: Any) -> None:
    """Apply ``edit`` to the list of tensor entries in the file's metadata (or to the metadata itself)."""
    header, body = read_header(path)
    metadata = header["__metadata__"]
    entries = json.loads(metadata["lightning_prune.tensors"])
    result = edit(entries, metadata)
    if result is not None:
        metadata["lightning_prune.tensors"] = result
    else:
        metadata["lightning_prune.tensors"] = json.dumps(entries)
    write_header(path, header, body)


def edit_data(path: Path, name: str, edit: Any) -> None:
    """Change the bytes of the stored tensor ``name`` in place: ``edit(bytearray) -> None``."""
    header, body = read_header(path)
    begin, end = header[name]["data_offsets"]
    data = bytearray(body)
    piece = data[begin:end]
    edit(piece)
    data[begin:end] = piece
    write_header(path, header, bytes(data))


@pytest.fixture
def sparse_file(tmp_path: Path) -> Path:
    w = torch.zeros(10, 10)
    w[0, :3] = torch.tensor([1.0, -2.0, 3.0])
    w[5, 5] = -0.0
    path = tmp_path / "sparse.safetensors"
    save_sparse({"w": w, "tied": w, "b": torch.ones(4), "n": torch.tensor(2)}, path)
    return path


def _set(entries: list, key: str, value: Any, name: str = "w") -> None:
    next(e for e in entries if e["name"] == name)[key] = value


CORRUPTIONS = [
    ("not JSON", lambda entries, metadata: "[{", "is missing or not JSON"),
    ("not a list", lambda entries, metadata: json.dumps({"w": 1}), "must be a list"),
    ("bad format", lambda entries, metadata: _set(entries, "format", "zip"), "a 'format' in"),
    ("bad dtype", lambda entries, metadata: _set(entries, "dtype", "float33"), "is not a torch dtype"),
    ("bad shape", lambda entries, metadata: _set(entries, "shape", [10, -10]), "non-negative ints"),
    ("dense shape", lambda entries, metadata: _set(entries, "shape", [2, 2], "b"), "stored tensor has shape"),
    ("dense dtype", lambda entries, metadata: _set(entries, "dtype", "float64", "b"), "is stored as torch.float32"),
    ("sparse shape", lambda entries, metadata: _set(entries, "shape", [10, 11]), "has shape"),
    ("sparse nnz", lambda entries, metadata: _set(entries, "nnz", 4), "values have shape"),
    ("sparse dtype", lambda entries, metadata: _set(entries, "dtype", "int32"), "a sparse tensor must be of a dtype"),
    ("negative zeros", lambda entries, metadata: _set(entries, "negative_zeros", 0), "in the file but not in its"),
    ("alias target", lambda entries, metadata: _set(entries, "of", "nothing", "tied"), "an alias must name"),
    ("twice", lambda entries, metadata: entries.append(dict(entries[0])), "is listed twice"),
    ("missing", lambda entries, metadata: entries.remove(entries[2]), "in the file but not in its metadata"),
    ("version", lambda entries, metadata: metadata.update({"lightning_prune.sparse": "2"}), "format version '2'"),
]


@pytest.mark.parametrize(("what", "edit", "match"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_load_sparse_corrupt_metadata(sparse_file: Path, what: str, edit: Any, match: str) -> None:
    edit_entries(sparse_file, edit)
    with pytest.raises(ValueError, match=match) as err:
        load_sparse(sparse_file)
    assert str(sparse_file) in str(err.value)


def test_load_sparse_values_count_not_popcount(sparse_file: Path) -> None:
    edit_data(sparse_file, "w:bitmask", lambda data: data.__setitem__(5, 0xFF))
    with pytest.raises(ValueError, match=r"corrupt sparse tensor 'w': the bitmask has 11 bits set but there are 3"):
        load_sparse(sparse_file)


def test_load_sparse_overlapping_bitmasks(sparse_file: Path) -> None:
    def move_negative_zero(data: bytearray) -> None:
        data[0], data[6] = 0x80, 0  # from entry 55 (w[5, 5]) to entry 0, which is 1.0

    edit_data(sparse_file, "w:negative_zeros", move_negative_zero)
    with pytest.raises(ValueError, match="negative-zeros bitmask marks entries that the bitmask marks"):
        load_sparse(sparse_file)


def test_load_sparse_padding_bits(tmp_path: Path) -> None:
    path = tmp_path / "pad.safetensors"
    save_sparse({"w": torch.zeros(100)}, path)  # 13 bytes, the last holds 4 entries and 4 padding bits
    edit_data(path, "w:bitmask", lambda data: data.__setitem__(12, 0x01))
    with pytest.raises(ValueError, match="bits set past the tensor's last entry"):
        load_sparse(path)


def test_load_sparse_not_safetensors(tmp_path: Path) -> None:
    pickle_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, pickle_file)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    for path in (pickle_file, text_file):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a readable safetensors file"):
            load_sparse(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_sparse(tmp_path / "missing.safetensors")


def test_load_sparse_truncated(sparse_file: Path) -> None:
    sparse_file.write_bytes(sparse_file.read_bytes()[:-7])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_sparse(sparse_file)


def test_load_sparse_into_shapes_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "linear.safetensors"
    save_sparse(magnitude_pruned_linear(0.9), path)
    with pytest.raises(ValueError, match=rf"(?s){re.escape(str(path))} does not fit Linear: .*size mismatch"):
        load_sparse_into(nn.Linear(1000, 999), path)
    with pytest.raises(ValueError, match=r"(?s)does not fit Sequential: .*Missing key"):
        load_sparse_into(nn.Sequential(nn.Linear(1000, 1000)), path)
    result = load_sparse_into(nn.Sequential(nn.Linear(1000, 1000)), path, strict=False)
    assert result.unexpected_keys == ["weight", "bias"]


BAD_SAVES = [
    ({"w": torch.zeros(3)}, {"lightning_prune.x": "1"}, "keys starting with 'lightning_prune.' are reserved"),
    ({"w": torch.zeros(3)}, {"epoch": 3}, "`metadata` must be a dict of str to str"),
    ({"w": torch.zeros(3)}, ["epoch"], "`metadata` must be a dict"),
    ({"w": [0.0]}, None, "must map str to Tensor, got 'w': list"),
    ({"w": torch.zeros(3, 3).to_sparse()}, None, "must be a dense tensor"),
    ({"w": torch.zeros(3, device="meta")}, None, "must be a dense tensor"),
    ({"__metadata__": torch.zeros(3)}, None, "safetensors reserves it"),
    ({"w": torch.zeros(64), "w:bitmask": torch.ones(3)}, None, r"clash .*\['w:bitmask'\]"),
    ([torch.zeros(3)], None, "must be an nn.Module or a mapping"),
]


@pytest.mark.parametrize(("state", "metadata", "match"), BAD_SAVES)
def test_save_sparse_bad_arguments(tmp_path: Path, state: Any, metadata: Any, match: str) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=match):
        save_sparse(state, path, metadata=metadata)
    assert not path.exists()


def test_join_sparse_bad_parts() -> None:
    with pytest.raises(ValueError, match="must be 2 uint8 bytes"):
        join_sparse(SparseParts(torch.zeros(3, dtype=torch.uint8), (16,), torch.ones(1)))
    with pytest.raises(ValueError, match="1-d float16, bfloat16, float32 or float64 tensor of at most 16"):
        join_sparse(SparseParts(torch.zeros(2, dtype=torch.uint8), (16,), torch.ones(17)))
    with pytest.raises(ValueError, match="1-d float16"):
        join_sparse(SparseParts(torch.zeros(2, dtype=torch.uint8), (16,), torch.ones(1, dtype=torch.int32)))


def test_load_sparse_tensors_own_their_memory(tmp_path: Path) -> None:
    """safetensors maps the file; the loaded tensors must not change when the file is rewritten in place."""
    path = tmp_path / "own.safetensors"
    save_sparse({"dense": torch.ones(1000), "sparse": torch.zeros(1000)}, path)
    loaded = load_sparse(path)
    header, body = read_header(path)
    begin, end = header["dense"]["data_offsets"]
    write_header(path, header, body[:begin] + bytes(end - begin) + body[end:])
    assert torch.equal(loaded["dense"], torch.ones(1000)) and torch.equal(load_sparse(path)["dense"], torch.zeros(1000))
