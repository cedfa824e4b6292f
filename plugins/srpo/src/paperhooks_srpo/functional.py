"""SRPO as pure torch functions (Choi, Ahmadian, Geist, Pietquin & Azar, "Self-Improving Robust
Preference Optimization", ICLR 2025, arXiv 2406.01660).

**A reconstruction.** The paper's Sec. 4–5 (the offline loss, its targets, α and β, hard or soft
labels, the revision prompt) could not be read: a second search found only the abstract (arXiv
HTML v3, OpenReview) and the Fig. 3 caption. What is known and where it comes from:

- the min-max objective, from a Cohere report summary (the authors' employer), not the paper::

      min_π max_{π†} E_x E_{y∼π(·|x), y'∼π†(·|x,y)} [ P(y' ≻ y | x) − β KL(π†‖π_ref | x, y) + β KL(π‖π_ref | x) ]

  π is the *generator*, π†(y'|x, y) the in-context *self-improvement* (revision) policy: the same
  language model, conditioned on the prompt x and a previous completion y;
- the derivation below (ours);
- the two regressions and α = 0.8 agree with the only public implementation found, the unmerged
  third-party TRL pull request #1772 (``srpo_loss``, hard labels, α hard-coded to 0.8): a third
  party's reading, not the authors' code.

Derivation. For fixed (x, y), the inner maximization over π†(·|x, y) of
``E_{y'∼π†}[P(y' ≻ y|x)] − β KL(π†‖π_ref)`` is a KL-regularized bandit, so::

    π†*(y'|x, y) = π_ref(y'|x, y) exp(P(y' ≻ y|x)/β) / Z(x, y),   Z(x, y) = Σ_{y'} π_ref(y'|x, y) exp(P(y' ≻ y|x)/β)

with value β log Z(x, y). The outer minimization of ``E_{y∼π}[β log Z(x, y)] + β KL(π‖π_ref)`` then
gives π*(y|x) ∝ π_ref(y|x) / Z(x, y). Hence, for any y', y'', y:

    β log π†*(y'|x,y)/π_ref(y'|x,y) − β log π†*(y''|x,y)/π_ref(y''|x,y) = P(y' ≻ y|x) − P(y'' ≻ y|x)      (I1)
    β log π†*(y'|x,y)/π_ref(y'|x,y) − β log π*(y|x)/π_ref(y|x)            = P(y' ≻ y|x) + c(x)            (I2)

(β log π*(y|x)/π_ref(y|x) = −β log Z(x, y) − c(x), so Z(x, y) cancels in I2;
c(x) = β log Σ_y π_ref(y|x)/Z(x, y) does not depend on y, y'.)

The offline loss regresses the policy's log-ratios onto these identities on a preference pair
(x, y_w, y_l). With the log-ratios of the trained policy π (the same network as π†)::

    r†(y'|y) = log π(y'|x, y) − log π_ref(y'|x, y)        r(y) = log π(y|x) − log π_ref(y|x)

and p = P(y_w ≻ y_l | x) (hard labels: p = 1; P(y ≻ y) = ½, P(y_l ≻ y_w) = 1 − p):

    L_self = (β[r†(y_w|y_l) − r†(y_l|y_l)] − (p − ½))² + (β[r†(y_w|y_w) − r†(y_l|y_w)] − (p − ½))²   (I1 twice)
    L_gen  = (β[r†(y_w|y_l) + r(y_w) − r†(y_l|y_w) − r(y_l)] − (2p − 1))²     (I2 at (y_w|y_l) − I2 at (y_l|y_w))
    L_α    = α L_self + (1 − α) L_gen

Both regressions are zero at (π*, π†*) (checked on a tabular toy in the tests). Log-probabilities
are sums over the response tokens only (and its end-of-response token): never the prompt, the
context, or padding.

Revision sequences (:func:`revision_sequences`): a fixed-width preference row is
``[prompt (L), y, EOS, PAD…]`` of width W. "Revise y into y'" is the whole row of y (W tokens, PAD
included as ordinary context, attended) followed by ``row_y'[L:]`` (y' and its EOS, right-padded):
width 2W − L, the response mask 1 on y' and its EOS only.
"""

