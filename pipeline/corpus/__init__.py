"""Corpus stage: the split plan, the sources each format is read from, row validation, samples, duplicate ids."""
