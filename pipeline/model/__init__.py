"""Model stage: the model spec resolved once, tokenisation, the input component (lower layers), the guard, DPR."""
