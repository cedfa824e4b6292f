"""Preference tasks: synthetic preference pairs with a known hidden reward, and the policies.

Datasets (no download; built deterministically from the recipe seed):

- ``synthetic-preferences``: prompts and response pairs over a small vocabulary, for the
  ``causal-lm`` model. Token 0 pads, token 1 ends a response (EOS), tokens ``2..V-1`` are
  content. A prompt is ``prompt_length`` content tokens; its first token is the *topic* ``k``.
  The hidden reward of a response ``y = (y_1..y_n, EOS)`` is

      r(x, y) = (1/n) Σ_t u[k, y_t]      (``reward: mean``)   or   Σ_t u[k, y_t]   (``sum``)

  with ``u[k, v] ~ N(0, 1)`` drawn from the seed. Each pair's responses are uniform random
  content tokens with lengths uniform in ``[min_response, max_response]``; the *chosen* one
  is the one with the larger labelling score ``r + length_bias · n`` (so ``length_bias > 0``
  makes longer responses preferred beyond their reward: a length-biased task), then a
  ``flip_rate`` fraction of training labels are swapped (``flipped`` marks them). Validation
  labels are never flipped.

  ``reward: chain`` is a chain of steps judged by a binary verifier (the setting of per-step
  credit assignment, Setlur et al. 2024): for every topic ``k`` and response position ``t`` a
  set ``V[k, t]`` of ``round(chain_valid · (vocab_size − 2))`` valid content tokens, drawn
  from the seed (a random subset per ``(k, t)``, at least one valid and one invalid token).
  The hidden reward is

      r(x, y) = 1  if min_response ≤ n ≤ max_response and y_t ∈ V[k, t] for every t,  else 0.

  The *chosen* response is a valid chain (tokens uniform in ``V[k, t]``); the *rejected* one,
  drawn independently (its own length and valid tokens), is valid up to its *pit*, a token
  position uniform in ``0..n−1``, holds a token outside ``V[k, pit]`` there, and uniform
  content tokens after it (``chain_tail: valid``: valid tokens after it, only the pit wrong). ``chosen_pit``/``rejected_pit`` give the pit's response position
  (−1: a valid chain); with ``steps`` the pit step is the step of that token. ``flip_rate``
  swaps the labels as above; ``length_bias`` is refused (the labels do not use a score).
- ``tabular-preferences``: the tabular fixture for exact, fast checks: ``P`` prompts with
  ``M`` canned responses each, hidden rewards ``r[p, y] ~ N(0, 1)`` (or a cyclic,
  non-transitive preference ``y ≻ y'`` iff ``(y' - y) mod M`` is in ``1..⌊(M-1)/2⌋``), every
  ordered pair of distinct responses once per epoch, labels flipped at ``flip_rate``.

Every row has ``chosen_ids``/``rejected_ids`` ``[T]`` (prompt + response, right-padded),
``chosen_attention``/``rejected_attention`` (1 on real tokens), ``chosen_mask``/
``rejected_mask`` (1 on response tokens, whose log-probability counts; never on the prompt or
padding), ``chosen_steps``/``rejected_steps`` (step index of each response token, -1
elsewhere), ``prompt`` (the topic or prompt id), ``reward_chosen``/``reward_rejected`` (hidden
rewards), ``flipped`` and ``index``; ``reward: chain`` adds ``chosen_pit``/``rejected_pit``.

Models: ``causal-lm`` (a ``transformers`` GPT-2 or Llama built from a small config, random
init; or any local/Hub ``AutoModelForCausalLM`` by ``pretrained``) and ``tabular-policy``
(a softmax over the canned responses of each prompt). Both are wrapped so that
``policy(ids, attention)`` returns per-token log-probabilities ``[B, T]`` (position ``t`` holds
``log π(ids_t | ids_<t)``, position 0 holds 0).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from paperhooks.tasks.registry import DataInfo, check_field, register_dataset, register_model
from paperhooks.tasks.sampler import DictDataset, generator

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PreferenceDataModule

PAD, EOS = 0, 1


def __getattr__(name: str) -> Any:
    """``PreferenceDataModule``, from :mod:`.datamodule` (Lightning loads on first use)."""
    if name == "PreferenceDataModule":
        from paperhooks.tasks.datamodule import PreferenceDataModule

        return PreferenceDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SyntheticPreferencesConfig:
    """Prompts and response pairs over a small vocabulary, labelled by a hidden token reward."""

    batch_size: int = 32
    num_workers: int = 0
    n_train: int = 512
    n_val: int = 256
    vocab_size: int = 16
    topics: int = 4
    prompt_length: int = 2
    min_response: int = 2
    max_response: int = 6
    reward: Literal["mean", "sum", "chain"] = "mean"
    length_bias: float = 0.0
    flip_rate: float = 0.0
    steps: int = 0
    chain_valid: float = 0.5
    chain_tail: Literal["uniform", "valid"] = "uniform"

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check_field(
            self.n_train >= 1 and self.n_val >= 1,
            "n_train and n_val",
            ">= 1",
            (self.n_train, self.n_val),
        )
        check_field(
            self.vocab_size >= 4,
            "vocab_size",
            ">= 4 (pad, EOS and two content tokens)",
            self.vocab_size,
        )
        check_field(
            1 <= self.topics <= self.vocab_size - 2, "topics", "in [1, vocab_size - 2]", self.topics
        )
        check_field(self.prompt_length >= 1, "prompt_length", ">= 1", self.prompt_length)
        check_field(
            1 <= self.min_response <= self.max_response,
            "min_response",
            "in [1, max_response]",
            self.min_response,
        )
        check_field(0 <= self.flip_rate < 0.5, "flip_rate", "in [0, 0.5)", self.flip_rate)
        check_field(self.steps >= 0, "steps", ">= 0 (0: no step boundaries)", self.steps)
        check_field(
            self.steps <= self.min_response,
            "steps",
            f"<= min_response ({self.min_response})",
            self.steps,
        )
        check_field(
            0 < self.chain_valid < 1,
            "chain_valid",
            "in (0, 1) (the fraction of valid tokens per step)",
            self.chain_valid,
        )
        if self.reward == "chain":
            m, content = self.chain_valid_tokens, self.vocab_size - 2
            check_field(
                1 <= m < content, "chain_valid",
                f"such that round(chain_valid · {content} content tokens) leaves at least one valid and one invalid "
                f"token per position (it gives {m})", self.chain_valid,
            )  # fmt: skip
            check_field(
                self.length_bias == 0, "length_bias", "0 with reward chain (chosen: a valid chain, no score)",
                self.length_bias,
            )  # fmt: skip

    @property
    def chain_valid_tokens(self) -> int:
        """``|V[k, t]|`` of ``reward: chain``: ``round(chain_valid · (vocab_size − 2))``."""
        return round(self.chain_valid * (self.vocab_size - 2))


def _response_steps(lengths: torch.Tensor, steps: int, width: int, offset: int) -> torch.Tensor:
    """Step index per position: response token ``t`` of ``n`` is in step ``⌊t·S/n⌋``; -1 elsewhere."""
    out = torch.full((len(lengths), width), -1, dtype=torch.int64)
    if steps == 0:
        return out
    for i, n in enumerate(lengths.tolist()):
        t = torch.arange(n)
        out[i, offset : offset + n] = t * steps // n
    return out


def _synthetic_split(
    config: SyntheticPreferencesConfig,
    u: torch.Tensor,
    n: int,
    flip_rate: float,
    g: torch.Generator,
) -> dict[str, torch.Tensor]:
    c, width = config, config.prompt_length + config.max_response + 1
    content = torch.arange(2, c.vocab_size)
    topic = torch.randint(0, c.topics, (n,), generator=g)
    prompt = content[torch.randint(0, len(content), (n, c.prompt_length), generator=g)]
    prompt[:, 0] = content[topic]

    def response() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = torch.randint(c.min_response, c.max_response + 1, (n,), generator=g)
        tokens = content[torch.randint(0, len(content), (n, c.max_response), generator=g)]
        pos = torch.arange(c.max_response)
        tokens = torch.where(pos < length[:, None], tokens, PAD)
        per_token = u[topic[:, None], tokens] * (pos < length[:, None])
        reward = per_token.sum(1) / length if c.reward == "mean" else per_token.sum(1)
        return tokens, length, reward

    (ya, la, ra), (yb, lb, rb) = response(), response()
    a_wins = (ra + c.length_bias * la) >= (rb + c.length_bias * lb)
    flipped = torch.rand(n, generator=g) < flip_rate
    chosen_first = a_wins ^ flipped
    out: dict[str, torch.Tensor] = {"prompt": topic, "flipped": flipped}
    for side, first in (("chosen", chosen_first), ("rejected", ~chosen_first)):
        y = torch.where(first[:, None], ya, yb)
        n_tok = torch.where(first, la, lb)
        reward = torch.where(first, ra, rb)
        ids = torch.full((n, width), PAD, dtype=torch.int64)
        ids[:, : c.prompt_length] = prompt
        ids[:, c.prompt_length : c.prompt_length + c.max_response] = y
        end = c.prompt_length + n_tok
        ids[torch.arange(n), end] = EOS
        pos = torch.arange(width)
        attention = pos[None] <= end[:, None]
        mask = (pos[None] >= c.prompt_length) & attention  # the response and its EOS
        out[f"{side}_ids"] = ids
        out[f"{side}_attention"] = attention.long()
        out[f"{side}_mask"] = mask.float()
        out[f"{side}_steps"] = _response_steps(n_tok, c.steps, width, c.prompt_length)
        out[f"reward_{side}"] = reward
    return out


def _chain_reward(
    valid: torch.Tensor,
    lengths: tuple[int, int],
    prompt: torch.Tensor,
    response: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``reward: chain``: 1 if ``min ≤ n ≤ max`` and every content token is valid at its position, else 0.

    ``valid`` ``[K, P, V]``; ``response`` ``[B, T]`` with its content tokens (``mask`` 1) first.
    """
    positions = valid.shape[1]
    pos = torch.arange(response.shape[1], device=response.device)
    ok = valid[prompt.unsqueeze(1), pos.clamp_max(positions - 1).unsqueeze(0), response].bool() & (
        pos < positions
    )
    content = mask.bool()
    n = content.sum(1)
    chain = (ok | ~content).all(1) & (n >= lengths[0]) & (n <= lengths[1])
    return chain.to(torch.float32)


