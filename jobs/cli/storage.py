"""Commands that price or measure bytes per token: estimate, report, fidelity."""
from __future__ import annotations

import json

from jobs.cli import options as o
from pipeline.job_requests import ESTIMATE_KEYS, EstimateRequest
from pipeline.schema import CHOICES, ConfigError


def cmd_estimate(a) -> int:
    body = o.request(a, ESTIMATE_KEYS)
    body["prices"] = dict(_price(item) for item in a.price or [])
    return estimate_and_report(EstimateRequest.from_mapping(body), a.json)


def _price(item: str) -> tuple[str, float]:
    name, _, value = item.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise ConfigError(f"--price {item!r}: expected NAME=DOLLARS_PER_GB_MONTH") from None


def estimate_and_report(req: EstimateRequest, as_json: bool) -> int:
    """The storage estimate of a request (CLI flags or `jobs.storage`'s YAML), as a table or JSON."""
    from pipeline.job_requests import storage_estimate
    from storage.estimate import at_paper_settings, monthly_cost, paper_figures, render

    prices = req.price_table()
    e = storage_estimate(req)
    if not as_json:
        print(render(e, prices))
        return 0
    body = e.to_dict()
    body["monthly_cost_usd"] = {k: monthly_cost(e.total, v) for k, v in prices.items()}
    # the paper's figures are 32M passages x 150 tokens: held against any other corpus they compare nothing
    body["paper_check"] = [{"label": c.label, "bytes": c.bytes, "TiB": c.bytes / 2**40, "GiB": c.bytes / 2**30,
                            "TB": c.bytes / 1e12, "paper": c.paper_says, "verdict": c.verdict}
                           for c in paper_figures(req.passages, e.assumptions.tokens_per_passage)
                           ] if at_paper_settings(e.assumptions) else []
    print(json.dumps(body, indent=1))
    return 0


def add_estimate(sub) -> None:
    d = EstimateRequest  # the defaults a YAML job gets too
    es = o.command(sub, "estimate", cmd_estimate,
                   "storage estimate of every file a run writes, monthly cost, and (at the paper's 32M x 150 "
                   "tokens) the paper's figures checked")
    es.add_argument("--passages", type=int, default=d.passages)
    es.add_argument("--tokens-per-passage", type=float, default=d.tokens_per_passage)
    es.add_argument("--hidden", type=int, default=d.hidden)
    o.add_codec(es)
    es.add_argument("--bits", type=float, default=d.bits, help="2..8 quantised, 16 = float16")
    es.add_argument("--bitpacked", action="store_true", help="k-bit codes packed densely (default: int8 containers)")
    es.add_argument("--zstd-ratio", type=float, default=None, help="raw/stored code bytes (default: measured with "
                    "--sample-corpus, else what a real 768-wide store measured at this bit width: 1.147 at 8 bits, "
                    "1.0 for PQ or bit-packed codes)")
    es.add_argument("--sample-corpus", default=None, help="measure tokens/passage (and the zstd ratio) on this corpus")
    o.add_corpus_options(es)
    o.add_column_map(es)
    es.add_argument("--sample-size", type=int, default=d.sample_size,
                    help=f"passages of --sample-corpus tokenised for tokens/passage (default {d.sample_size})")
    es.add_argument("--zstd-sample-size", type=int, default=d.zstd_sample_size,
                    help=f"of those, passages encoded to measure the zstd ratio (default {d.zstd_sample_size})")
    es.add_argument("--model", default=d.model, help="model for --sample-corpus measurements")
    es.add_argument("--layers", type=int, default=d.layers)
    es.add_argument("--scale-bytes", type=float, default=d.scale_bytes)
    es.add_argument("--token-id-bytes", type=float, default=d.token_id_bytes,
                    help=f"stored token ids per token, as Parquet writes them (default {d.token_id_bytes:g}, measured)")
    es.add_argument("--per-passage-bytes", type=float, default=d.per_passage_bytes,
                    help=f"id, content hash, n_tokens per passage (default {d.per_passage_bytes:g}, measured)")
    es.add_argument("--container-overhead", type=float, default=d.container_overhead,
                    help="further container bytes as a fraction of the states data (default 0: the Parquet "
                    "footers are priced per passage, as measured)")
    es.add_argument("--dpr-dim", type=int, default=d.dpr_dim, help="DPR embedding dims stored beside (0 = none)")
    es.add_argument("--index-factory", default=d.index_factory,
                    help=f"FAISS factory of the DPR index, priced from its layout (default {d.index_factory}, the "
                    "run's; none = no index)")
    es.add_argument("--index-bytes-per-vector", type=float, default=d.index_bytes_per_vector,
                    help="FAISS index bytes per vector, all in (overrides --index-factory's model)")
    es.add_argument("--price", action="append", metavar="TIER=USD", help="add or override a $/GB-month price")
    es.add_argument("--json", action="store_true")


