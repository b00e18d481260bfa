"""Loading LLaDA through mlx-lm's unchanged API and commands.

Conversion and quantization, bidirectional attention, clear errors for broken
checkpoints, no remote code, the tokenizer, the hook's effect on other models,
start-up cost, and the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import GOLDEN

REPO = Path(__file__).resolve().parents[1]
TINY = GOLDEN / "tiny-mha"
BIN = Path(sys.executable).parent
SPECIAL = json.loads((GOLDEN / "cases.json").read_text())["special_token_ids"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _env(disable=False, **extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    env.pop("MLX_LM_LLADA_DISABLE", None)
    if disable:
        env["MLX_LM_LLADA_DISABLE"] = "1"
    return env


def _command(name):
    """An mlx-lm console script of this venv, or ``python -m mlx_lm <name>``."""
    script = BIN / f"mlx_lm.{name}"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mlx_lm", name]


def _run(args, env=None, timeout=120, cwd=GOLDEN):
    # stdin closed: a question on the terminal would fail, not hang. The
    # working directory holds no Python package that could shadow ours.
    return subprocess.run(
        args,
        env=env or _env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _python(code, env=None, flags=(), cwd=GOLDEN):
    return _run([sys.executable, *flags, "-c", code], env=env, cwd=cwd)


def _generated_text(stdout):
    # mlx_lm.generate prints the text between two "==========" lines.
    parts = stdout.split("==========\n")
    assert len(parts) >= 3, stdout
    return parts[1]


def _inputs(seed=0, shape=(2, 24)):
    # Token ids the tokenizer knows, without touching the global seed.
    return mx.random.randint(0, 486, shape, key=mx.random.key(seed))


# 1. mlx_lm.convert: quantized and bfloat16 checkpoints load and agree.

CONVERSIONS = {
    "q4": ["-q", "--q-bits", "4"],
    "q8": ["-q", "--q-bits", "8"],
    "bf16": ["--dtype", "bfloat16"],
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")

    def convert(name):
        out = root / name
        args = ["--hf-path", str(TINY), "--mlx-path", str(out), *CONVERSIONS[name]]
        return name, out, _run(_command("convert") + args)

    # Two at a time: each is mostly interpreter and import start-up.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(convert, CONVERSIONS))
    for name, _, proc in results:
        assert proc.returncode == 0, f"convert {name} failed:\n{proc.stderr}"
    return {name: out for name, out, _ in results}


_LOADED = {}


def _load(name):
    # Not conftest's shared copy: other files may change what they load.
    if name not in _LOADED:
        import mlx_lm

        _LOADED[name] = mlx_lm.load(str(GOLDEN / name))
    return _LOADED[name]


@pytest.fixture(scope="module")
def float_logits():
    model, _ = _load("tiny-mha")
    x = _inputs()
    return x, model(x)


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_quantized_loads_and_agrees(converted, float_logits, bits):
    import mlx_lm

    path = converted[f"q{bits}"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llada"
    assert config["quantization"]["bits"] == bits

    model, tokenizer = mlx_lm.load(str(path))
    block = model.model.transformer.blocks[0]
    assert isinstance(block.q_proj, nn.QuantizedLinear) and block.q_proj.bits == bits
    assert isinstance(model.model.transformer.wte, nn.QuantizedEmbedding)
    assert isinstance(model.model.transformer.ff_out, nn.QuantizedLinear)

    x, ref = float_logits
    logits = model(x)
    assert logits.shape == ref.shape
    assert mx.all(mx.isfinite(logits)).item()
    err = mx.abs(logits - ref).max().item()
    agree = mx.mean(logits.argmax(-1) == ref.argmax(-1)).item()
    cos = (mx.sum(logits * ref) / mx.sqrt(mx.sum(logits**2) * mx.sum(ref**2))).item()
    if bits == 8:
        assert err < 0.3 and agree >= 0.9, (err, agree)
    else:
        assert err < 3.0 and agree >= 0.5 and cos > 0.9, (err, agree, cos)


def test_convert_bfloat16_loads_and_agrees(converted, float_logits):
    import mlx_lm

    model, _ = mlx_lm.load(str(converted["bf16"]))
    weight = model.model.transformer.blocks[0].q_proj.weight
    assert weight.dtype == mx.bfloat16
    x, ref = float_logits
    logits = model(x)
    assert logits.dtype == mx.bfloat16 and logits.shape == ref.shape
    logits = logits.astype(mx.float32)
    # bfloat16 keeps 8 bits of mantissa: errors of ~1% of the logits' range.
    assert mx.allclose(logits, ref, atol=0.15, rtol=0.02).item()
    assert mx.mean(logits.argmax(-1) == ref.argmax(-1)).item() >= 0.9


def test_converted_config_reloads(converted, float_logits, tmp_path):
    import mlx_lm
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_config

    from mlx_lm_llada.models.llada import ModelArgs

    for name, path in converted.items():
        config = load_config(path)
        args = ModelArgs.from_dict(config)
        assert args.d_model == 64 and args.n_heads == 4, name
        assert args.mask_token_id == SPECIAL["<|mdm_mask|>"], name
        # The special-token ids the tokenizer names are kept in the output.
        assert config["bos_token_id"] == SPECIAL["<|startoftext|>"], name
        assert config["eot_token_id"] == SPECIAL["<|eot_id|>"], name
        weights = mx.load(str(path / "model.safetensors"))
        assert all(k.startswith("model.transformer.") for k in weights), name

    # mlx-lm's own (already sanitized) output converts again.
    out = tmp_path / "bf16-q8"
    convert(str(converted["bf16"]), str(out), quantize=True, q_bits=8)
    model, _ = mlx_lm.load(str(out))
    x, ref = float_logits
    logits = model(x).astype(mx.float32)
    assert mx.mean(logits.argmax(-1) == ref.argmax(-1)).item() >= 0.85


def test_float_resave_is_exact(float_logits, tmp_path):
    import mlx_lm
    from mlx_lm.convert import convert

    out = tmp_path / "f32"
    convert(str(TINY), str(out), dtype="float32")
    model, _ = mlx_lm.load(str(out))
    x, ref = float_logits
    assert mx.array_equal(model(x), ref).item()


# 2. Attention is bidirectional.


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
def test_late_token_changes_early_logits(name):
    model, _ = _load(name)
    x = _inputs(seed=1, shape=(1, 16))
    changed = mx.concatenate([x[:, :-1], (x[:, -1:] + 7) % 486], axis=1)
    a, b = model(x), model(changed)
    diff = mx.abs(a - b).max(axis=-1)[0]
    # Every position before the changed one sees it.
    assert mx.all(diff[:-1] > 1e-4).item(), diff


def test_not_causal():
    model, _ = _load("tiny-mha")
    x = _inputs(seed=2, shape=(1, 12))
    full = model(x)
    for n in (1, 6):
        # A causal model gives the same logits for a prefix alone.
        prefix = model(x[:, :n])
        assert not mx.allclose(prefix, full[:, :n], atol=1e-3).item(), n
    # Sanity: the same input gives the same logits.
    assert mx.allclose(model(x), full, atol=1e-6).item()


# 3. Broken checkpoints: the error names the problem.


def _broken_copy(tmp_path, edit_config=None, edit_weights=None):
    path = tmp_path / "broken"
    shutil.copytree(TINY, path)
    if edit_config is not None:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if edit_weights is not None:
        weights = mx.load(str(path / "model.safetensors"))
        edit_weights(weights)
        mx.save_safetensors(
            str(path / "model.safetensors"), weights, metadata={"format": "pt"}
        )
    return path


def _load_error(path):
    import mlx_lm

    with pytest.raises(ValueError) as info:
        mlx_lm.load(str(path))
    return str(info.value)


@pytest.mark.parametrize(
    "key", ["d_model", "n_heads", "n_layers", "vocab_size", "mask_token_id"]
)
def test_config_missing_key(tmp_path, key):
    path = _broken_copy(tmp_path, edit_config=lambda c: c.pop(key))
    message = _load_error(path)
    assert "missing" in message and key in message, message


def test_checkpoint_missing_tensor(tmp_path):
    name = "model.transformer.blocks.1.k_proj.weight"
    path = _broken_copy(tmp_path, edit_weights=lambda w: w.pop(name))
    message = _load_error(path)
    assert "Missing" in message and name in message, message


def test_checkpoint_missing_head(tmp_path):
    name = "model.transformer.ff_out.weight"
    path = _broken_copy(tmp_path, edit_weights=lambda w: w.pop(name))
    message = _load_error(path)
    assert name in message, message


def test_checkpoint_wrong_shape(tmp_path):
    name = "model.transformer.blocks.0.up_proj.weight"

    def edit(weights):
        weights[name] = mx.zeros((150, 64))

    message = _load_error(_broken_copy(tmp_path, edit_weights=edit))
    assert name in message and "(150, 64)" in message and "(160, 64)" in message


def test_checkpoint_unknown_tensor(tmp_path):
    name = "model.transformer.blocks.0.foo.weight"

    def edit(weights):
        weights[name] = mx.zeros((3,))

    message = _load_error(_broken_copy(tmp_path, edit_weights=edit))
    assert name in message, message


def test_heads_do_not_divide_d_model(tmp_path):
    def edit(config):
        config["n_heads"] = config["n_kv_heads"] = 5

    message = _load_error(_broken_copy(tmp_path, edit_config=edit))
    assert "d_model" in message and "n_heads" in message, message
    assert "64" in message and "5" in message, message


def test_kv_heads_do_not_divide_heads(tmp_path):
    message = _load_error(
        _broken_copy(tmp_path, edit_config=lambda c: c.update(n_kv_heads=3))
    )
    assert "n_heads" in message and "n_kv_heads" in message, message


# 4. Loading never runs the code a checkpoint ships (config.json's auto_map).

REMOTE_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("ran")
"""