def _chain_table(
    config: SyntheticPreferencesConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The content tokens of every ``(topic, position)`` in random order ``[K, P, V − 2]`` (the first
    ``chain_valid_tokens`` are ``V[k, t]``) and the validity table ``[K, P, V]``."""
    c = config
    order = torch.rand(c.topics, c.max_response, c.vocab_size - 2, generator=g).argsort(-1) + 2
    valid = torch.zeros(c.topics, c.max_response, c.vocab_size)
    valid.scatter_(2, order[..., : c.chain_valid_tokens], 1.0)
    return order, valid


def _chain_split(
    config: SyntheticPreferencesConfig,
    order: torch.Tensor,
    n: int,
    flip_rate: float,
    g: torch.Generator,
) -> dict[str, torch.Tensor]:
    """``reward: chain`` pairs: a valid chain against an independent chain broken at its pit (module doc)."""
    c, width, m = config, config.prompt_length + config.max_response + 1, config.chain_valid_tokens
    content = torch.arange(2, c.vocab_size)
    topic = torch.randint(0, c.topics, (n,), generator=g)
    prompt = content[torch.randint(0, len(content), (n, c.prompt_length), generator=g)]
    prompt[:, 0] = content[topic]
    pos = torch.arange(c.max_response)
    rows = order[topic]  # [n, P, V − 2]

    def chain(broken: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = torch.randint(c.min_response, c.max_response + 1, (n,), generator=g)
        good = rows.gather(2, torch.randint(0, m, (n, c.max_response, 1), generator=g)).squeeze(2)
        if not broken:
            return torch.where(pos < length[:, None], good, PAD), length, torch.full((n,), -1)
        bad = rows.gather(
            2, torch.randint(m, len(content), (n, c.max_response, 1), generator=g)
        ).squeeze(2)
        if c.chain_tail == "valid":  # only the pit is wrong: the steps after it are valid again
            rest = rows.gather(2, torch.randint(0, m, (n, c.max_response, 1), generator=g)).squeeze(
                2
            )
        else:
            rest = content[torch.randint(0, len(content), (n, c.max_response), generator=g)]
        pit = (torch.rand(n, generator=g) * length).long()  # uniform in 0..n−1
        tokens = torch.where(pos < pit[:, None], good, torch.where(pos == pit[:, None], bad, rest))
        return torch.where(pos < length[:, None], tokens, PAD), length, pit

    (ya, la, pa), (yb, lb, pb) = chain(False), chain(True)
    flipped = torch.rand(n, generator=g) < flip_rate
    out: dict[str, torch.Tensor] = {"prompt": topic, "flipped": flipped}
    for side, first in (("chosen", ~flipped), ("rejected", flipped)):
        y = torch.where(first[:, None], ya, yb)
        n_tok = torch.where(first, la, lb)
        pit = torch.where(first, pa, pb)
        ids = torch.full((n, width), PAD, dtype=torch.int64)
        ids[:, : c.prompt_length] = prompt
        ids[:, c.prompt_length : c.prompt_length + c.max_response] = y
        end = c.prompt_length + n_tok
        ids[torch.arange(n), end] = EOS
        at = torch.arange(width)
        attention = at[None] <= end[:, None]
        mask = (at[None] >= c.prompt_length) & attention
        out[f"{side}_ids"] = ids
        out[f"{side}_attention"] = attention.long()
        out[f"{side}_mask"] = mask.float()
        out[f"{side}_steps"] = _response_steps(n_tok, c.steps, width, c.prompt_length)
        out[f"{side}_pit"] = pit
        out[f"reward_{side}"] = (pit < 0).to(torch.float32)
    return out


@register_dataset("synthetic-preferences", SyntheticPreferencesConfig, task="preference")
def build_synthetic_preferences(
    config: SyntheticPreferencesConfig, seed: int
) -> PreferenceDataModule:
    """Preference pairs over a small vocabulary with a hidden per-token reward (see module doc)."""
    from paperhooks.tasks.datamodule import PreferenceDataModule

    if config.reward == "chain":
        return _build_chain(config, seed)
    u = torch.randn(
        config.topics, config.vocab_size, generator=generator(seed, "preferences.reward")
    )
    u[:, :2] = 0.0  # pad and EOS carry no reward
    train = _synthetic_split(
        config, u, config.n_train, config.flip_rate, generator(seed, "preferences.train")
    )
    val = _synthetic_split(config, u, config.n_val, 0.0, generator(seed, "preferences.val"))
    width = config.prompt_length + config.max_response + 1
    info = DataInfo(
        "preference",
        config.vocab_size,
        (width,),
        sizes=(("vocab_size", config.vocab_size), ("max_length", width)),
    )
    dm = PreferenceDataModule(
        info, DictDataset(train), DictDataset(val), config.batch_size, seed, config.num_workers
    )
    dm.reward_table, dm.reward_kind = u, config.reward
    dm.prompt_length = config.prompt_length
    return dm


def _build_chain(config: SyntheticPreferencesConfig, seed: int) -> PreferenceDataModule:
    from paperhooks.tasks.datamodule import PreferenceDataModule

    order, valid = _chain_table(config, generator(seed, "preferences.chain"))
    train = _chain_split(
        config, order, config.n_train, config.flip_rate, generator(seed, "preferences.train")
    )
    val = _chain_split(config, order, config.n_val, 0.0, generator(seed, "preferences.val"))
    width = config.prompt_length + config.max_response + 1
    info = DataInfo(
        "preference",
        config.vocab_size,
        (width,),
        sizes=(("vocab_size", config.vocab_size), ("max_length", width)),
    )
    dm = PreferenceDataModule(
        info, DictDataset(train), DictDataset(val), config.batch_size, seed, config.num_workers
    )
    dm.reward_table, dm.reward_kind = valid, "chain"
    dm.chain_lengths = (config.min_response, config.max_response)
    dm.prompt_length = config.prompt_length
    return dm


@dataclass(frozen=True)
class TabularPreferencesConfig:
    """``P`` prompts × ``M`` canned responses; every ordered pair of distinct responses."""

    batch_size: int = 16
    num_workers: int = 0
    prompts: int = 4
    responses: int = 4
    preference: Literal["reward", "cyclic"] = "reward"
    flip_rate: float = 0.0

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.prompts >= 1, "prompts", ">= 1", self.prompts)
        check_field(self.responses >= 2, "responses", ">= 2", self.responses)
        check_field(0 <= self.flip_rate < 0.5, "flip_rate", "in [0, 0.5)", self.flip_rate)
        if self.preference == "cyclic":
            check_field(
                self.responses % 2 == 1, "responses", "odd for a cyclic preference", self.responses
            )


def _tabular_split(
    p_matrix: torch.Tensor, r: torch.Tensor, flip_rate: float, g: torch.Generator
) -> dict[str, torch.Tensor]:
    P, M = r.shape
    rows = [
        (p, i, j)
        for p in range(P)
        for i, j in itertools.permutations(range(M), 2)
        if p_matrix[p, i, j] > 0.5
    ]
    prompt, win, lose = (torch.tensor(c, dtype=torch.int64) for c in zip(*rows, strict=True))
    flipped = torch.rand(len(rows), generator=g) < flip_rate
    chosen, rejected = torch.where(flipped, lose, win), torch.where(flipped, win, lose)
    ones = torch.ones(len(rows), 2, dtype=torch.int64)
    mask = torch.tensor([[0.0, 1.0]]).expand(len(rows), 2).clone()
    steps = torch.tensor([[-1, 0]]).expand(len(rows), 2).clone()
    return {
        "prompt": prompt,
        "flipped": flipped,
        "chosen_ids": torch.stack([prompt, chosen], 1),
        "rejected_ids": torch.stack([prompt, rejected], 1),
        "chosen_attention": ones,
        "rejected_attention": ones.clone(),
        "chosen_mask": mask,
        "rejected_mask": mask.clone(),
        "chosen_steps": steps,
        "rejected_steps": steps.clone(),
        "reward_chosen": r[prompt, chosen],
        "reward_rejected": r[prompt, rejected],
    }


@register_dataset("tabular-preferences", TabularPreferencesConfig, task="preference")
def build_tabular_preferences(config: TabularPreferencesConfig, seed: int) -> PreferenceDataModule:
    """The tabular fixture: canned responses per prompt, exact rewards and preferences."""
    from paperhooks.tasks.datamodule import PreferenceDataModule

    P, M = config.prompts, config.responses
    if config.preference == "reward":
        r = torch.randn(P, M, generator=generator(seed, "tabular.reward"))
        p_matrix = (r[:, :, None] > r[:, None, :]).float()
    else:
        r = torch.zeros(P, M)
        diff = (torch.arange(M)[None, :] - torch.arange(M)[:, None]) % M  # (j - i) mod M
        p_matrix = ((diff >= 1) & (diff <= (M - 1) // 2)).float().expand(P, M, M).clone()
    p_matrix = p_matrix + 0.5 * torch.eye(M)
    train = _tabular_split(p_matrix, r, config.flip_rate, generator(seed, "tabular.train"))
    val = _tabular_split(p_matrix, r, 0.0, generator(seed, "tabular.val"))
    info = DataInfo("preference", M, (2,), sizes=(("prompts", P), ("responses", M)))
    dm = PreferenceDataModule(
        info, DictDataset(train), DictDataset(val), config.batch_size, seed, config.num_workers
    )
    dm.reward_table, dm.preference_matrix = r, p_matrix
    return dm


# -- policies -----------------------------------------------------------------------------------


def token_logps_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-probabilities of ``ids`` under next-token ``logits`` ``[B, T, V]``; 0 at t = 0."""
    logits = logits[:, :-1].float()
    picked = logits.gather(2, ids[:, 1:, None]).squeeze(2) - logits.logsumexp(2)
    return F.pad(picked, (1, 0))


class CausalLMPolicy(nn.Module):
    """Wraps a ``transformers`` causal LM: ``forward(ids, attention)`` → per-token log-probs.

    ``forward(..., hidden=True)`` also returns the last hidden states ``[B, T, H]``.
    :meth:`next_logits` gives next-token logits for sampling.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, attention: torch.Tensor, hidden: bool = False):  # type: ignore[override]
        out = self.lm(
            input_ids=ids, attention_mask=attention, output_hidden_states=hidden, use_cache=False
        )
        logps = token_logps_from_logits(out.logits, ids)
        return (logps, out.hidden_states[-1]) if hidden else logps

    def next_logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, -1]


class TabularPolicy(nn.Module):
    """``π(y | p) = softmax(θ_p)_y`` over ``M`` canned responses; ids are ``[prompt, response]``."""

    def __init__(
        self, prompts: int, responses: int, init: str = "uniform", scale: float = 1.0
    ) -> None:
        super().__init__()
        theta = torch.zeros(prompts, responses)
        if init == "random":  # the global RNG, seeded from the recipe like every model's init
            theta = scale * torch.randn(prompts, responses)
        self.theta = nn.Parameter(theta)

    def log_probs(self) -> torch.Tensor:
        """``log π(· | p)`` for every prompt, ``[P, M]``."""
        return self.theta.log_softmax(-1)

    def forward(self, ids: torch.Tensor, attention: torch.Tensor, hidden: bool = False):  # type: ignore[override]
        logps = self.theta.log_softmax(-1)[ids[:, 0], ids[:, 1]]
        out = torch.stack([torch.zeros_like(logps), logps], 1)
        return (out, self.theta[ids[:, 0]].unsqueeze(1).expand(-1, 2, -1)) if hidden else out


@dataclass(frozen=True)
class CausalLMConfig:
    """A small causal LM from a config (random init), or ``pretrained``: a local folder or Hub id.

    ``pretrained`` loads safetensors weights only and never runs remote code; the Hub is read
    through the local cache when offline.

    :ivar max_positions: positions the model can attend over; 0 (default): the data's
        ``max_length`` (prompt + longest response + EOS). Methods that feed longer sequences
        (e.g. a response followed by its revision) need more.
    """

    arch: Literal["gpt2", "llama"] = "gpt2"
    layers: int = 2
    width: int = 64
    heads: int = 2
    pretrained: str | None = None
    max_positions: int = 0

    def __post_init__(self) -> None:
        check_field(self.layers >= 1, "layers", ">= 1", self.layers)
        check_field(
            self.max_positions >= 0,
            "max_positions",
            ">= 0 (0: the data's max_length)",
            self.max_positions,
        )
        check_field(
            self.heads >= 1 and self.width % self.heads == 0,
            "width",
            "a multiple of heads",
            self.width,
        )


@register_model("causal-lm", CausalLMConfig)
def build_causal_lm(config: CausalLMConfig, info: DataInfo) -> nn.Module:
    """A ``transformers`` GPT-2 or Llama causal LM (untied embeddings, no dropout)."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "model causal-lm needs transformers: pip install 'paperhooks[lm]'"
        ) from None

    if info.task != "preference":
        raise ValueError(
            f"model causal-lm needs preference data (token sequences); the data is {info.task}"
        )
    if config.pretrained:
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(
                config.pretrained, use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as e:
            raise ValueError(
                f"model.pretrained {config.pretrained!r}: cannot load a causal LM: {e}"
            ) from None
        vocab = info.size("vocab_size")
        if lm.config.vocab_size < vocab:
            raise ValueError(
                f"model.pretrained has vocab_size {lm.config.vocab_size} < the data's {vocab}"
            )
        return CausalLMPolicy(lm)
    vocab, length = info.size("vocab_size"), info.size("max_length")
    if config.max_positions:
        check_field(
            config.max_positions >= length,
            "max_positions",
            f">= the data's max_length ({length})",
            config.max_positions,
        )
        length = config.max_positions
    if config.arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_positions=length, n_embd=config.width, n_layer=config.layers, n_head=config.heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
            bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
        )  # fmt: skip
        lm = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=config.width, intermediate_size=4 * config.width,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, max_position_embeddings=length,
            tie_word_embeddings=False, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
        )  # fmt: skip
        lm = transformers.LlamaForCausalLM(cfg)
    return CausalLMPolicy(lm)


