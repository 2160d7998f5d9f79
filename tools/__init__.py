"""Repository tools that are not part of the rotserve wheel (run them from a checkout)."""
