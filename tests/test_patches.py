"""The upstream patch series in patches/: current, and what a reviewer checks.

The reviewer's check unpacks the mlx-lm 0.32.2 sdist, applies the series with
``git apply``, and runs, with our import hook off (MLX_LM_LLADA_DISABLE=1):
upstream's own tests on the patched and the pristine tree, and this
project's golden tests on the patched mlx-lm alone.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "patches"
SERIES = sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))

# Upstream's tests that run on CPU without a download, and the series' own.
UPSTREAM_TESTS = ["tests/test_models.py", "tests/test_sample_utils.py"]
NEW_TESTS = ["tests/test_diffusion.py", "tests/test_generate.py::TestOwnGenerationLoop"]
NEW_IDS = re.compile(
    r"test_diffusion\.|TestOwnGenerationLoop::"
    r"|::test_llada$|::test_dream$|::test_llada_moe$|::test_llada2_moe$"
    r"|::test_diffusion_gemma$"
)
# Skipped without Metal: the token cache evaluates the call, and MLX's CPU
# backend has no float16 gather_mm (the experts of model_test_runner's
# float16 pass).
METAL_ONLY = re.compile(r"::test_llada_moe$|::test_llada2_moe$")
UNREACHABLE = re.compile(
    r"connection|resolution|max retries|timed out|unreachable|proxy"
    r"|no matching distribution",
    re.I,
)


def _load_make_series():
    spec = importlib.util.spec_from_file_location(
        "make_series", PATCHES / "make_series.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_series = _load_make_series()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    try:
        return make_series.fetch_sdist(tmp_path_factory.mktemp("sdist"))
    except make_series.DownloadError as e:
        if UNREACHABLE.search(str(e)):
            pytest.skip(f"PyPI is unreachable: {e}")
        raise


def _copy(tree, dest):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(tree, dest, ignore=ignore)
    return dest


def _env(tree, **extra):
    # Our hook off, mlx_lm from the tree, none of our settings variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_LM_LLADA_")}
    env.update(
        PYTHONPATH=str(tree),
        MLX_LM_LLADA_DISABLE="1",
        HF_HUB_OFFLINE="1",
        PYTHONDONTWRITEBYTECODE="1",
        **extra,
    )
    return env


# pytest, as ``python -m pytest`` runs it, in a process that first says where
# its mlx_lm comes from and whether our import hook is installed (the
# WHERE line): the check is made in the very process that runs the tests.
# ``-o addopts=``: none of this project's pytest options (its -n) apply.
WHERE = (
    "import sys, mlx_lm, mlx_lm.generate;"
    "print('WHERE', mlx_lm.__file__,"
    " any(type(f).__name__ == 'MlxLmFinder' for f in sys.meta_path), flush=True);"
)
RUN_PYTEST = WHERE + "import pytest; sys.exit(pytest.main(sys.argv[1:]))"


def _pytest(tree, cwd, tests, junit, **env):
    command = [sys.executable, "-c", RUN_PYTEST, "-q", "-p", "no:cacheprovider"]
    return subprocess.Popen(
        [*command, "-o", "addopts=", f"--junitxml={junit}", *tests],
        cwd=cwd,
        env=_env(tree, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _outcomes(junit):
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                status = tag
        outcomes[name] = status
    return outcomes


def _where_is_mlx_lm(output):
    """The WHERE line of a run: mlx_lm's file, and whether the hook is on."""
    where = re.search(r"^WHERE (.*) (True|False)$", output, re.M)
    assert where, output[-3000:]
    return Path(where.group(1)), where.group(2) == "True"


# The golden chat case through the patched mlx-lm's own stream_generate: the
# model's loop, its token cache across turns, and the tokenizer facts
# (CONFIG_TOKENS, TOKENIZER_DEFAULTS["eos_tokens"]) it needs.
CHAT_PROBE = """
import json
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

golden = "tests/fixtures/golden/llada"
with open(f"{golden}/cases.json") as f:
    cases = json.load(f)
ids = cases["special_token_ids"]
case = [c for c in cases["cases"] if c["kind"] == "chat"][0]
params = case["params"]
# As mlx-lm's commands load it (no question about the checkpoint's code).
model, tokenizer = mlx_lm.load(
    f"{golden}/{case['model']}", tokenizer_config={"trust_remote_code": False}
)
facts = [model.args.bos_token_id, model.args.eot_token_id]
facts += [sorted(tokenizer.eos_token_ids)]
expected = [ids["<|startoftext|>"], ids["<|eot_id|>"]]
expected += [sorted([ids["<|endoftext|>"], ids["<|eot_id|>"]])]
cache = make_prompt_cache(model)
turns = []
for turn in case["turns"]:
    messages = [{"role": "user", "content": turn["user"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    responses = mlx_lm.stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=params["gen_length"],
        sampler=make_sampler(0.0),
        prompt_cache=cache,
        steps=params["steps"],
        block_length=params["block_length"],
        reference=True,
    )
    tokens = [r.token for r in responses]
    turns.append(tokens == turn["output_ids"][0][len(turn["context_ids"][0]) :])
print("\\nRESULT", json.dumps({"facts": facts == expected, "turns": turns}))
"""

