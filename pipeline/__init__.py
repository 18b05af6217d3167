"""What the pipeline does: read and validate a corpus, encode it, compress it, commit it."""