from __future__ import annotations

import torch

PAD, EOS = 0, 1  # the synthetic-preferences vocabulary (paperhooks.tasks.preference)


def srpo_losses(
    rev_w_given_l: torch.Tensor,
    rev_l_given_l: torch.Tensor,
    rev_w_given_w: torch.Tensor,
    rev_l_given_w: torch.Tensor,
    gen_w: torch.Tensor,
    gen_l: torch.Tensor,
    beta: float,
    alpha: float,
    preference_prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_α, L_self, L_gen)`` per pair, ``[B]`` each (see the module doc).

    :param rev_w_given_l: r†(y_w|y_l), the log-ratio ``log π − log π_ref`` of revising y_l into y_w
        (summed over y_w's tokens), ``[B]``; likewise ``rev_l_given_l`` = r†(y_l|y_l),
        ``rev_w_given_w`` = r†(y_w|y_w), ``rev_l_given_w`` = r†(y_l|y_w).
    :param gen_w: r(y_w) = log π(y_w|x) − log π_ref(y_w|x), ``[B]``; ``gen_l`` = r(y_l).
    :param beta: β.
    :param alpha: α ∈ [0, 1], the weight of L_self (1 − α: L_gen).
    :param preference_prob: p = P(y_w ≻ y_l | x) ∈ [½, 1] (1: hard labels).
    """
    half = preference_prob - 0.5
    self_loss = (beta * (rev_w_given_l - rev_l_given_l) - half).square() + (
        beta * (rev_w_given_w - rev_l_given_w) - half
    ).square()
    gen_loss = (
        beta * (rev_w_given_l + gen_w - rev_l_given_w - gen_l) - (2.0 * preference_prob - 1.0)
    ).square()
    return alpha * self_loss + (1.0 - alpha) * gen_loss, self_loss, gen_loss


def prompt_length_of(mask: torch.Tensor) -> int:
    """L, the fixed prompt width of preference rows: the first response position of every row.

    Raises ``ValueError`` when the rows' responses do not all start at the same position (the
    revision layout needs fixed-width prompts, as ``synthetic-preferences`` has).
    """
    on = mask > 0
    if not bool(on.any(1).all()):
        raise ValueError("srpo: every row needs a response (its mask is all zero)")
    first = on.float().argmax(1)
    if not bool((first == first[0]).all()):
        raise ValueError(
            "srpo: the revision layout needs fixed-width prompts (every response starting at the same position); "
            f"got response starts {sorted(set(first.tolist()))}"
        )
    return int(first[0])


def revision_sequences(
    context_ids: torch.Tensor,
    context_attention: torch.Tensor,
    target_ids: torch.Tensor,
    target_attention: torch.Tensor,
    target_mask: torch.Tensor,
    prompt_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention, mask)`` ``[B, 2W − L]`` of "revise the context's y into the target's y'".

    ``context_*`` and ``target_*`` are fixed-width rows ``[B, W]`` of the same prompts. The context
    is the whole row of y with its padding set to PAD and attended (an ordinary context token:
    the layout is fixed, so the revision always starts at position W); then ``target[L:]``
    (y', its EOS, padding set to PAD), attended where the target row is. The mask is the
    target's response mask after the context: 0 on the prompt, the context and all padding.
    """
    L = prompt_length
    if target_mask[:, :L].any():
        raise ValueError(
            f"srpo: the target rows' response mask is nonzero inside the prompt (first {L} positions)"
        )
    context = torch.where(context_attention.bool(), context_ids, PAD)
    target = torch.where(target_attention.bool(), target_ids, PAD)[:, L:]
    ids = torch.cat([context, target], 1)
    attention = torch.cat([torch.ones_like(context_attention), target_attention[:, L:]], 1)
    mask = torch.cat(
        [torch.zeros_like(context_ids, dtype=target_mask.dtype), target_mask[:, L:]], 1
    )
    return ids, attention, mask


