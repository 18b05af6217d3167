"""Codec stage: how a token state becomes stored bytes and back (projection, quantisation, PQ, side information,
zstd frames), how a codec is fitted, and what it costs the reader (rate-distortion)."""
