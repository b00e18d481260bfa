import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
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


def forward_error(case, family, relative=0.0):
    """The largest difference between a model's logits and a golden forward
    case's, less ``relative`` times the reference's magnitude, at the tokens
    of each row (a padded row's pad positions are not compared: the
    reference's outputs there depend on its torch version). A case with a
    ``block_length`` runs the model block-causally in blocks of it."""
    import mlx.core as mx
    import numpy as np

    model, _ = load_golden(case["model"], family)
    mask = case.get("attention_mask")
    blocks = {"block_length": case["block_length"]} if "block_length" in case else {}
    logits = model(
        mx.array(case["input_ids"]),
        attention_mask=None if mask is None else mx.array(mask),
        **blocks,
    )
    expected = np.load(golden_dir(family) / case["logits"])
    assert logits.dtype == mx.float32 and logits.shape == expected.shape
    rows = np.ones(expected.shape[:2], bool) if mask is None else np.array(mask, bool)
    error = np.abs(np.array(logits) - expected) - relative * np.abs(expected)
    return error[rows].max()


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


# Commands as subprocesses -------------------------------------------------

SETTINGS_PREFIX = "MLX_LM_LLADA_"
BIN = Path(sys.executable).parent


def command_line(name):
    """The argv start of ``name`` (``mlx_lm.generate``, ``mlx_lm_llada.chat``):
    this environment's console script, else the module through ``python -m``."""
    if (BIN / name).exists():
        return [str(BIN / name)]
    package, _, sub = name.partition(".")
    module = [package, sub] if package == "mlx_lm" else [name]
    return [sys.executable, "-m", *module]


def command_env(settings=None, **variables):
    """This process's environment for a command: offline, UTF-8, with
    ``variables``, and no diffusion settings (``MLX_LM_LLADA_*``; DISABLE is
    kept) but ``settings``: ``{"steps": 8}`` sets ``MLX_LM_LLADA_STEPS=8``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(SETTINGS_PREFIX) or k == SETTINGS_PREFIX + "DISABLE"
    }
    env.update(HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    env.update(TOKENIZERS_PARALLELISM="false", COLUMNS="100")
    env.update(variables)
    for name, value in (settings or {}).items():
        env[SETTINGS_PREFIX + name.upper()] = str(value)
    return env


def run_command(name, *args, settings=None, env=None, stdin=None, timeout=120):
    """Run a command to its end, with ``command_env(settings)`` unless ``env``
    is given. ``stdin`` is typed into it; without it stdin is closed, so a
    question on the terminal fails instead of waiting."""
    return subprocess.run(
        command_line(name) + [str(a) for a in args],
        env=command_env(settings) if env is None else env,
        timeout=timeout,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
    )


def generated_text(stdout):
    """What ``mlx_lm.generate`` prints between its two rules, less the final
    newline: the streamed text of the responses."""
    pieces = stdout.split("==========\n")
    assert len(pieces) >= 3 and pieces[1].endswith("\n"), stdout
    return pieces[1][:-1]


class ChatTerminal:
    """``mlx_lm.chat`` (or ours) in a pseudo-terminal, typed into as a person
    would; at its first prompt once constructed."""

    PROMPT = "\u203a"  # mlx_lm.chat's input line
    # The statistics line after an answer (not --visualize's canvas line).
    END_OF_TURN = r"(\d+) tokens · [\d.]+ tok/s · prompt "

    def __init__(self, name, *args, settings=None, timeout=90):
        import pexpect

        command = command_line(name)
        self.child = pexpect.spawn(
            command[0],
            command[1:] + [str(a) for a in args],
            env=command_env(settings, TERM="xterm", LINES="40"),
            encoding="utf-8",
            codec_errors="replace",
            timeout=timeout,
            dimensions=(40, 100),
        )
        self.child.expect(self.PROMPT)

    def say(self, text):
        """Type one turn. Returns what the terminal showed until the
        statistics line (plain newlines) and the token count it gives."""
        self.child.sendline(text)
        self.child.expect(self.END_OF_TURN)
        shown, count = self.child.before, int(self.child.match.group(1))
        self.child.expect(self.PROMPT)
        return shown.replace("\r\n", "\n"), count

    def reset(self):
        """Type ``r``: a new conversation."""
        self.child.sendline("r")
        self.child.expect("context cleared")
        self.child.expect(self.PROMPT)

    def quit(self):
        """Type ``q``; the exit status once the command has ended."""
        import pexpect

        self.child.sendline("q")
        self.child.expect("bye")
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


class Served:
    """A running ``mlx_lm.server``: its base URL, process and log file."""

    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, Path(log)

    def healthy(self):
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False


def reserve_port(sock):
    """Bind ``sock`` to a free port of 127.0.0.1 and return the port.

    While ``sock`` stays open (bound, not listening, ``SO_REUSEADDR``), a
    server (``http.server`` binds with ``SO_REUSEADDR``) can take the port,
    but no other process asking for a free port is given it: two
    pytest-xdist workers starting servers at once never share one."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@contextlib.contextmanager
def serving(model, log, settings=None, timeout=90):
    """``mlx_lm.server --model MODEL`` on a free port of 127.0.0.1, with
    ``command_env(settings)``, from its first healthy answer to the block's
    end. ``log`` gets its output."""
    with socket.socket() as reservation:  # held until the server listens
        port = reserve_port(reservation)
        args = ["--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command_line("mlx_lm.server") + args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=command_env(settings),
            )
        served = Served(proc, f"http://127.0.0.1:{port}", log)
        try:
            deadline = time.monotonic() + timeout
            while not served.healthy():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = served.log.read_text(errors="replace")[-4000:]
                    raise AssertionError(f"mlx_lm.server did not start:\n{tail}")
                time.sleep(0.2)
        except BaseException:
            _stop(proc)
            raise
    try:
        yield served
    finally:
        _stop(proc)


def _stop(proc):
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