# Dream through the patched mlx-lm's own load and stream_generate: its
# model_type "Dream" (MODEL_REMAPPING), <|im_end|> from its tokenizer
# (CONFIG_TOKENS, TOKENIZER_DEFAULTS), and the stream equal to Dream's own
# diffusion_generate (reference=True) and to Fast-dLLM's dual-cache loop (the
# defaults), up to the first end token.
DREAM_PROBE = """
import json
import mlx.core as mx
import mlx_lm
from mlx_lm.diffusion import diffusion_generate

golden = "tests/fixtures/golden/dream"
with open(f"{golden}/cases.json") as f:
    ids = json.load(f)["special_token_ids"]
model, tokenizer = mlx_lm.load(
    f"{golden}/tiny-eos", tokenizer_config={"trust_remote_code": False}
)
ends = sorted([ids["<|endoftext|>"], ids["<|im_end|>"]])
facts = [type(model).__module__, model.args.eot_token_id]
facts += [sorted(tokenizer.eos_token_ids)]
expected = ["mlx_lm.models.dream", ids["<|im_end|>"], ends]
prompt = tokenizer.encode("one two three")
fast = dict(alg="confidence_threshold", threshold=0.9, block_length=32)
runs = []
for settings, params in (
    (dict(max_tokens=24, reference=True), dict(max_new_tokens=24, steps=24)),
    (dict(max_tokens=64), dict(max_new_tokens=64, steps=64, dual_cache=True, **fast)),
):
    params.setdefault("alg", "maskgit_plus")
    stream = mlx_lm.stream_generate(model, tokenizer, prompt, **settings)
    tokens = [r.token for r in stream]
    canvas, _ = diffusion_generate(model, mx.array([prompt]), **params)
    new = canvas[0, len(prompt) :].tolist()
    end = next((i + 1 for i, t in enumerate(new) if t in ends), len(new))
    runs.append(tokens == new[:end])
print("\\nRESULT", json.dumps({"facts": facts == expected, "runs": runs}))
"""

# LLaDA-MoE and LLaDA 2 through the patched mlx-lm's own load: the module by
# architecture (LLaDA-MoE's model_type is "llada") and by model_type
# (llada2_moe), the mask and end-of-turn ids from the tokenizer
# (CONFIG_TOKENS) and <|role_end|> as EOS (TOKENIZER_DEFAULTS); LLaDA 2's
# stream (the exact cache of finished blocks) equal to its generate() with
# LLaDA 2.0's arguments and with LLaDA 2.1's editing, up to the first end.
MOE_PROBE = """
import json
import mlx.core as mx
import mlx_lm
from mlx_lm.diffusion import diffusion_generate

results = {}
for family, name, module in (
    ("lladamoe", "lladamoe-tiny", "mlx_lm.models.llada_moe"),
    ("llada2", "llada2-tiny", "mlx_lm.models.llada2_moe"),
):
    golden = f"tests/fixtures/golden/{family}"
    with open(f"{golden}/cases.json") as f:
        ids = json.load(f)["special_token_ids"]
    model, tokenizer = mlx_lm.load(
        f"{golden}/{name}", tokenizer_config={"trust_remote_code": False}
    )
    spec = model.diffusion
    facts = [type(model).__module__, spec.mask_token_id, spec.eot_token_id]
    facts += [ids["<|role_end|>"] in tokenizer.eos_token_ids]
    expected = [module, ids["<|mask|>"], ids["<|role_end|>"], True]
    runs = []
    if family == "llada2":
        ends = [ids["<|endoftext|>"], ids["<|role_end|>"]]
        messages = [{"role": "user", "content": "hello"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        editing = dict(threshold=0.8, editing_threshold=0.5, num_to_transfer=2)
        for settings, params in (
            ({}, dict(block_length=32, steps=32, threshold=0.95)),
            (editing, dict(block_length=32, **editing)),
        ):
            stream = mlx_lm.stream_generate(
                model, tokenizer, prompt, max_tokens=16, **settings
            )
            tokens = [r.token for r in stream]
            canvas, _ = diffusion_generate(
                model, mx.array([prompt]), gen_length=16, **params
            )
            new = canvas[0, len(prompt) :].tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in ends), len(new))
            runs.append(tokens == new[:end])
    results[family] = {"facts": facts == expected, "got": facts, "runs": runs}
print("\\nRESULT", json.dumps(results))
"""


