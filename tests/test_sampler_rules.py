"""The sampler's decision rules, each pinned on its own.

Each test here was written against a small, plausible bug that the rest of
the suite let through (a mutation audit): Fast-dLLM's factor rule off by
one, EoT left out of ``confidence_eos_eot_inf``, early stop padding with the
wrong token, ``remasking="random"`` ordering by confidence, the prompt
progress report ``(P, P)`` never made, and a loop that never ends. The
expected values are computed here, independently of the sampler's code.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_golden
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from mlx_lm_llada import diffusion_generate
from mlx_lm_llada.diffusion import stream_diffusion
from mlx_lm_llada.diffusion.commit_rules import select

BOS, EOS, MASK, EOT = 480, 481, 482, 485  # cases.json special_token_ids
END = (EOS, EOT)


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )


def proposals(st, row=0):
    """Greedy proposals and their confidences, from a Step's log-probs.

    The mask token is never a candidate; the confidence of a proposal is its
    probability (plain ``low_confidence`` remasking).
    """
    lp = np.array(st.logprobs[row], dtype=np.float64)
    lp[:, MASK] = -np.inf
    tokens = lp.argmax(axis=-1)
    return tokens, np.exp(lp[np.arange(len(tokens)), tokens])


# 1. Fast-dLLM's factor rule.


def factor_count(conf, factor):
    """How many to commit: the largest n with (n + 1)(1 - c_n) < factor, c_n
    the n-th highest confidence (1-based, so c_1 is the top one); at least 1.

    (Fast-dLLM's paper, and this project's rule; in 0-based terms c[i]
    qualifies when (i + 2)(1 - c[i]) < factor.) Every n is tried, not just a
    prefix. Fast-dLLM's code departs from the paper in two corners: a tie
    with the factor, and a first failure at the last candidate (it then
    commits them all). The hand-computed cases avoid both, so they hold for
    either reading; the other tests follow the paper.
    """
    c = np.sort(np.asarray(conf, dtype=np.float64))[::-1]
    ok = [n for n in range(1, len(c) + 1) if (n + 1) * (1 - c[n - 1]) < factor]
    return max([1] + ok)


@pytest.mark.parametrize(
    "conf, factor, expected",
    [
        # (n+1)(1-c_n): 0.2, 0.6, 1.2, 2.0 -> n = 2
        ([0.9, 0.8, 0.7, 0.6], 1.0, 2),
        # 0.2, 0.6, 1.2, 2.0, 3.0 -> n = 3 (1.2 < 1.5)
        ([0.9, 0.8, 0.7, 0.6, 0.5], 1.5, 3),
        # 0.2, 0.6, ... -> n = 1 (0.6 >= 0.5)
        ([0.9, 0.8, 0.7, 0.6], 0.5, 1),
        # 0.06, 0.12, 0.2 -> all of them
        ([0.97, 0.96, 0.95], 1.0, 3),
        # the top one fails too (2 * 0.7 = 1.4): still one token
        ([0.3, 0.2, 0.1], 1.0, 1),
        # a single masked position
        ([0.1], 0.01, 1),
        # 0.1, 0.6, 1.2, 2.0, 3.0 -> 3 (the order given does not matter)
        ([0.6, 0.95, 0.5, 0.8, 0.7], 1.5, 3),
        # 0.04, 0.09, 1.6, 2.0 (after a big drop) -> 2
        ([0.98, 0.97, 0.6, 0.6], 1.0, 2),
    ],
)
def test_factor_rule_hand_computed(conf, factor, expected):
    conf = np.array(conf)
    masked = np.ones(len(conf), dtype=bool)
    idx = select(conf, masked, count=1, threshold=None, factor=factor)
    assert len(idx) == expected == factor_count(conf, factor)
    # The most confident ones, each once.
    top = np.argsort(-conf, kind="stable")[:expected]
    assert sorted(idx.tolist()) == sorted(top.tolist())


def test_factor_rule_counts_masked_positions_only():
    # Committed positions (masked False) are not candidates, however confident;
    # the masked ones are ranked among themselves: 0.9, 0.8, 0.7, 0.5 -> 0.2,
    # 0.6, 1.2, 2.5 -> two, positions 3 and 1.
    conf = np.array([0.99, 0.8, 0.999, 0.9, 0.7, 0.5])
    masked = np.array([False, True, False, True, True, True])
    idx = select(conf, masked, count=1, threshold=None, factor=1.0)
    assert sorted(idx.tolist()) == [1, 3]
    # Nothing masked, nothing to commit.
    none = select(conf, np.zeros(6, dtype=bool), count=1, threshold=None, factor=1.0)
    assert len(none) == 0


def test_factor_rule_against_brute_force():
    rng = np.random.default_rng(1234)
    counts = set()
    for _ in range(400):
        n = int(rng.integers(1, 12))
        # Mostly confident proposals, so that counts above 1 are common.
        conf = 1 - rng.random(n) ** 2 * 0.5
        masked = rng.random(n) < 0.8
        if not masked.any():
            masked[int(rng.integers(n))] = True
        factor = float(rng.choice([0.25, 0.5, 1.0, 2.0, 4.0]))
        idx = select(conf, masked, count=1, threshold=None, factor=factor)
        m = factor_count(conf[masked], factor)
        counts.add(m)
        assert len(idx) == m
        assert masked[idx].all()
        # The m most confident masked positions.
        assert conf[idx].min() >= np.sort(conf[masked])[::-1][m - 1]
    assert {1, 2, 3, 4} <= counts  # the cases cover more than the floor


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_factor_rule_end_to_end(factor):
    # tiny-sharp is confident: the factor rule commits several tokens in some
    # calls and one in others. Every call's commits are recomputed here from
    # the call's own log-probs.
    model, tokenizer = load_golden("tiny-sharp")
    prompt = tokenizer.encode("hello world")
    P, G = len(prompt), 16
    counts, seen = [], set()

    def on_step(st):
        tokens, conf = proposals(st)
        order = np.argsort(-conf, kind="stable")
        c = conf[order]
        # No decision rests on a near tie with the factor.
        margins = np.abs((np.arange(len(c)) + 2) * (1 - c) - factor)
        assert margins.min() > 1e-4
        n = factor_count(conf, factor)
        expected = set(st.positions[order[:n]].tolist())
        committed = st.committed[0].tolist()
        assert set(committed) == expected, (st.block, st.step)
        assert len(committed) == n
        rows = {int(p): i for i, p in enumerate(st.positions)}
        got = np.asarray(st.confidence[0], dtype=np.float64)
        want = conf[[rows[p] for p in committed]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert [st.canvas[0, p] for p in committed] == [
            tokens[rows[p]] for p in committed
        ]
        # Positions are committed once, inside their block.
        assert not seen & set(committed)
        assert all(st.block_start <= p < st.block_start + 8 for p in committed)
        seen.update(committed)
        counts.append(n)

    out, nfe = diffusion_generate(
        model,
        mx.array([prompt]),
        steps=G,
        gen_length=G,
        block_length=8,
        factor=factor,
        on_step=on_step,
    )
    assert nfe == len(counts) < G
    assert seen == set(range(P, P + G))
    assert MASK not in np.array(out)[0].tolist()
    assert max(counts) > 1  # parallel commits happened


# 2. confidence_eos_eot_inf: EOS and EoT proposals get confidence 0.


@pytest.mark.parametrize(
    "end, settings",
    [
        (EOS, {}),
        # With EOS banned, tiny-eos proposes EoT where it proposed EOS.
        (EOT, {"logits_eos_inf": True}),
        (EOT, {"logits_eos_inf": True, "temperature": 0.2}),
    ],
    ids=["eos", "eot", "eot-sampled"],
)
def test_end_tokens_get_confidence_zero(end, settings):
    model, tokenizer = load_golden("tiny-eos")
    prompt = chat_prompt(tokenizer, "hello")
    greedy = settings.get("temperature", 0.0) == 0.0
    committed_ends = []
    ordered = []

    def on_step(st):
        tokens = st.canvas[0, st.committed[0]]
        conf = np.asarray(st.confidence[0], dtype=np.float64)
        assert len(tokens) == 1  # one per step: steps == gen_length
        for t, c in zip(tokens, conf):
            if t in END:
                assert c == 0.0, (st.step, int(t), c)
                committed_ends.append(int(t))
            else:
                assert c > 0.0, (st.step, int(t), c)
        if greedy:
            # The commit order: an end token only once every masked position
            # proposes one (their confidence 0 is the lowest there is).
            props, _ = proposals(st)
            if tokens[0] in END:
                assert set(props.tolist()) <= set(END), st.step
                ordered.append(st.step)

    mx.random.seed(0)
    diffusion_generate(
        model,
        mx.array([prompt]),
        steps=16,
        gen_length=16,
        block_length=16,
        confidence_eos_eot_inf=True,
        on_step=on_step,
        **settings,
    )
    # The case does what it is for: the end token is proposed and committed.
    assert end in committed_ends
    if "logits_eos_inf" in settings:
        assert EOS not in committed_ends
    if greedy:
        assert ordered


# 3. Early stop pads with EOS, whatever the end token.


@pytest.mark.parametrize(
    "text, template, block_length",
    # The stop comes a few calls in, with masks left between committed tokens
    # (of the same block, or of the next one).
    [("Thanks!", True, 16), ("hello", False, 8)],
)
def test_early_stop_pads_with_eos_after_eot(text, template, block_length):
    # EOS is banned: the answer ends with EoT, and every position left masked
    # at the stop is EOS (spec.eos_token_id), not EoT and not the mask.
    model, tokenizer = load_golden("tiny-eos")
    prompt = chat_prompt(tokenizer, text) if template else tokenizer.encode(text)
    P, G = len(prompt), 16
    committed = set()

    def on_step(st):
        committed.update(st.committed[0].tolist())

    out, nfe = diffusion_generate(
        model,
        mx.array([prompt]),
        steps=G,
        gen_length=G,
        block_length=block_length,
        logits_eos_inf=True,
        early_stop=True,
        on_step=on_step,
    )
    row = np.array(out)[0]
    assert row[:P].tolist() == prompt
    padding = [p for p in range(P, P + G) if p not in committed]
    assert 1 < nfe < G and padding  # it did stop early, not at once
    gen = row[P:].tolist()
    first_end = next(i for i, t in enumerate(gen) if t in END)
    assert gen[first_end] == EOT  # the ending token is EoT...
    assert all(P + i in committed for i in range(first_end + 1))
    assert [int(row[p]) for p in padding] == [EOS] * len(padding)  # ...the rest EOS
    assert MASK not in gen
    # Committed tokens are the model's (never EOS, which is banned), as in
    # the same run without early stop.
    full, _ = diffusion_generate(
        model,
        mx.array([prompt]),
        steps=G,
        gen_length=G,
        block_length=block_length,
        logits_eos_inf=True,
    )
    full = np.array(full)[0]
    assert all(row[p] == full[p] != EOS for p in committed)


# 4. remasking="random" commits in a random order.


def commit_order(model, prompt, seed):
    """(positions in commit order, canvas, per-step (committed, most confident
    masked candidate, number of candidates)) of one random-remasking run."""
    order, steps = [], []

    def on_step(st):
        _, conf = proposals(st)
        (p,) = st.committed[0].tolist()
        order.append(p)
        steps.append((p, int(st.positions[np.argmax(conf)]), len(st.positions)))

    mx.random.seed(seed)
    out, _ = diffusion_generate(
        model,
        mx.array([prompt]),
        steps=16,
        gen_length=16,
        block_length=16,
        remasking="random",
        on_step=on_step,
    )
    return order, np.array(out)[0].tolist(), steps


def test_random_remasking_ignores_confidence():
    model, tokenizer = load_golden("tiny-mha")
    prompt = tokenizer.encode("hello world")
    P = len(prompt)
    runs = [commit_order(model, prompt, seed) for seed in range(12)]
    for order, canvas, _ in runs:
        assert sorted(order) == list(range(P, P + 16))  # one per step, all
        assert MASK not in canvas

    # The first commit is not the most confident position, except by chance
    # (1 in 16 per seed), and it is spread over the block.
    first = [steps[0] for _, _, steps in runs]
    assert sum(p == top for p, top, _ in first) <= 4
    assert len({p for p, _, _ in first}) >= 6
    # Over every call with a choice, the most confident candidate is picked
    # about as often as chance says (mean of 1/k for k = 2..16: 0.16).
    choices = [(p, top) for _, _, steps in runs for p, top, k in steps if k > 1]
    assert np.mean([p == top for p, top in choices]) < 0.4
    # Different seeds, different orders.
    assert len({tuple(order) for order, _, _ in runs}) == len(runs)

    # The same seed, the same run.
    again = commit_order(model, prompt, 3)
    assert again == runs[3]


# 5. Prompt progress: (0, P) before the first model call, (P, P) after it.


def test_prompt_progress_reports_start_and_end():
    model, tokenizer = load_golden("tiny-mha")
    prompt = chat_prompt(tokenizer, "hello")
    P = len(prompt)
    events = []

    responses = list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=8,
            block_length=8,
            reference=True,
            prompt_progress_callback=lambda done, total: events.append(
                ("progress", done, total)
            ),
            on_step=lambda st: events.append(("step", st.nfe)),
        )
    )
    assert len(responses) == 8
    progress = [e[1:] for e in events if e[0] == "progress"]
    assert progress == [(0, P), (P, P)]
    # In order: (0, P), the first model call, (P, P), the other calls.
    assert events[:3] == [("progress", 0, P), ("step", 1), ("progress", P, P)]


# 6. A model that would propose only the mask token still finishes.


class MaskLover:
    """A model whose favourite prediction, by far, is the mask token."""

    def __init__(self, model):
        self.model, self.layers, self.diffusion = model, model.layers, model.diffusion

    def __call__(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        return logits + 1000.0 * (mx.arange(logits.shape[-1]) == MASK)

    def generate_step(self, prompt, **kwargs):
        return stream_diffusion(self, prompt, **kwargs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "settings",
    [
        {"reference": True},
        {},  # the defaults: dual cache, threshold 0.9
        {"threshold": None, "factor": 1.0, "cache": "prefix"},
        {"reference": True, "sampler": make_sampler(temp=1.0, top_k=2)},
    ],
    ids=["reference", "defaults", "factor", "top-k"],
)
def test_mask_favouring_model_terminates(settings):
    # A committed mask would stay masked and be proposed again, forever at
    # temperature 0: the mask id must never be a candidate. Past the canvas's
    # steps the guard fails the test; a hang anywhere else is the timeout's.
    model, tokenizer = load_golden("tiny-mha")
    G = 16
    calls = []

    def guard(st):
        calls.append(st.nfe)
        assert st.nfe <= G, "ran past its steps"

    mx.random.seed(0)
    responses = list(
        stream_generate(
            MaskLover(model),
            tokenizer,
            [BOS, 65, 66],
            max_tokens=G,
            block_length=8,
            on_step=guard,
            **settings,
        )
    )
    tokens = [r.token for r in responses]
    assert len(tokens) == G and MASK not in tokens
    assert calls and calls[-1] <= G
