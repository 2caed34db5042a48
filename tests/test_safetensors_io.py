"""Streaming safetensors IO: ShardedWriter output read back by the ``safetensors`` library (every dtype,
several shards, a valid index, any write order from several threads), its refusals, and SafetensorsDir
reading files written by ``safetensors`` / transformers."""

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from quantrl.checkpoint.safetensors_io import (
    INDEX_NAME,
    CheckpointError,
    SafetensorsDir,
    ShardedWriter,
    TensorSpec,
    read_header,
)

DTYPES = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


def random_tensor(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        return x.clamp(-400, 400).to(dtype)  # inside e4m3's range; e5m2 and wider types take it as is
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=gen, dtype=torch.int64).to(
        dtype
    )


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (works for fp8 and bool, where == is not what we mean)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def read_with_safetensors(out_dir) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors via ``safe_open``, following the index when there is one; also name -> file."""
    index = out_dir / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    tensors, where = {}, {}
    for fname in sorted(set(weight_map.values())):
        assert int.from_bytes((out_dir / fname).read_bytes()[:8], "little") % 8 == 0, (
            f"{fname}: data not 8-byte aligned"
        )
        with safe_open(str(out_dir / fname), "pt") as f:
            assert f.metadata()["format"] == "pt"
            for k in f.keys():
                assert k not in tensors
                tensors[k], where[k] = f.get_tensor(k), fname
    assert where == weight_map
    return tensors, where


@pytest.fixture
def zoo(gen) -> dict[str, torch.Tensor]:
    """One tensor per dtype in several shapes (odd sizes, a scalar, an empty tensor), ~70 KB in all."""
    shapes = [(37, 29), (8,), (3, 5, 7), (), (0, 4), (64, 33)]
    return {
        f"t{i}.{str(d).split('.')[-1]}": random_tensor(d, shapes[i % len(shapes)], gen)
        for i, d in enumerate(DTYPES * 2)
    }


def write_all(out_dir, tensors, max_shard_bytes, *, order=None, threads=1, metadata=None) -> ShardedWriter:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = ShardedWriter(out_dir, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)
    names = order or list(tensors)
    if threads == 1:
        for n in names:
            w.write(n, tensors[n])
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda n: w.write(n, tensors[n]), names))
    w.close()
    return w


def test_single_file_every_dtype(zoo, tmp_path):
    write_all(tmp_path, zoo, max_shard_bytes=1 << 30, metadata={"producer": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # one shard: no index
    back, _ = read_with_safetensors(tmp_path)
    assert set(back) == set(zoo)
    for n, t in zoo.items():
        assert same(back[n], t), n
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "test"}
    ours = SafetensorsDir(tmp_path)
    for n, t in zoo.items():
        assert same(ours.read(n), t), n
    assert ours.total_bytes == sum(t.numel() * t.element_size() for t in zoo.values())


def test_multi_shard_index(zoo, tmp_path):
    limit = 8_000
    w = write_all(tmp_path, zoo, max_shard_bytes=limit)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(zoo)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in zoo.values()) == w.total_bytes
    back, where = read_with_safetensors(tmp_path)
    for name, t in zoo.items():
        assert same(back[name], t), name
    for fname in shards:  # a shard exceeds the limit only when a single tensor does
        sizes = [zoo[k].numel() * zoo[k].element_size() for k, f in where.items() if f == fname]
        assert sum(sizes) <= limit or len(sizes) == 1, fname
    ours = SafetensorsDir(tmp_path)
    assert set(ours.names()) == set(zoo)
    assert all(same(ours.read(k), t) for k, t in zoo.items())


def test_random_order_from_threads(zoo, tmp_path):
    order = list(zoo)
    random.Random(7).shuffle(order)
    for d in ("threads", "serial"):
        (tmp_path / d).mkdir()
    write_all(tmp_path / "threads", zoo, max_shard_bytes=8_000, order=order, threads=4)
    write_all(tmp_path / "serial", zoo, max_shard_bytes=8_000)
    back, _ = read_with_safetensors(tmp_path / "threads")
    for name, t in zoo.items():
        assert same(back[name], t), name
    for f in sorted(p.name for p in (tmp_path / "serial").iterdir()):  # same bytes as writing in plan order
        assert (tmp_path / "threads" / f).read_bytes() == (tmp_path / "serial" / f).read_bytes(), f


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 9), min_size=0, max_size=3)), min_size=1, max_size=12
    ),
    limit=st.integers(1, 2_000),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path_factory, data, limit, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layer.{i}.w": random_tensor(d, tuple(shape), gen) for i, (d, shape) in enumerate(data)}
    out = tmp_path_factory.mktemp("prop")
    order = list(tensors)
    random.Random(seed).shuffle(order)
    write_all(out, tensors, max_shard_bytes=limit, order=order, threads=3)
    back, _ = read_with_safetensors(out)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert same(back[name], t), name


def test_missing_tensor_at_close(tmp_path, gen):
    tensors = {f"w{i}": random_tensor(torch.bfloat16, (4, 4), gen) for i in range(5)}
    w = ShardedWriter(tmp_path, [TensorSpec(n, t.dtype, (4, 4)) for n, t in tensors.items()])
    for n in ["w0", "w1", "w3"]:
        w.write(n, tensors[n])
    with pytest.raises(CheckpointError, match=r"2 planned tensor\(s\) never written, e.g. \['w2', 'w4'\]"):
        w.close()
    assert not (tmp_path / INDEX_NAME).exists()


def test_write_refusals(tmp_path, gen):
    w = ShardedWriter(tmp_path, [TensorSpec("a", torch.bfloat16, (4, 8)), TensorSpec("b", torch.int32, (4, 1))])
    with pytest.raises(ValueError, match=r"'a': planned torch.bfloat16 \[4, 8\], got torch.bfloat16 \[8, 4\]"):
        w.write("a", torch.zeros(8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"'a': planned torch.bfloat16 \[4, 8\], got torch.float32 \[4, 8\]"):
        w.write("a", torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"'b': planned torch.int32 \[4, 1\], got torch.int64 \[4, 1\]"):
        w.write("b", torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(KeyError, match="'c' was not planned"):
        w.write("c", torch.zeros(1))
    a = random_tensor(torch.bfloat16, (4, 8), gen)
    w.write("a", a.t().contiguous().t())  # a non-contiguous view of the right shape is fine
    with pytest.raises(ValueError, match="'a' written twice"):
        w.write("a", a)
    w.write("b", torch.arange(4, dtype=torch.int32).view(4, 1))
    w.close()
    back, _ = read_with_safetensors(tmp_path)
    assert same(back["a"], a) and back["b"].view(-1).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"duplicate output tensor names: \['x'\]"):
        ShardedWriter(tmp_path / "dup", [TensorSpec("x", torch.int8, (1,)), TensorSpec("x", torch.int8, (1,))])


def test_reads_files_written_by_safetensors(tmp_path, gen):
    tensors = {f"m.{i}": random_tensor(d, (3, 7), gen) for i, d in enumerate(DTYPES) if d != torch.bool}
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    infos = read_header(tmp_path / "model.safetensors")
    assert {n: (i.dtype, i.shape) for n, i in infos.items()} == {
        n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()
    }
    reader = SafetensorsDir(tmp_path)
    for n, t in tensors.items():
        assert n in reader and same(reader.read(n), t), n
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        reader.read("nope")


def test_reads_transformers_sharded_checkpoint(qwen3_ckpt, tmp_path):
    qwen3_ckpt.model.save_pretrained(tmp_path, max_shard_size=300_000)
    assert (tmp_path / INDEX_NAME).exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    reader = SafetensorsDir(tmp_path)
    assert set(reader.names()) == set(qwen3_ckpt.tensors)
    for n, t in qwen3_ckpt.tensors.items():
        assert same(reader.read(n), t), n


def test_tensor_in_two_shards(tmp_path, gen):
    t = random_tensor(torch.float32, (2, 2), gen)
    save_file({"x": t}, str(tmp_path / "a.safetensors"))
    save_file({"x": t}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="'x' appears in both a.safetensors and b.safetensors"):
        SafetensorsDir(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        SafetensorsDir(tmp_path / "missing")