# DiffusionGemma through the patched mlx-lm's own load: its nested config
# (text_config), model_type "diffusion_gemma" (the module's file name), the
# uniform-noise spec, <turn|> as EOS; the reference call with the golden
# README's deterministic noise and an argmax sampler gives a golden
# ``generate`` case (two canvases: the encoder's append) token for token,
# with as many decoder calls.
DGEMMA_PROBE = """
import json
import mlx.core as mx
import numpy as np
import mlx_lm
from mlx_lm.diffusion import diffusion_generate

golden = "tests/fixtures/golden/dgemma"
with open(f"{golden}/cases.json") as f:
    cases = json.load(f)
ids, V = cases["special_token_ids"], cases["vocab_size"]
model, tokenizer = mlx_lm.load(
    f"{golden}/tiny-a", tokenizer_config={"trust_remote_code": False}
)
spec = model.diffusion
facts = [type(model).__module__, spec.noise, spec.mask_token_id]
facts += [spec.defaults["block_length"], spec.vocab_size]
facts += [ids["<turn|>"] in tokenizer.eos_token_ids]
expected = ["mlx_lm.models.diffusion_gemma", "uniform", None, 8, V, True]


def noise(k, shape):
    # The golden README's deterministic noise.
    b, j = np.arange(shape[0])[:, None], np.arange(shape[1])[None]
    return mx.array((1000003 * k + 7919 * b + 104729 * j + 12345) % V)


two = ("generate", "tiny-a", "two_canvases")
case = next(c for c in cases["cases"] if (c["kind"], c["model"], c.get("label")) == two)
tokens, nfe = diffusion_generate(
    model,
    mx.array(case["prompt_ids"]),
    noise=noise,
    sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
    **case["params"],
)
runs = [tokens.tolist() == case["output_ids"], nfe == case["decoder_calls"]]
result = {"facts": facts == expected, "got": facts, "runs": runs}
print("\\nRESULT", json.dumps(result))
"""


@pytest.fixture(scope="module")
def reviewer_runs(pristine, tmp_path_factory):
    """The three runs of the reviewer's check, side by side."""
    work = tmp_path_factory.mktemp("reviewer")
    patched = _copy(pristine, work / "patched")
    unpatched = _copy(pristine, work / "unpatched")
    for patch in SERIES:
        subprocess.run(
            ["git", "apply", str(patch)],
            cwd=patched,
            env={**os.environ, "GIT_CEILING_DIRECTORIES": str(work)},
            check=True,
        )
    runs = {
        "patched": _pytest(
            patched, patched, UPSTREAM_TESTS + NEW_TESTS, work / "patched.xml"
        ),
        "unpatched": _pytest(
            unpatched, unpatched, UPSTREAM_TESTS, work / "unpatched.xml"
        ),
        "golden": _pytest(
            patched,
            ROOT,
            ["tests/test_golden_parity.py", "tests/test_golden_dream.py"],
            work / "golden.xml",
            MLX_LM_LLADA_UPSTREAM_TREE="1",
        ),
    }
    results = {
        name: subprocess.run(
            [sys.executable, "-c", WHERE + probe],
            cwd=ROOT,
            env=_env(patched),
            capture_output=True,
            text=True,
        )
        for name, probe in (
            ("chat", CHAT_PROBE),
            ("dream", DREAM_PROBE),
            ("moe", MOE_PROBE),
            ("dgemma", DGEMMA_PROBE),
        )
    }
    trees = {"patched": patched, "unpatched": unpatched, "golden": patched}
    for name, process in runs.items():
        output, _ = process.communicate(timeout=1200)
        # mlx_lm from the tree (cwd: the tree, or this project), hook off.
        origin, hooked = _where_is_mlx_lm(output)
        assert origin == trees[name] / "mlx_lm" / "__init__.py" and not hooked
        junit = work / f"{name}.xml"
        if not junit.exists():
            pytest.fail(f"the {name} run wrote no report:\n{output[-3000:]}")
        results[name] = (_outcomes(junit), output)
    for name in ("chat", "dream"):
        probe = results[name]
        origin, hooked = _where_is_mlx_lm(probe.stdout + probe.stderr)
        assert origin == patched / "mlx_lm" / "__init__.py" and not hooked
    return results


def _make_series(pristine, *args):
    return subprocess.run(
        [
            *(sys.executable, str(PATCHES / "make_series.py")),
            *("--mlx-lm-src", str(pristine), *map(str, args)),
        ],
        capture_output=True,
        text=True,
    )


def _missing_tool():
    """Why upstream's formatters cannot run here (None: they can)."""
    import importlib.metadata as md

    for tool, version in make_series.TOOLS.items():
        try:
            found = md.version(tool)
        except md.PackageNotFoundError:
            found = None
        if found != version:
            return f"needs {tool}=={version} (found {found}), as upstream"
    return None


