import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden" / "llada"


def golden_dir(family="llada"):
    return FIXTURES / "golden" / family


def golden_cases(kind_prefix=None, family="llada"):
    with open(golden_dir(family) / "cases.json") as f:
        cases = json.load(f)["cases"]
    if kind_prefix is None:
        return cases
    return [c for c in cases if c["kind"].startswith(kind_prefix)]


def case_id(case):
    params = case.get("params") or {}
    tag = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if v is not None)
    return f"{case['kind']}-{case['model']}-{tag}"


@pytest.fixture(scope="session")
def golden_special_ids():
    with open(GOLDEN / "cases.json") as f:
        return json.load(f)["special_token_ids"]


_MODELS = {}


def load_golden(name, family="llada"):
    """mlx_lm.load of a golden checkpoint, once per test session."""
    if (family, name) not in _MODELS:
        import mlx_lm

        _MODELS[family, name] = mlx_lm.load(str(golden_dir(family) / name))
    return _MODELS[family, name]


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch):
    # Settings from the environment or a command line must not leak in.
    from mlx_lm_llada.plugin_settings import set_command_settings

    for name in list(os.environ):
        if name.startswith("MLX_LM_LLADA_") and name != "MLX_LM_LLADA_DISABLE":
            monkeypatch.delenv(name)
    set_command_settings()
    yield
    set_command_settings()
