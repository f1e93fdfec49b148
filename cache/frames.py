"""The store's frame axes: S segments x K candidate frames per clip, and which candidate
evaluation reads. Training, evaluation and extract agree on it through this module, so
stage two needs no decoding code to know it."""


def middle_candidate(candidates: int) -> int:
    """The candidate used at evaluation: the middle one (for odd K, the segment's middle frame;
    for even K, the first candidate after the middle)."""
    return candidates // 2