@pytest.fixture(scope="module")
def written_series(pristine, tmp_path_factory):
    """``make_series.py --out DIR``, with ``--lint`` where upstream's
    formatters are installed (one build for both tests below): the run,
    DIR, and whether it linted."""
    out = tmp_path_factory.mktemp("series")
    linted = _missing_tool() is None
    run = _make_series(pristine, "--out", out, *(["--lint"] if linted else []))
    return run, out, linted


def test_series_is_what_make_series_writes(pristine, written_series, tmp_path):
    run, out, linted = written_series
    if run.returncode and linted:
        # A lint finding (test_series_passes_upstream_formatting reports it)
        # writes nothing: the series as written without --lint.
        out = tmp_path / "series"
        run = _make_series(pristine, "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    written = sorted(out.glob("*.patch"))
    assert [p.name for p in written] == [p.name for p in SERIES]
    for new, committed in zip(written, SERIES):
        assert (
            new.read_text() == committed.read_text()
        ), f"{committed.name} is out of date: run python patches/make_series.py"
    check = _make_series(pristine, "--check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_series_passes_upstream_formatting(written_series):
    missing = _missing_tool()
    if missing:
        pytest.skip(missing)
    lint, _, linted = written_series
    assert linted
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_upstream_tests_pass_as_before(reviewer_runs):
    patched, output = reviewer_runs["patched"]
    unpatched, _ = reviewer_runs["unpatched"]
    upstream = {k: v for k, v in patched.items() if not NEW_IDS.search(k)}
    assert set(upstream) == set(unpatched)
    changed = {k: (unpatched[k], v) for k, v in upstream.items() if unpatched[k] != v}
    assert not changed, output[-3000:]
    assert list(unpatched.values()).count("passed") > 100


def test_new_tests_pass(reviewer_runs):
    patched, output = reviewer_runs["patched"]
    new = {k: v for k, v in patched.items() if NEW_IDS.search(k)}
    assert len(new) >= 34
    if not _metal_available():
        new = {k: v for k, v in new.items() if not METAL_ONLY.search(k)}
    assert set(new.values()) == {"passed"}, output[-3000:]


def _metal_available():
    import mlx.core as mx

    return mx.metal.is_available()


def test_golden_cases_on_the_patched_mlx_lm_alone(reviewer_runs):
    import test_golden_dream as dream
    import test_golden_parity as llada

    golden, output = reviewer_runs["golden"]
    assert set(golden.values()) == {"passed"}, output[-3000:]
    passed = {}
    for name, status in golden.items():
        module = name.split("::")[0].rsplit(".", 1)[-1]
        passed[module] = passed.get(module, 0) + (status == "passed")
    assert passed == {
        "test_golden_parity": len(llada.FORWARD + llada.SAMPLER + llada.FASTDLLM),
        # and test_sampler_cases_cover_the_reference
        "test_golden_dream": len(
            dream.FORWARD + dream.SAMPLER + dream.FASTDLLM + dream.CHAT
        )
        + 1,
    }


def test_golden_chat_on_the_patched_mlx_lm_alone(reviewer_runs):
    probe = reviewer_runs["chat"]
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = re.search(r"^RESULT (.*)$", probe.stdout, re.M)
    assert result, probe.stdout[-3000:] + probe.stderr[-3000:]
    result = json.loads(result.group(1))
    assert result["facts"], "special-token ids from CONFIG_TOKENS and eos_tokens"
    assert result["turns"] and all(result["turns"]), result


def test_dream_on_the_patched_mlx_lm_alone(reviewer_runs):
    probe = reviewer_runs["dream"]
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = re.search(r"^RESULT (.*)$", probe.stdout, re.M)
    assert result, probe.stdout[-3000:] + probe.stderr[-3000:]
    result = json.loads(result.group(1))
    assert result["facts"], "the module, and <|im_end|> from CONFIG_TOKENS"
    assert result["runs"] == [True, True], result


def test_moe_models_on_the_patched_mlx_lm_alone(reviewer_runs):
    probe = reviewer_runs["moe"]
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = re.search(r"^RESULT (.*)$", probe.stdout, re.M)
    assert result, probe.stdout[-3000:] + probe.stderr[-3000:]
    result = json.loads(result.group(1))
    for family in ("lladamoe", "llada2"):
        assert result[family]["facts"], result
    assert result["llada2"]["runs"] == [True, True], result


def test_diffusion_gemma_on_the_patched_mlx_lm_alone(reviewer_runs):
    probe = reviewer_runs["dgemma"]
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = re.search(r"^RESULT (.*)$", probe.stdout, re.M)
    assert result, probe.stdout[-3000:] + probe.stderr[-3000:]
    result = json.loads(result.group(1))
    assert result["facts"], result
    assert result["runs"] == [True, True], result
