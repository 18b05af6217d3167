"""What a store holds against what the model itself computes: the check a user can run on any store.

For each passage id, the states `StateReader.get` returns (decoded codes) are compared with the
model's own `hidden_states[N]` from its HF forward on the same token ids (the passage alone), token by
token. With an identity codec in float16 they agree to ~1e-3; with a projection the gap is the codec's
loss. (Before the guard, MPNet stores read 0.58 mean token cosine here: the relative position bias was
dropped.)

    python -m benchmarks.stored_vs_model --store /tmp/mp/store --ids 1,2,3,50,100 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform

import numpy as np
import torch
from transformers import AutoModel

from benchmarks.proc import start_benchmark
from pipeline.config import ModelConfig, resolve_model
from pipeline.serve.state_reader import StateReader
from pipeline.model.tokenizer import PairTokenizer
from storage.errors import PrecomputeError
from storage.fs import Store

log = logging.getLogger("stored_vs_model")


def compare(store_url: str, ids: list[int]) -> dict:
    reader = StateReader(Store(store_url))
    fp = reader.manifest.fingerprint
    path = resolve_model(fp["model"])
    layers = int(fp["layers"])
    model = AutoModel.from_pretrained(path).eval()
    takes_types = (getattr(model.config, "type_vocab_size", 0) or 0) > 1
    tok = PairTokenizer(ModelConfig(name=path, layers=layers), 10_000).tok
    got = reader.get(ids)
    rows = []
    for pid in ids:
        if pid not in got:
            raise SystemExit(f"stored_vs_model: id {pid} is not in the store")
        stored = got[pid]
        t = torch.as_tensor(stored.token_ids.astype(np.int64))[None]
        kwargs = {"input_ids": t}
        if takes_types:  # segment ids from the [SEP] after the title, as the pair tokenizer made them
            sep = int(np.flatnonzero(stored.token_ids == tok.sep_token_id)[0])
            kwargs["token_type_ids"] = (torch.arange(t.shape[1]) > sep).long()[None]
        with torch.no_grad():
            ref = model(**kwargs, output_hidden_states=True).hidden_states[layers][0].numpy()
        cos = np.sum(stored.states * ref, -1) / (np.linalg.norm(stored.states, axis=-1) * np.linalg.norm(ref, axis=-1))
        rows.append({"id": pid, "tokens": int(len(ref)), "mean_token_cosine": float(cos.mean()),
                     "min_token_cosine": float(cos.min()),
                     "relative_error": float(np.linalg.norm(stored.states - ref) / np.linalg.norm(ref))})
    return {"store": store_url, "model": fp["model"], "layers": layers, "codec": reader.codec.describe(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "passages": rows,
            "mean_token_cosine": float(np.mean([r["mean_token_cosine"] for r in rows]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--ids", default="1,2,3,50,100", help="comma list of passage ids")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    start_benchmark()
    try:
        ids = [int(x) for x in args.ids.split(",") if x.strip()]
    except ValueError:
        p.error(f"--ids {args.ids!r}: a comma list of integers")
    if not ids:
        p.error("--ids: at least one id")
    try:
        out = compare(args.store, ids)
    except PrecomputeError as exc:  # no version, damaged files, a refused codec: one line, the CLI's exit code
        log.error("%s", exc)
        return exc.exit_code
    for r in out["passages"]:
        print(f"id {r['id']:>6}: {r['tokens']:>4} tokens, mean token cosine {r['mean_token_cosine']:.4f}, "
              f"min {r['min_token_cosine']:.4f}, relative error {r['relative_error']:.4f}")
    print(f"{out['codec']}: mean token cosine {out['mean_token_cosine']:.4f} to the model's own hidden_states[{out['layers']}]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
