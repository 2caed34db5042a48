import importlib.util
import os

import pytest
import torch

# quantrl.kernels' Triton kernels run in Triton's CPU interpreter when there is no GPU (tests/test_kernels_*).
# TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before anything imports them.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tensors are tiny: a second OpenMP thread only adds barrier waits (up to 100x slower on a
    loaded 2-core machine). Tests that want more threads set them locally."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` fills every byte with 0xFF (NaN for float dtypes, fp8 included; -1 for ints), so an output
    element a kernel forgets to write cannot pass for a right answer."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.numel():
            t.reshape(-1).view(torch.uint8).fill_(0xFF)
        return t

    monkeypatch.setattr(torch, "empty", empty)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint conversion: tiny HF models saved in bf16, built once per session (shared by the convert_* and
# safetensors_io tests; tests copy them before mutating anything).
# ---------------------------------------------------------------------------------------------------------
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyCheckpoint:
    """A bf16 HF model directory written by ``save_pretrained`` plus what the tests compare against."""

    name: str
    path: Path
    tensors: dict  # name -> tensor, exactly as stored in the directory's safetensors
    model: object  # the bf16 transformers model that wrote ``path`` (eval mode)
    input_ids: torch.Tensor  # [2, 24] fixed random tokens
    logits: torch.Tensor  # fp32 logits of ``model`` on ``input_ids``

    def quantizable(self) -> list[str]:
        """2-D Linear weights of the decoder layers (what every converter must quantize)."""
        return sorted(n for n, t in self.tensors.items() if n.endswith("_proj.weight") and t.ndim == 2)


def read_checkpoint(path) -> dict:
    """Every tensor of a safetensors model dir (single file or sharded index), read with ``safetensors``."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(str(path / f), "pt") as fh:
            for k in fh.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = fh.get_tensor(k)
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _train_tokenizer():
    from _tiny_models import bpe_tokenizer

    from quantrl.checkpoint.calibration import default_calibration_texts

    return bpe_tokenizer(default_calibration_texts(64, seed=1))


def _randomize(model, seed: int) -> None:
    """Fresh, heavy-tailed weights (1% outliers x8) so block/channel/tensor scales all differ; norms != 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                continue
            w = torch.randn(p.shape, generator=gen)
            if "embed" not in name and "lm_head" not in name:
                w /= p.shape[1] ** 0.5
                w = torch.where(torch.rand(p.shape, generator=gen) < 0.002, 4 * w, w)
            p.copy_(w)


def build_tiny_checkpoint(name: str, path: Path, tokenizer, seed: int) -> TinyCheckpoint:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = {
        "vocab_size": 500,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 128,
    }
    if name == "qwen3":
        # intermediate 320: gate/up have N = 320 and down_proj K = 320, not multiples of 128 (ragged edge blocks)
        config = Qwen3Config(
            hidden_size=256, intermediate_size=320, num_key_value_heads=2, tie_word_embeddings=False, **common
        )
    elif name == "llama":
        # every dim a multiple of 128 or <= 128: k/v_proj are [64, 256] (one kv head); tied lm_head (not stored)
        config = LlamaConfig(
            hidden_size=256, intermediate_size=384, num_key_value_heads=1, tie_word_embeddings=True, **common
        )
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert (path / "generation_config.json").exists() and (path / "tokenizer.json").exists()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        logits = model(ids).logits.float()
    return TinyCheckpoint(name, path, read_checkpoint(path), model, ids, logits)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained offline on the built-in calibration corpus (a real HF fast tokenizer)."""
    return _train_tokenizer()


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory, tiny_tokenizer) -> TinyCheckpoint:
    """Qwen3, 2 layers, hidden 256, intermediate 320 (not a multiple of 128), untied lm_head."""
    return build_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3-bf16"), tiny_tokenizer, seed=11)


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory, tiny_tokenizer) -> TinyCheckpoint:
    """Llama, 2 layers, hidden 256, intermediate 384, one 64-wide kv head, tied embeddings."""
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama-bf16"), tiny_tokenizer, seed=22)


@pytest.fixture(scope="session")
def tiny_ckpts(qwen3_ckpt, llama_ckpt) -> dict:
    return {"qwen3": qwen3_ckpt, "llama": llama_ckpt}


def load_hf(path, compressed_tensors: bool):
    """transformers' CPU load of a quantized checkpoint (dequantized to bf16)."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if compressed_tensors:  # transformers needs the library to read the format (CI installs it; the GPU image lacks it)
        pytest.importorskip("compressed_tensors", reason="transformers loads compressed-tensors checkpoints through it")
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if compressed_tensors else {}
    with warnings.catch_warnings():  # "you passed quantization_config ... loading attributes will be overwritten"
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, **kw).eval()


def aux_files(path) -> dict:
    """Non-weight files a converter must copy verbatim: name -> bytes."""
    skip = ("config.json", "model.safetensors.index.json")
    return {
        p.name: p.read_bytes()
        for p in Path(path).iterdir()
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in skip
    }


@pytest.fixture(scope="session")
def ckpt_tools():
    """Helpers for checkpoint tests (a fixture so test modules need not import conftest)."""

    class Tools:
        read = staticmethod(read_checkpoint)
        rel_error = staticmethod(rel_error)
        load_hf = staticmethod(load_hf)
        aux_files = staticmethod(aux_files)

    return Tools