@pytest.fixture
def remote_code_checkpoint(tmp_path):
    path = tmp_path / "remote-code"
    shutil.copytree(TINY, path)
    config = json.loads((path / "config.json").read_text())
    assert "configuration_llada.LLaDAConfig" in config["auto_map"].values()
    markers = []
    for module in ("configuration_llada", "modeling_llada"):
        marker = tmp_path / f"{module}.ran"
        (path / f"{module}.py").write_text(REMOTE_CODE.format(marker=str(marker)))
        markers.append(marker)
    return path, markers


def test_load_in_process_runs_no_remote_code(remote_code_checkpoint, capfd):
    import mlx_lm

    path, markers = remote_code_checkpoint
    model, tokenizer = mlx_lm.load(str(path))
    assert tokenizer.bos_token == "<|startoftext|>"
    out, err = capfd.readouterr()
    assert "custom code" not in out + err
    assert not any(m.exists() for m in markers)
    assert not any(
        name.rpartition(".")[2] in ("configuration_llada", "modeling_llada")
        for name in sys.modules
    )


def test_generate_command_runs_no_remote_code(remote_code_checkpoint, tmp_path):
    path, markers = remote_code_checkpoint
    args = ["--model", str(path), "--prompt", "hi", "--max-tokens", "4"]
    env = _env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = _run(_command("generate") + args, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "custom code" not in proc.stdout + proc.stderr
    assert _generated_text(proc.stdout)
    assert not any(m.exists() for m in markers)


def test_load_on_a_terminal_does_not_ask(remote_code_checkpoint, tmp_path):
    # mlx-lm's commands pass trust_remote_code=False; mlx_lm.load passes
    # nothing, so on a terminal transformers would ask and wait for an answer.
    pexpect = pytest.importorskip("pexpect")
    path, markers = remote_code_checkpoint
    code = f"import mlx_lm; mlx_lm.load({str(path)!r}); print('loaded')"
    env = _env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    child = pexpect.spawn(
        sys.executable,
        ["-c", code],
        env=env,
        cwd=str(GOLDEN),
        timeout=60,
        encoding="utf-8",
    )
    index = child.expect(["custom code", pexpect.EOF])
    output = child.before
    child.close(force=True)
    assert index == 1, f"asked about remote code:\n{output}"
    assert child.exitstatus == 0, output
    assert "loaded" in output
    assert not any(m.exists() for m in markers)


# 5. The tokenizer.


def test_tokenizer_special_tokens_and_chat_template():
    _, tokenizer = _load("tiny-mha")
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.bos_token_id == SPECIAL["<|startoftext|>"]
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == SPECIAL["<|endoftext|>"]
    assert {SPECIAL["<|endoftext|>"], SPECIAL["<|eot_id|>"]} <= set(
        tokenizer.eos_token_ids
    )
    assert tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == SPECIAL["<|mdm_mask|>"]

    template = json.loads((TINY / "tokenizer_config.json").read_text())
    assert "<|start_header_id|>" in template["chat_template"]
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
        "hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = getattr(ids, "input_ids", ids)
    assert ids[0] == SPECIAL["<|startoftext|>"] and ids.count(ids[0]) == 1
    assert SPECIAL["<|eot_id|>"] in ids


# 6. Other models are untouched; the hook is what registers LLaDA.


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from dataclasses import asdict

    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    path = tmp_path_factory.mktemp("tiny-llama")
    save_model(path, model)
    config = {k: v for k, v in asdict(args).items() if v is not None}
    save_config(config, path / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, path / name)
    return path


def test_autoregressive_model_unchanged_by_hook(tiny_llama):
    args = ["--model", str(tiny_llama), "--prompt", "hi", "--max-tokens", "16"]
    texts = []
    for disable in (False, True):
        proc = _run(_command("generate") + args, env=_env(disable=disable))
        assert proc.returncode == 0, proc.stderr
        texts.append(_generated_text(proc.stdout))
    assert texts[0] == texts[1]
    assert texts[0].strip()


DISABLED_CHECK = """\
import importlib, json, sys
import mlx_lm, mlx_lm.generate
generate = sys.modules["mlx_lm.generate"]  # mlx_lm.generate is the function
out = {"finder": any(type(f).__name__ == "MlxLmFinder" for f in sys.meta_path),
       "patched": hasattr(generate, "_mlx_lm_llada_patched")}
try:
    importlib.import_module("mlx_lm.models.llada")
    out["module"] = True
except ImportError:
    out["module"] = False
try:
    mlx_lm.load(sys.argv[1])
    out["load"] = "ok"
except Exception as e:
    out["load"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.parametrize("disable", [True, False])
def test_disable_unregisters_llada(disable):
    proc = _run(
        [sys.executable, "-c", DISABLED_CHECK, str(TINY)], env=_env(disable=disable)
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if disable:
        assert out == {
            "finder": False,
            "patched": False,
            "module": False,
            "load": "Model type llada not supported.",
        }
    else:
        assert out == {"finder": True, "patched": True, "module": True, "load": "ok"}


# 7. Start-up cost, and a broken hook never breaks start-up.

STARTUP_CHECK = """\
import json, sys
print(json.dumps({
    "heavy": sorted(m for m in ("mlx", "mlx_lm", "transformers", "numpy")
                    if m in sys.modules),
    "finders": [type(f).__module__ + "." + type(f).__name__ for f in sys.meta_path],
}))
"""
FINDER = "mlx_lm_llada.registration_hook.MlxLmFinder"


def test_startup_imports_nothing_heavy():
    proc = _python(STARTUP_CHECK)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["heavy"] == []
    assert out["finders"].count(FINDER) == 1


def test_startup_disabled_installs_no_finder():
    proc = _python(STARTUP_CHECK, env=_env(disable=True))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert FINDER not in out["finders"] and out["heavy"] == []


@pytest.mark.parametrize(
    "files",
    [
        {"__init__.py": "raise RuntimeError('broken package')\n"},
        {"__init__.py": "", "registration_hook.py": "def install(:\n"},
        {"__init__.py": "", "registration_hook.py": "import no_such_dependency\n"},
    ],
    ids=["package-raises", "syntax-error", "missing-dependency"],
)
def test_broken_hook_does_not_break_startup(tmp_path, files):
    # A broken copy of the package ahead on sys.path is what the .pth imports.
    package = tmp_path / "shadow" / "mlx_lm_llada"
    package.mkdir(parents=True)
    for name, text in files.items():
        (package / name).write_text(text)
    env = _env(PYTHONPATH=str(package.parent))
    proc = _python(STARTUP_CHECK, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert not any("MlxLmFinder" in f for f in json.loads(proc.stdout)["finders"])


def test_leftover_pth_without_package_is_silent(tmp_path):
    # The .pth left behind without its package (-I -S: no site-packages).
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    shutil.copy(REPO / "mlx_lm_llada.pth", site_dir)
    code = f"import site; site.addsitedir({str(site_dir)!r}); print('ok')"
    proc = _python(code, flags=("-I", "-S"), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert proc.stderr == ""


# 8. Packaging: the wheel carries the .pth at its root.


def _build_wheel(out):
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    proc = _run(args + [str(REPO)], timeout=300)
    if proc.returncode == 0:
        return
    log = proc.stdout + proc.stderr
    try:
        import hatchling  # noqa: F401
    except ImportError:
        if "hatchling" in log:
            pytest.skip(f"cannot obtain the build backend (hatchling):\n{log[-800:]}")
        raise AssertionError(log)
    proc = _run(args + ["--no-build-isolation", str(REPO)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wheel_contents_and_pth(tmp_path):
    _build_wheel(tmp_path / "dist")
    (wheel,) = (tmp_path / "dist").glob("mlx_lm_llada-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "mlx_lm_llada.pth" in names
        pth = zf.read("mlx_lm_llada.pth").decode()
        assert pth == (REPO / "mlx_lm_llada.pth").read_text()
        sources = {
            p.relative_to(REPO).as_posix()
            for p in (REPO / "mlx_lm_llada").rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert "mlx_lm_llada/models/llada.py" in sources
        assert sources <= names, sources - names
        dist_info = next(n for n in names if n.endswith(".dist-info/RECORD"))
        entry_points = zf.read(dist_info.replace("RECORD", "entry_points.txt"))
        assert b"mlx_lm_llada.generate" in entry_points
        zf.extractall(tmp_path / "site")

    # Unpacked into a site directory, the .pth installs the finder from there.
    code = (
        f"import site, sys; site.addsitedir({str(tmp_path / 'site')!r}); "
        "import mlx_lm_llada.registration_hook as h; "
        "print(h.__file__); "
        "print(sum(isinstance(f, h.MlxLmFinder) for f in sys.meta_path))"
    )
    proc = _python(code, flags=("-I", "-S"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    hook_file, count = proc.stdout.split()
    assert Path(hook_file).is_relative_to(tmp_path / "site")
    assert count == "1"
