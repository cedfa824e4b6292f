"""Paper plugins the project knows of, so an uninstalled one gets a ``pip install`` line."""

KNOWN_PLUGINS: frozenset[str] = frozenset(
    """
    loss-reweighting done done-kl-dro-at pgd constrained-rlhf sparse-po pareto-da
    inductive-bias-complexity shrinkmatch ranking-accuracy rerank-curriculum remax
    weight-compander rd-pruning rd-layer-adaptive-pruning presto-ordinal srat awq
    smooth-expert-dd ibcl tangle-nas ofq ofq-statsq-cga mcts-dpo fedau weight-aligning perp
    ln-dpo srpo neur2ro r3-reward fair-subset-selection pst pst-sparsity adamp c3po-moe gm-nas
    d-pruner robust-weight-signatures groupwise-regret simplicity-bias easy-to-hard-prm bone
    bone-block-affine knowpo bignas-sandwich tulu25-recipe stable-rps ldr-loss rfc-bonsai
    frugal-optim rpo rpo-dpo-sft dpa-directional per-step-dpo inductive-bias-metric
    weight-matching-lmc rag-rewardbench robust-dpo aranyani aranyani-fair-forest
    vas-value-sampling lima-attribution amcl-contrastive inpo inpo-nash more more-reward dsee
    dsee-sparse-lowrank ctrl-u ctrl-u-uncertainty dpa-rag learn-to-actively-learn febs
    fairseg-febs drm-domain-heads dpo-3d dpo-3d-reg rich-lazy-metrics a2pr-offline-rl
    kernel-balancing kernel-balancing-ips sara sara-sparse-adapt ponita learngene-sws
    sparse-model-soups
    """.split()
)
