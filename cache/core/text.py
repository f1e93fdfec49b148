"""Ordering names the way people read them."""

import re


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: "frame2.jpg" < "frame10.jpg"."""
    # re.split with a group alternates text and digit runs: odd positions are the numbers.
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", name))]
