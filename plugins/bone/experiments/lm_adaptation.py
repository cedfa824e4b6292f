"""Bone / BAT vs LoRA on a small pretrained LLaMA-style causal LM (CPU; the card's LM tables).

One pretraining takes ~20-60 s and one adaptation run ~10 s on 1 CPU thread, so the sweep is
a script; ``tests/test_effect.py`` imports this file and runs seed 0 at r = 16. To reproduce
the card's tables, run from the repository root once per r in {4, 8, 16}, with the grids
given there::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/bone/experiments/lm_adaptation.py --r 16 \
        --seeds 0 1 2 3 4 --lrs 5.5e-3 1e-2 1.7e-2 3e-2 5.5e-2 --cache runs/bone_lm --out runs/bone_lm.jsonl

Setup, per seed (the official scripts' adapter settings, scaled down):
- model: 2 LLaMA-style blocks (RMSNorm, causal attention q/k/v/o_proj with 4 heads, SwiGLU
  gate/up/down_proj), width 64, MLP width 128, learned positions, vocabulary 64, untied head;
- data: a random second-order Markov chain P over the 64 tokens, logits(x_t | x_{t-2}, x_{t-1})
  = A[x_{t-1}] + B[x_{t-2}]; the shifted chain Q keeps half of P's logit variance
  (A' = √½ A + √½ N, the same for B), sequences of 33 tokens;
- pretraining: every parameter, AdamW lr 3e-3 (20 warm-up steps, then cosine), 400 steps of
  64 sequences from P;
- adaptation to Q: 512 training sequences, 100 steps of 32, AdamW (weight decay 0) with a
  cosine schedule to 0 and no warm-up (the official run_bone.sh / run_lora.sh), on all seven
  projections of both blocks (the official target_modules; the head and embeddings frozen);
- Bone / BAT block size r, LoRA rank r/2 with alpha = rank (the official scripts pair bone_r 64
  with lora_rank 32, lora_alpha 32). r = 16: Bone/BAT 18,432 trainable parameters, LoRA
  17,408.
Printed per run: the loss on the 512 training sequences after the last step (``train``), on
512 held-out sequences of Q (``eval``) and the mean minibatch loss over the 100 steps (``auc``).

``--one-pass`` trains on 3200 fresh sequences of Q instead, each seen once in order (the
paper's one epoch; the card's section 1b). Then each minibatch loss is taken before the model
has seen the batch, so ``auc`` is a loss on unseen data; ``train`` is on the 3200.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from paperhooks.reparam import Layers
from paperhooks_bone import Bone, BoneConfig

V, T, D, HEADS, FF, LAYERS = 64, 32, 64, 4, 128, 2
TARGETS = ("layers.*.self_attn.*_proj", "layers.*.mlp.*_proj")


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(D, D, bias=False) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, D))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.down_proj = nn.Linear(FF, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(D), Attention()
        self.post_attention_layernorm, self.mlp = RMSNorm(D), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids) + self.pos[: ids.shape[1]]
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


class LoRA(nn.Module):
    """W ↦ W + B A (B = 0, A ~ PEFT's kaiming-uniform, alpha = rank so the scale is 1)."""

    def __init__(
        self, rank: int, out_features: int, in_features: int, gen: torch.Generator
    ) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=gen))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.B @ self.A


class _Module:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids[:, :-1]).reshape(-1, V), ids[:, 1:].reshape(-1))


def chain(gen: torch.Generator, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(V, V, generator=gen) * scale, torch.randn(V, V, generator=gen) * scale * 0.7


def shifted(
    A: torch.Tensor, B: torch.Tensor, gen: torch.Generator, alpha: float = 0.5, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    keep, new = math.sqrt(1 - alpha), math.sqrt(alpha)
    A2 = keep * A + new * torch.randn(V, V, generator=gen) * scale
    B2 = keep * B + new * torch.randn(V, V, generator=gen) * scale * 0.7
    return A2, B2


def sample(A: torch.Tensor, B: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.empty(n, T + 1, dtype=torch.long)
    ids[:, :2] = torch.randint(V, (n, 2), generator=gen)
    for t in range(2, T + 1):
        p = torch.softmax(A[ids[:, t - 1]] + B[ids[:, t - 2]], -1)
        ids[:, t] = torch.multinomial(p, 1, generator=gen).squeeze(1)
    return ids


def pretrain(
    seed: int, data: torch.Tensor, steps: int = 400, lr: float = 3e-3, batch: int = 64
) -> TinyLlama:
    torch.manual_seed(seed)
    model = TinyLlama()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm_cos = lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cos)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = lm_loss(model, data[torch.randint(len(data), (batch,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def adapt(
    base: nn.Module,
    method: str,
    r: int,
    seed: int,
    lr: float,
    train: torch.Tensor,
    held_out: torch.Tensor,
    steps: int = 100,
    batch: int = 32,
    one_pass: bool = False,
) -> dict:
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    if method == "lora":
        gen = torch.Generator().manual_seed(1000 + seed)
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear) and name != "lm_head":
                parametrize.register_parametrization(
                    layer, "weight", LoRA(r // 2, *layer.weight.shape, gen)
                )
    else:
        layers = Layers(types=("Linear",), include=TARGETS, skip_head=False)
        Bone(BoneConfig(variant=method, r=r, layers=layers)).reparam_setup(
            module=_Module(model), ctx=None
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator().manual_seed(2000 + seed)
    curve = []
    for step in range(steps):
        if one_pass:  # every sequence once, in order (len(train) == steps * batch)
            ids = train[step * batch : (step + 1) * batch]
        else:
            ids = train[torch.randint(len(train), (batch,), generator=gen)]
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
    with torch.no_grad():
        final, held = lm_loss(model, train).item(), lm_loss(model, held_out).item()
    return {
        "trainable": sum(p.numel() for p in params),
        "train": final,
        "eval": held,
        "auc": sum(curve) / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 1.7e-2, 3e-2])
    ap.add_argument("--methods", nargs="+", default=["lora", "bone", "bat"])
    ap.add_argument("--r", type=int, default=8, help="Bone/BAT block size; LoRA gets rank r/2")
    ap.add_argument("--cache", type=Path, default=None, help="folder for the pretrained models")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    ap.add_argument(
        "--one-pass",
        action="store_true",
        help="train on 3200 fresh sequences of Q, each seen once (the paper's one epoch)",
    )
    args = ap.parse_args()
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(seed)
        A, B = chain(gen)
        pre = sample(A, B, 4096, gen)
        A2, B2 = shifted(A, B, gen)
        train, held_out = sample(A2, B2, 512, gen), sample(A2, B2, 512, gen)
        if args.one_pass:  # drawn after the others, so the 512-sequence runs are unchanged
            train = sample(A2, B2, 100 * 32, gen)
        path = args.cache / f"tiny_llama_{seed}.pt" if args.cache else None
        if path is not None and path.exists():
            base = TinyLlama()
            base.load_state_dict(torch.load(path))
        else:
            base = pretrain(seed, pre)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(base.state_dict(), path)
        for lr in args.lrs:
            for method in args.methods:
                rec = {
                    "seed": seed,
                    "lr": lr,
                    "method": method,
                    "r": args.r,
                    "one_pass": args.one_pass,
                    **adapt(
                        base, method, args.r, seed, lr, train, held_out, one_pass=args.one_pass
                    ),
                }
                print(json.dumps(rec), flush=True)
                if args.out is not None:
                    with args.out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
