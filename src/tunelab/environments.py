"""Environments for multi-turn GRPO (`grpo.environment: tunelab.environments:Calculator`), in TRL's
environment_factory contract (objectives/multiturn.py): reset(**row), public methods as tools, optional
get_reward(). Pure Python: nothing here imports torch or the rest of tunelab.
"""

from __future__ import annotations

import re


class Calculator:
    """Tools for the demo's task families (tunelab.tasks): each one computes what its family asks, so a policy that
    learns to call the right tool and copy its result answers correctly. The answer is scored from the last turn's
    text by a reward source (e.g. tunelab.tasks:correctness_reward); the environment keeps no reward of its own."""

    def reset(self, **row) -> None:
        self.calls = 0

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls += 1
        return int(a) + int(b)

    def reverse(self, word: str) -> str:
        """Reverse a word, letter by letter.

        Args:
            word: The word to reverse.
        """
        self.calls += 1
        return str(word)[::-1]

    def sort_numbers(self, numbers: list[int]) -> str:
        """Sort numbers in increasing order; the result is the numbers separated by spaces.

        Args:
            numbers: The numbers to sort.
        """
        self.calls += 1
        return " ".join(str(n) for n in sorted(int(x) for x in numbers))

    def uppercase(self, word: str) -> str:
        """Write a word in capital letters.

        Args:
            word: The word.
        """
        self.calls += 1
        return str(word).upper()

    def lookup(self, facts: str, key: str) -> str:
        """Find the value of a key in facts written as "a=1, b=2".

        Args:
            facts: The facts, key=value pairs separated by commas.
            key: The key to look up.
        """
        self.calls += 1
        pairs = dict(part.strip().split("=", 1) for part in str(facts).split(",") if "=" in part)
        return pairs.get(str(key).strip(), f"no fact for {key!r}")


# The tool call that answers each task family's prompt (tunelab.tasks), read back out of the prompt's text
_CALLS = [
    (re.compile(r"What is (\d+) \+ (\d+)\?"), lambda m: ("add", {"a": int(m[1]), "b": int(m[2])})),
    (re.compile(r"Reverse the word: (\w+)"), lambda m: ("reverse", {"word": m[1]})),
    (re.compile(r"Sort these numbers: ([\d ]+)"),
     lambda m: ("sort_numbers", {"numbers": [int(x) for x in m[1].split()]})),
    (re.compile(r"Uppercase: (\w+)"), lambda m: ("uppercase", {"word": m[1]})),
    (re.compile(r"Given (.*)\. What is (\w+)\?"), lambda m: ("lookup", {"facts": m[1], "key": m[2]})),
]


def calculator_call(prompt: str) -> dict | None:
    """The Calculator call {"name", "arguments"} that answers a tunelab.tasks prompt; None for any other text."""
    for pattern, call in _CALLS:
        match = pattern.search(prompt)
        if match:
            name, arguments = call(match)
            return {"name": name, "arguments": arguments}
    return None


def tool_conversation(prompt: str, call: dict) -> list[dict]:
    """A tool-use trajectory for SFT in the chat format: the user's prompt, the assistant's `call`, the Calculator's
    real result for it, and that result as the answer (a wrong call gives a wrong answer, as it would in a rollout)."""
    env = Calculator()
    env.reset()
    result = getattr(env, call["name"])(**call["arguments"])
    result = result if isinstance(result, str) else str(result)
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": result}]


class GuessTheNumber:
    """A deterministic text game: the number is the row's `answer` (an integer from 1 to 100, or 37); each
    guess(n) answers higher / lower / correct, and get_reward() is 1 when it was found, minus 0.1 per extra guess."""

    def reset(self, answer=None, **row) -> str:
        self.secret = int(answer) if str(answer).lstrip("-").isdigit() else 37
        self.guesses, self.found = 0, False
        return "I am thinking of a number from 1 to 100. Call guess to try one."

    def guess(self, number: int) -> str:
        """Guess the number.

        Args:
            number: The guess, from 1 to 100.
        """
        self.guesses += 1
        if int(number) == self.secret:
            self.found = True
            return "correct"
        return "higher" if int(number) < self.secret else "lower"

    def get_reward(self) -> float:
        return max(1.0 - 0.1 * (self.guesses - 1), 0.0) if self.found else 0.0
