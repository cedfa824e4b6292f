"""The 3D-properties on a categorical toy policy, shaped as the paper's toy model is described.

The paper's toy model (its §3.2, Fig. 2 and 3) is known here only from reviews of the paper:
a three-layer MLP mapping 4 prompts to a softmax over 10 responses, each prompt with a chosen
and a rejected response and the rest unseen, trained for 500 epochs, in on- and off-policy
scenarios. Its widths, optimizer, learning rate, β and initialization were not found, so those
below are this project's choices. Unlike the causal-LM effect test, a categorical policy gives
the unseen mass exactly, so the third property (dispersion) is measured, not inferred.

Setup, per seed (run from the repository root; all 40 runs take ~40 s of CPU on one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/dpo-3d/experiments/toy_categorical.py --seeds 0 1 2 3 4

- data: prompts are one-hot vectors e_p, p = 0..3; y⁺ = p, y⁻ = 4 + p; responses 8 and 9 are in
  no pair. Unseen mass of prompt p: 1 − π(y⁺|p) − π(y⁻|p);
- model: Linear(4, 64) → ReLU → Linear(64, 64) → ReLU → Linear(64, 10), PyTorch's default init;
- init ``random``: the policy as initialized (π(y±) ≈ 0.1). Init ``off``: first 6 Adam steps
  (lr 1e-2) of NLL on responses 8 and 9, so π(y±) start at ~0.01-0.03 (pairs the policy rarely
  produces, the off-policy case);
- reference: the policy at the start of preference training, frozen;
- training: the 4 pairs as one batch, Adam lr 1e-3, 500 steps; β = 0.1 (β⁺ = 0.1 for Flex-DPO).

Printed per run: π(y⁺) at the start, its peak during training and at the end; π(y⁻) and the
unseen mass at the end (means over the 4 prompts).
"""

from __future__ import annotations

import argparse
import copy

import torch

from paperhooks_dpo_3d import chosen_nll, flex_dpo_loss

VARIANTS = {  # name: (β⁺, β⁻, λ)
    "DPO": (0.1, 0.1, 0.0),
    "Flex-DPO β⁻=0.08": (0.1, 0.08, 0.0),
    "Flex-DPO β⁻=0.05": (0.1, 0.05, 0.0),
    "SFT-DPO λ=1": (0.1, 0.1, 1.0),
}
PROMPTS = torch.eye(4)
CHOSEN = torch.tensor([0, 1, 2, 3])
REJECTED = torch.tensor([4, 5, 6, 7])
UNPAIRED = (8, 9)


def _policy(seed: int, init: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    if init == "off":  # move the mass onto the unpaired responses: π(y±) start small
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(6):
            logp = net(PROMPTS).log_softmax(-1)
            opt.zero_grad()
            (-logp[:, list(UNPAIRED)].mean()).backward()
            opt.step()
    return net


def run(
    seed: int, init: str, beta_chosen: float, beta_rejected: float, sft: float, steps: int = 500
) -> dict:
    """Train one variant; the probabilities are means over the 4 prompts."""
    net = _policy(seed, init)
    ref = copy.deepcopy(net).requires_grad_(False)
    rows = torch.arange(4)
    with torch.no_grad():
        ref_logp = ref(PROMPTS).log_softmax(-1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start, peak = ref_logp[rows, CHOSEN].exp().mean().item(), 0.0
    for _ in range(steps):
        logp = net(PROMPTS).log_softmax(-1)
        w, lo = logp[rows, CHOSEN], logp[rows, REJECTED]
        loss = flex_dpo_loss(
            w, lo, ref_logp[rows, CHOSEN], ref_logp[rows, REJECTED], beta_chosen, beta_rejected
        )
        if sft > 0:  # one categorical "token" per response: the sum and mean NLL agree
            loss = loss + sft * chosen_nll(w, torch.ones(4), "sum")
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        peak = max(peak, w.exp().mean().item())
    with torch.no_grad():
        p = net(PROMPTS).softmax(-1)
    chosen, rejected = p[rows, CHOSEN].mean().item(), p[rows, REJECTED].mean().item()
    return {
        "start": start,
        "peak": peak,
        "chosen": chosen,
        "rejected": rejected,
        "unseen": 1 - chosen - rejected,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--inits", nargs="+", default=["random", "off"], choices=["random", "off"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| init | seed | variant | π(y⁺) start | peak | end | π(y⁻) end | unseen end |")
    print("|---|---|---|---|---|---|---|---|")
    for init in args.inits:
        for seed in args.seeds:
            for name, (bc, br, sft) in VARIANTS.items():
                r = run(seed, init, bc, br, sft)
                print(
                    f"| {init} | {seed} | {name} | {r['start']:.3f} | {r['peak']:.3f} | {r['chosen']:.3f} "
                    f"| {r['rejected']:.1e} | {r['unseen']:.3f} |"
                )


if __name__ == "__main__":
    main()
