"""How many positions go through the LM head at once: the one rule of every chunked head loop
(objectives/forward.py) and of the estimator's logits term (estimate/counting.py). Imports nothing, so the
estimator reads it without loading torch.

A chunk holds at most CHUNK_LOGITS logits per head, so the [tokens x vocab] tensor never exists whole:
vocabularies over 32k get fewer rows (Llama-3's 128k: 523), and a loss that runs two heads on the same rows
(distillation: student and teacher) gets half as many.
"""

CHUNK_ROWS = 2048
CHUNK_LOGITS = 2048 * 32768


def head_chunk_rows(vocab: int, heads: int = 1) -> int:
    """Rows per chunk for a head of `vocab` outputs, `heads` heads run side by side."""
    return max(1, min(CHUNK_ROWS, CHUNK_LOGITS // vocab) // heads)