#: the order of :func:`revision_batch`'s four blocks: (target, context)
REVISIONS: tuple[tuple[str, str], ...] = (
    ("chosen", "rejected"),
    ("rejected", "rejected"),
    ("chosen", "chosen"),
    ("rejected", "chosen"),
)


def revision_batch(
    batch: dict[str, torch.Tensor], prompt_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four revision sequences of every pair, ``[4B, 2W − L]``: blocks y_w|y_l, y_l|y_l,
    y_w|y_w, y_l|y_w (target|context, the order of :data:`REVISIONS`)."""
    parts = [
        revision_sequences(
            batch[f"{ctx}_ids"],
            batch[f"{ctx}_attention"],
            batch[f"{tgt}_ids"],
            batch[f"{tgt}_attention"],
            batch[f"{tgt}_mask"].float(),
            prompt_length,
        )  # fmt: skip
        for tgt, ctx in REVISIONS
    ]
    ids, attention, mask = (torch.cat(t) for t in zip(*parts, strict=True))
    return ids, attention, mask


def response_rows(
    prompts: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-width rows ``[prompt, y, EOS, PAD…]`` ``[B, W]`` and their attention from sampled
    responses (``tokens`` ``[B, n]``: content then PAD, ``lengths`` ``[B]``).

    A response longer than the row allows (``W − L − 1`` tokens) is cut there, and EOS ends it.
    """
    b, L = prompts.shape
    room = width - L - 1
    if room < 1:
        raise ValueError(
            f"response_rows: width {width} leaves no room for a response after a {L}-token prompt"
        )
    n = lengths.clamp(max=room)
    pos = torch.arange(room, device=tokens.device)
    body = (
        tokens[:, :room]
        if tokens.shape[1] >= room
        else torch.nn.functional.pad(tokens, (0, room - tokens.shape[1]), value=PAD)
    )
    body = torch.where(pos[None] < n[:, None], body, PAD)
    ids = torch.cat(
        [prompts, body, torch.full((b, 1), PAD, dtype=prompts.dtype, device=prompts.device)], 1
    )
    ids[torch.arange(b, device=ids.device), L + n] = EOS
    attention = (torch.arange(width, device=ids.device)[None] <= (L + n)[:, None]).long()
    return ids, attention


@torch.no_grad()
def revise(
    policy: torch.nn.Module,
    rows: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    prompt_length: int,
    attention: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one revision y' ∼ π(·|x, y) of each row ``[prompt, y, EOS, PAD…]`` ``[B, W]``.

    The context is the whole row (padding set to PAD and attended, as in training); y' is
    sampled with :func:`paperhooks.tasks.preference.sample` for at most ``W − L − 1`` tokens
    (the longest response a row holds; EOS is appended if it was not sampled by then).

    Returns ``(rows', attention', tokens, lengths)``: the revisions as rows of the same layout
    (apply :func:`revise` again for a second revision), and their content tokens ``[B, W − L − 1]``
    (PAD after the response) and lengths ``[B]``.
    """
    from paperhooks.tasks.preference import sample

    b, width = rows.shape
    L = prompt_length
    context = rows if attention is None else torch.where(attention.bool(), rows, PAD)
    tokens, lengths = sample(policy, context, width - L - 1, generator, temperature)
    new_rows, new_attention = response_rows(rows[:, :L], tokens, lengths, width)
    return new_rows, new_attention, tokens, lengths


__all__ = [
    "EOS",
    "PAD",
    "REVISIONS",
    "prompt_length_of",
    "response_rows",
    "revise",
    "revision_batch",
    "revision_sequences",
    "srpo_losses",
]
