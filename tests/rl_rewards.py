"""Reward functions the RL tests load by `module:function`, as users do (tests/ is on sys.path under pytest)."""

TARGET = "e"


def target_fraction(prompt, response, answer=None, **_):
    """Fraction of the response's characters that are the target character: rises as the policy learns to
    write it, whatever the tokenizer merges it into."""
    return response.count(TARGET) / max(len(response), 1)


NOT_A_FUNCTION = 3


def wrong_signature(text):
    return 0.0


def returns_text(prompt, response, answer=None):
    return "high"


def response_chars(prompt, response, answer=None, **_):
    """A second reward to weigh against the first: the response's length in tens of characters."""
    return len(response) / 10


def flat_for_odd_prompts(prompt, response, answer=None, **_):
    """target_fraction for prompts of even length, 0 for the others: their groups carry no signal."""
    return 0.0 if len(prompt) % 2 else target_fraction(prompt, response)
