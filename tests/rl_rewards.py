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
