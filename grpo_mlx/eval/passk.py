"""pass@k and maj@k: the arithmetic of `grpo-mlx eval` over K samples per problem. Pure Python, no MLX."""

from __future__ import annotations

from ..rewards.answers import same_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: the chance that k of the n samples, drawn
    without replacement, include at least one of the c correct ones.

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) so large
    n never forms a binomial coefficient (Chen et al. 2021, Fig. 3).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def k_values(num_samples: int) -> list[int]:
    """The k to report pass@k for: powers of two below num_samples, and num_samples itself."""
    ks, k = [], 1
    while k < num_samples:
        ks.append(k)
        k *= 2
    return ks + [num_samples]


def majority_vote(answers: list[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample gives an answer.

    Answers are grouped with `same_answer`; the largest group wins, a tie goes to
    the group whose first member comes first, and the winning index is that first
    member. None (no answer extracted) does not vote.
    """
    groups: list[list[int]] = []  # sample indices, in order of each group's first appearance
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        group = next((g for g in groups if same_answer(answers[g[0]], answer)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    if not groups:
        return None
    best = max(groups, key=len)  # max keeps the first of equally large groups
    return best[0]