@dataclass(frozen=True)
class TabularPolicyConfig:
    """Logits ``θ`` ``[P, M]``: zeros (the uniform policy) or ``scale · N(0, 1)``."""

    init: Literal["uniform", "random"] = "uniform"
    scale: float = 1.0


@register_model("tabular-policy", TabularPolicyConfig)
def build_tabular_policy(config: TabularPolicyConfig, info: DataInfo) -> nn.Module:
    """A softmax policy over each prompt's canned responses (for ``tabular-preferences``)."""
    return TabularPolicy(info.size("prompts"), info.size("responses"), config.init, config.scale)


@torch.no_grad()
def sample(
    policy: CausalLMPolicy,
    prompts: torch.Tensor,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample responses after ``prompts`` ``[B, L]`` until EOS or ``max_new_tokens``.

    Returns ``(tokens [B, max_new_tokens], lengths [B])``: content tokens before EOS (PAD
    after), and their number. Pad and EOS are never content; EOS is sampled like any token.
    """
    b = prompts.shape[0]
    ids = prompts
    done = torch.zeros(b, dtype=torch.bool, device=prompts.device)
    out = torch.full((b, max_new_tokens), PAD, dtype=torch.int64, device=prompts.device)
    lengths = torch.zeros(b, dtype=torch.int64, device=prompts.device)
    for t in range(max_new_tokens):
        logits = policy.next_logits(ids, torch.ones_like(ids)) / temperature
        logits[:, PAD] = -float("inf")
        probs = logits.softmax(-1).cpu()
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(prompts.device)
        is_eos = tok == EOS
        take = ~done & ~is_eos
        out[:, t] = torch.where(take, tok, PAD)
        lengths += take.long()
        done |= is_eos
        ids = torch.cat([ids, torch.where(done, EOS, tok)[:, None]], 1)
        if bool(done.all()):
            break
    return out, lengths


__all__ = [
    "EOS",
    "PAD",
    "CausalLMConfig",
    "CausalLMPolicy",
    "PreferenceDataModule",
    "SyntheticPreferencesConfig",
    "TabularPolicy",
    "TabularPolicyConfig",
    "TabularPreferencesConfig",
    "build_causal_lm",
    "build_synthetic_preferences",
    "build_tabular_policy",
    "build_tabular_preferences",
    "sample",
    "token_logps_from_logits",
]
