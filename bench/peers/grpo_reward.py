"""The GRPO benchmark's reward, one function called through each tool's convention: the share of letters that
are "e" (cheap, deterministic, varies within a group, so every group has an advantage to learn from)."""


def e_share(text: str) -> float:
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c == "e" for c in letters) / max(len(letters), 1)


def tunelab_reward(prompt, response, answer=None) -> float:  # tunelab: grpo.reward_function, once per response
    return e_share(response)


def trl_reward(completions, **kwargs) -> list[float]:  # TRL: reward_funcs, once per batch
    return [e_share(c) for c in completions]