def cmd_report(a) -> int:
    from pipeline.codec.rate_distortion import PQFamily, ResidualFamily, plot_png, sweep_corpus
    from pipeline.model.encoder import pick_device
    from storage.fs import redact_url, write_url

    model = o.model_cfg(a)
    dims_list = o.int_list(a.dims, "--dims") or None
    bits_list = [int(v) if v == int(v) else v for v in o.number_list(a.bits, "--bits")]
    pq_m = o.int_list(a.pq_m, "--pq-m")
    variants = tuple(v for v in a.pq_variants.split(",") if v)
    if set(variants) - {"pq", "opq"}:
        raise ConfigError(f"--pq-variants {a.pq_variants!r}: a comma list of pq, opq")
    pq = PQFamily(tuple(pq_m), variants, a.pq_dims) if pq_m and variants else None
    reference = o.dims_bits(a.reference, "--reference") if a.reference else None
    res_m = tuple(o.int_list(a.residual_pq_m, "--residual-pq-m"))
    res_linear = tuple(o.dims_bits(v, "--residual-linear") for v in (a.residual_linear or "").split(",") if v.strip())
    residual = ResidualFamily(res_m, res_linear) if res_m or res_linear else None
    rd = sweep_corpus(model, o.corpus(a), dims_list, bits_list, a.fit_sample, a.sample, a.seed,
                      a.zstd_level, pick_device(a.device), pq=pq, reference=reference, residual=residual)
    report = rd.render()
    out = a.out_dir.rstrip("/")
    write_url(f"{out}/rate_distortion.md", report.encode())
    write_url(f"{out}/rate_distortion.json", json.dumps([p.to_dict() for p in rd.points], indent=1).encode())
    write_url(f"{out}/rate_distortion.png", plot_png(
        rd.points, f"{model.name.split('/')[-1]}, lower {model.layers} layers, {rd.eval_passages} held-out passages"))
    print(report)
    print(f"wrote {redact_url(out)}/rate_distortion.md, .json, .png")
    return 0


def add_report(sub) -> None:
    rp = o.command(sub, "report", cmd_report, "rate-distortion table + PNG: bytes per token vs fidelity (real text)",
                   sections=(o.add_corpus, o.add_model))
    rp.add_argument("--dims", default=None, help="comma list (default: hidden/4 .. hidden)")
    rp.add_argument("--bits", default="4,5,5.25,5.5,6,8,16", help="comma list; 16 = float16, fractional = levels")
    rp.add_argument("--fit-sample", type=int, default=512)
    rp.add_argument("--sample", type=int, default=200, help="held-out passages to measure")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--zstd-level", type=int, default=3)
    rp.add_argument("--pq-m", default="16,32,48,64,96", help="product-quantiser family: sub-quantiser counts to fit "
                    "(comma list; each must divide the stored dims; empty = skip the family)")
    rp.add_argument("--pq-variants", default="opq", help="comma list of pq (plain) and opq (learned rotation)")
    rp.add_argument("--pq-dims", type=int, default=None, help="project to these dims before PQ (default: raw states)")
    rp.add_argument("--residual-pq-m", default="", help="OPQ on the residual after the static-embedding prediction: "
                    "sub-quantiser counts = code bytes per token (comma list, e.g. 4,8,16,32; empty = skip)")
    rp.add_argument("--residual-linear", default="", help="the linear codec on the residual: DIMS:BITS comma list "
                    "(e.g. 96:8,48:5.25; 16 bits = float16; empty = skip)")
    rp.add_argument("--reference", default=None, help="DIMS:BITS of the linear setting the other families are priced "
                    "against (default hidden/4 : 5.25, i.e. 37 levels)")
    o.add_device(rp)
    rp.add_argument("--out-dir", default="report")


def cmd_fidelity(a) -> int:
    from pipeline.codec.fitting import fidelity_on_corpus
    from pipeline.codec.state_codec import codec_from_bytes
    from pipeline.model.encoder import pick_device
    from storage.fs import Location, read_url, redact_url, write_url

    where = redact_url(a.compressor)
    data = read_url(Location("compressor", a.compressor,
                             o.storage_options(a.compressor_storage_options, "--compressor-storage-options")))
    model = o.model_cfg(a)
    modes = [("none", 16), ("int8", a.bits)] if a.quantize == "both" else [(a.quantize, a.bits)]
    codecs: dict[str, tuple] = {}
    for q, bits in modes:  # quantisation settings complete a linear codec; other codecs ignore them
        codec = codec_from_bytes(data, where, q, bits)
        codecs.setdefault(json.dumps(codec.fingerprint_fields(), sort_keys=True), (codec.describe(), codec))
    rows, measured, excluded = fidelity_on_corpus(model, o.corpus(a), list(codecs.values()), a.sample,
                                                  pick_device(a.device))
    print(f"fidelity of {where}, layers {model.layers}+ upper, on {measured} held-out passages (excluded {excluded} "
          f"used for fitting)")
    print(f"{'B/token':>8} {'token cos':>10} {'p05':>8} {'pooled':>8} {'state rel err':>14}  codec")
    for r in rows:
        print(f"{r['bytes_per_token_raw']:>8} {r['token_cosine']:>10.4f} {r['token_cosine_p05']:>8.4f} "
              f"{r['pooled_cosine']:>8.4f} {r['state_rel_error']:>14.4f}  {r['codec']}")
    if a.json:
        write_url(a.json, json.dumps(rows, indent=1).encode())
    return 0


def add_fidelity(sub) -> None:
    d = o.command(sub, "fidelity", cmd_fidelity, "upper layers on decompressed vs original states, held-out passages",
                  sections=(o.add_corpus, o.add_model))
    d.add_argument("--compressor", required=True, help="codec file (from fit-compressor, or a store's artifacts/)")
    d.add_argument("--compressor-storage-options", default=None, help="fsspec options for --compressor, as JSON")
    d.add_argument("--sample", type=int, default=200, help="held-out passages to measure (default 200)")
    d.add_argument("--quantize", default="both", choices=("both", *CHOICES["quantize"]),
                   help="linear codec: measure float16, int8 codes, or both (PQ codecs ignore it)")
    d.add_argument("--bits", type=float, default=8)
    o.add_device(d)
    d.add_argument("--json", default=None, help="also write the figures as JSON")
