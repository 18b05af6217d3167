"""The input component (lower N layers of a HF encoder), run on length-sorted token-budget batches.

Only d-dimensional codes leave the device: projection and quantisation happen next to the model.
"""
from __future__ import annotations

import inspect
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel

from pipeline.codec.state_codec import Codec
from pipeline.config import ATTENTION_CHOICES, ConfigError, ModelConfig
from pipeline.model.guard import Probe, require_match
from pipeline.codec.side_info import SideInfo
from pipeline.model.packed_attention import PackedBatch, PackedLowerLayers, packed_unsupported, token_index, varlen_available

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda asked for, but torch sees no GPU")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per forward pass: small on CPU (cache-friendly, measured best at 4096 here),
    large on GPU to fill the device."""
    return 65536 if device.type == "cuda" else 4096


def token_budget_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Group indices (longest first) so each batch's padded size, count x max length, fits `budget`."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < order.size:
        longest = int(lengths[order[start]])
        count = max(1, budget // max(longest, 1))
        batches.append(order[start:start + count])
        start += count
    return batches


def _layer_owner(model) -> tuple[torch.nn.Module, str]:
    """The module holding the layer stack, and its attribute name (e.g. `model.encoder`, "layer")."""
    for path in ("encoder.layer", "transformer.layer", "layers"):
        *parents, attr = path.split(".")
        obj = model
        try:
            for part in parents:
                obj = getattr(obj, part)
            if isinstance(getattr(obj, attr), torch.nn.ModuleList):
                return obj, attr
        except AttributeError:
            continue
    raise ConfigError(f"{type(model).__name__}: no encoder layer stack found (supported: BERT, ELECTRA, "
                      f"RoBERTa, MPNet, DeBERTa-style models with .encoder.layer)")


def architecture(model) -> str:
    """How an error names a model's architecture: its class and config model_type."""
    return f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')})"


class LayeredEncoder:
    """The model's own forward over any contiguous range of its layers.

    Not bare layers: whatever a model computes once and hands to every layer (MPNet's relative
    position bias, DeBERTa's relative embeddings, the attention mask in the model's own format) is
    computed by the model's forward. The layer stack is cut to the range for the call; a range that
    starts above layer 0 feeds the given states to its first layer (a forward pre-hook), so the
    model's embeddings output is only used for its shape. `pipeline.model.guard` compares both
    against the model's full forward before any work."""

    def __init__(self, model_cfg: ModelConfig, device: torch.device, keep_upper: bool = False, model=None,
                 config=None):
        """`model`: an already loaded base model (e.g. the encoder inside a QA checkpoint) instead of loading one.
        `config`: its HF config as the driver read it (`pipeline.model.spec.Checkpoint`), so only weights are read.
        `keep_upper=False` drops the upper layers once the input component has been checked."""
        self.device = device
        self.dtype = compute_dtype(device)
        if model is None:
            model = AutoModel.from_pretrained(model_cfg.path, revision=model_cfg.revision, dtype=self.dtype,
                                              config=config)
        model.eval().requires_grad_(False)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # states only: the pooler is never used and would cost a matmul per call
        self.model = model.to(device)
        self.name = model_cfg.name
        self.architecture = architecture(model)
        self._owner, self._attr = _layer_owner(model)
        self.all_layers = list(getattr(self._owner, self._attr))
        self.total_layers = len(self.all_layers)
        if model_cfg.layers > self.total_layers:
            raise ConfigError(f"--layers {model_cfg.layers}: {model_cfg.name} has only {self.total_layers} layers")
        if model_cfg.layers < 1:
            raise ConfigError(f"--layers {model_cfg.layers}: the input component is at least one layer")
        self.n_lower = model_cfg.layers
        self.keep_upper = keep_upper
        self.embeddings = model.embeddings
        # ELECTRA with embedding_size != hidden_size maps embeddings up before the first layer.
        self.embeddings_project = getattr(model, "embeddings_project", None)
        self.packed_unsupported = packed_unsupported(model)
        self.hidden = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)
        self.type_vocab_size = int(getattr(model.config, "type_vocab_size", 1) or 1)
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        params = inspect.signature(model.forward).parameters
        self.takes_token_types = self.type_vocab_size > 1 and "token_type_ids" in params
        self.probe = Probe.build(self.vocab_size, self.type_vocab_size,
                                 getattr(model.config, "max_position_embeddings", None), self.pad_id, device)
        self.probe_reference = self._check_against_model()
        self.drop_upper()

    def _check_against_model(self) -> torch.Tensor:
        """The guard: lower (and, kept, upper) layers as this class runs them against the model's own
        full forward on a probe batch. Returns the reference `hidden_states[N]` for other paths' checks."""
        p = self.probe
        ref = self.full_forward(p.input_ids, p.token_type_ids, p.attention_mask)
        n, top = self.n_lower, self.total_layers
        named = {"model": self.name, "architecture": self.architecture}
        require_match(self.embed_and_lower(p.input_ids, p.token_type_ids, p.attention_mask), ref[n],
                      p.attention_mask, what=f"its lower {n} layers as the pipeline runs them",
                      reference=f"hidden_states[{n}]", **named)
        if self.keep_upper and n < top:
            require_match(self.run_layers(ref[n], p.attention_mask, n, top), ref[top], p.attention_mask,
                          what=f"its upper layers {n + 1}-{top} run on given states",
                          reference="last hidden state", **named)
        return ref[n]

    @property
    def layers(self) -> list:
        """The layers this encoder can still run (the lower ones only, once `drop_upper` ran)."""
        return self.all_layers

    def drop_upper(self) -> None:
        """Free the upper layers when only the input component will run (encode actors)."""
        if not self.keep_upper:
            self.all_layers = self.all_layers[:self.n_lower]
            setattr(self._owner, self._attr, torch.nn.ModuleList(self.all_layers))

    @contextmanager
    def _range(self, start: int, stop: int, states: torch.Tensor | None = None):
        """The model's layer stack cut to [start, stop); `states` replace the first layer's input."""
        if stop > len(self.all_layers):
            raise ConfigError("upper layers were not loaded (keep_upper=False)")
        full = getattr(self._owner, self._attr)
        chosen = self.all_layers[start:stop]
        hook = None
        if states is not None:
            def feed(module, args, kwargs):
                if args:
                    return (states,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": states}
            hook = chosen[0].register_forward_pre_hook(feed, with_kwargs=True)
        setattr(self._owner, self._attr, torch.nn.ModuleList(chosen))
        # DeBERTa-v2 applies its convolution after the stack's first layer only: not after a later one.
        conv = getattr(self._owner, "conv", None) if start > 0 else None
        if conv is not None:
            self._owner.conv = None
        try:
            yield
        finally:
            setattr(self._owner, self._attr, full)
            if conv is not None:
                self._owner.conv = conv
            if hook is not None:
                hook.remove()

    def forward_inputs(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                       attention_mask: torch.Tensor) -> dict:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return kwargs

    @torch.inference_mode()
    def full_forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's own forward over all its layers: (embeddings, layer 1, ..., layer L) states."""
        if len(self.all_layers) < self.total_layers:
            raise ConfigError("upper layers were not loaded (keep_upper=False)")
        out = self.model(**self.forward_inputs(input_ids, token_type_ids, attention_mask), output_hidden_states=True)
        if getattr(out, "hidden_states", None) is None or len(out.hidden_states) != self.total_layers + 1:
            raise ConfigError(f"model {self.name} ({self.architecture}) does not return one hidden state per layer: "
                              f"its input component cannot be checked, so it is refused")
        return tuple(out.hidden_states)

    @torch.inference_mode()
    def embed_and_lower(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        with self._range(0, self.n_lower):
            out = self.model(**self.forward_inputs(input_ids, token_type_ids, attention_mask))
        return out.last_hidden_state

    @torch.inference_mode()
    def run_layers(self, h: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers [start, stop) of the model's forward on states `h` [B, L, hidden] (positions 0..L-1)."""
        if start >= stop:
            return h
        ids = torch.full(attention_mask.shape, self.pad_id, dtype=torch.long, device=h.device)
        with self._range(start, stop, h):
            out = self.model(input_ids=ids, attention_mask=attention_mask)
        return out.last_hidden_state


@dataclass
class EncodedTokens:
    """A shard's codes, flat: passage i's tokens are rows offsets[i]:offsets[i+1], in input order."""
    codes: np.ndarray               # [T, width] in the codec's layout
    scales: np.ndarray | None       # [T] float16, for a codec whose layout is scaled
    offsets: np.ndarray             # [n + 1] int64
    seconds: float
    tokens: int
    padded_tokens: int              # tokens the forward passes computed (= tokens when packed)


@dataclass
class EncodedShard:
    codes: list[np.ndarray]        # per passage: [n_tokens, width] in the codec's layout
    scales: list[np.ndarray] | None  # per passage [n_tokens] float16, for a codec whose layout is scaled
    seconds: float
    tokens: int
    padded_tokens: int


def pad_batch(seqs: list[np.ndarray], types: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    return pad_flat(np.concatenate(seqs), np.concatenate(types), lengths, pad_id, device)


def pad_flat(ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, pad_id: int,
             device) -> tuple[torch.Tensor, ...]:
    """`pad_batch` for tokens laid end to end (vectorised): [B, max len] ids, types, attention mask."""
    rows, width = lengths.size, int(lengths.max())
    valid = np.arange(width)[None, :] < lengths[:, None]
    out_ids = np.full((rows, width), pad_id, dtype=np.int64)
    out_types = np.zeros((rows, width), dtype=np.int64)
    out_ids[valid] = ids  # row-major order of `valid` is the passages end to end
    out_types[valid] = types
    as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return as_t(out_ids), as_t(out_types), as_t(valid.astype(np.int64))


class HostCopies:
    """Device -> host copies that overlap the next batch's compute.

    On CUDA each result is copied into pinned memory on the compute stream and an event is recorded;
    the host waits for batch k's copy only after batch k+1 has been queued. On CPU a result is ready
    at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple] = []

    def put(self, tensors: tuple, payload) -> list[tuple]:
        """Queue one batch's result tensors; returns the batches now on the host as (arrays, payload)."""
        if not self.cuda:
            return [(tuple(t.numpy() if t is not None else None for t in tensors), payload)]
        hosts = []
        for t in tensors:
            if t is None:
                hosts.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            hosts.append(host)
        event = torch.cuda.Event(blocking=True)  # the host sleeps on it rather than spinning a core
        event.record()
        self.pending.append((event, hosts, payload))
        return self._ready(keep=1)

    def drain(self) -> list[tuple]:
        return self._ready(keep=0)

    def _ready(self, keep: int) -> list[tuple]:
        done = []
        while len(self.pending) > keep:
            event, hosts, payload = self.pending.pop(0)
            event.synchronize()
            done.append((tuple(h.numpy() if h is not None else None for h in hosts), payload))
        return done


def resolve_attention(requested: str, encoder: LayeredEncoder) -> str:
    """The attention path to run: `mask` (the model's own forward, cut to the lower layers, on padded
    batches: any architecture the guard accepts) or `packed` (pipeline.model.packed_attention: BERT/ELECTRA)."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(f"attention={requested!r}: one of {', '.join(ATTENTION_CHOICES)}")
    if requested == "mask":
        return "mask"
    if encoder.packed_unsupported:
        if requested == "packed":
            raise ConfigError(f"attention=packed: not for this model: {encoder.packed_unsupported}")
        return "mask"
    return "packed"


class InputComponent:
    """The lower N layers on the path this process will run them (packed or masked, this device's
    dtype), checked against the model's own forward when built: [T, hidden] states of real tokens.

    `attention`: `packed` runs unpadded batches (varlen flash attention on CUDA), `mask` the model's own
    forward on padded batches; `auto` is packed wherever the model allows it."""

    def __init__(self, model_cfg: ModelConfig, device: torch.device, pad_id: int = 0, attention: str = "auto",
                 compile: bool = False, config=None):
        self.encoder = LayeredEncoder(model_cfg, device, config=config)
        self.device, self.dtype, self.hidden = device, self.encoder.dtype, self.encoder.hidden
        self.pad_id = pad_id
        self.attention = resolve_attention(attention, self.encoder)
        self.packed = None
        if self.attention == "packed":
            kernel = "varlen" if varlen_available(device) else "padded"
            enc = self.encoder
            self.packed = PackedLowerLayers(enc.embeddings, enc.embeddings_project, enc.layers[:enc.n_lower],
                                            enc.type_vocab_size, kernel, compile)
        elif compile and attention == "mask":
            raise ConfigError("compile needs the packed attention path (attention=packed or auto)")
        elif compile:
            log.warning("compile skipped: %s runs the masked path (%s)", model_cfg.name,
                        self.encoder.packed_unsupported)
        self.kernel = self.packed.kernel if self.packed is not None else "sdpa-mask"
        self._check_path()

    def _check_path(self) -> None:
        """The guard for the path this process runs: the probe's states must be the model's own
        `hidden_states[N]` (LayeredEncoder checked its forward against it)."""
        p, enc = self.encoder.probe, self.encoder
        keep = p.attention_mask.bool()
        lengths = p.attention_mask.sum(1).cpu().numpy()
        got, _ = self(p.input_ids[keep].cpu().numpy(), p.token_type_ids[keep].cpu().numpy(), lengths)
        ref = enc.probe_reference[keep]
        self.check_error = require_match(got[None], ref[None], torch.ones(1, ref.shape[0], device=ref.device), model=enc.name,
                      architecture=enc.architecture, reference=f"hidden_states[{enc.n_lower}]",
                      what=f"the lower {enc.n_lower} layers on the {self.attention} path ({self.kernel}, {enc.dtype})")

    def __call__(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, int]:
        """One batch (tokens end to end) -> [T, hidden] lower-layer states of its real tokens, and the
        tokens computed."""
        with torch.inference_mode():
            if self.packed is not None:
                return self.packed(PackedBatch.build(ids, types, lengths, self.device)), int(lengths.sum())
            i, t, am = pad_flat(ids, types, lengths, self.pad_id, self.device)
            return self.encoder.embed_and_lower(i, t, am)[am.bool()], i.numel()


class ShardEncoder:
    """The input component -> the codec's encoder, all on the device; returns codes for real tokens only.

    The codec also gets the batch's token ids and lengths (side information a codec may predict from)."""

    def __init__(self, model_cfg: ModelConfig, codec: Codec, token_budget: int | None, device: torch.device,
                 pad_id: int = 0, attention: str = "auto", compile: bool = False, config=None):
        """`config`: the checkpoint's HF config as the driver read it (`Checkpoint.hf_config`), or None to read it."""
        self.lower = InputComponent(model_cfg, device, pad_id, attention, compile, config)
        if codec.hidden != self.lower.hidden:
            raise ConfigError(f"the codec expects hidden size {codec.hidden}, "
                              f"model {model_cfg.name} has {self.lower.hidden}")
        self.encode_states = codec.encoder(device, self.lower.dtype)
        self.scaled = codec.layout.scaled
        self.token_budget = token_budget or default_token_budget(device)
        self.attention, self.kernel = self.lower.attention, self.lower.kernel
        log.info("encoder: attention %s (%s), token budget %d, compile %s, %s", self.attention, self.kernel,
                 self.token_budget, compile, self.lower.dtype)

    def encode_flat(self, ids: np.ndarray, types: np.ndarray, offsets: np.ndarray) -> EncodedTokens:
        """Passages as flat token arrays plus offsets (Arrow's list layout) -> flat codes, same offsets."""
        t0 = time.perf_counter()
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.size == 0:
            raise ValueError("offsets: n + 1 entries for n passages (at least [0])")
        lengths = np.diff(offsets)
        total = int(offsets[-1] - offsets[0])
        codes = scales = None
        padded = 0
        copies = HostCopies(self.lower.device)

        def place(done):
            nonlocal codes, scales
            for (q, s), rows in done:
                if codes is None:
                    codes = np.empty((total,) + q.shape[1:], dtype=q.dtype)
                    scales = np.empty(total, dtype=s.dtype) if s is not None else None
                codes[rows - offsets[0]] = q
                if scales is not None:
                    scales[rows - offsets[0]] = s

        for batch in token_budget_batches(lengths, self.token_budget):
            rows = token_index(offsets, batch)
            with torch.inference_mode():
                h, computed = self.lower(ids[rows], types[rows], lengths[batch])
                padded += computed
                q, s = self.encode_states(h, SideInfo(ids[rows], lengths[batch]))
            place(copies.put((q, s), rows))
        place(copies.drain())
        if codes is None:  # no passages
            codes = np.zeros((0, 0), np.int8)
        return EncodedTokens(codes=codes, scales=scales, offsets=offsets - offsets[0], seconds=time.perf_counter() - t0, tokens=total, padded_tokens=padded)

    def encode(self, input_ids: list[np.ndarray], token_types: list[np.ndarray]) -> EncodedShard:
        """Per-passage arrays in, per-passage codes out (views into one flat result)."""
        lengths = np.fromiter((len(s) for s in input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
        flat = self.encode_flat(cat(input_ids), cat(token_types), offsets)
        cut = offsets[1:-1]
        return EncodedShard(codes=np.split(flat.codes, cut),
                            scales=np.split(flat.scales, cut) if flat.scales is not None else None,
                            seconds=flat.seconds, tokens=flat.tokens, padded_tokens=flat.padded_tokens)


def model_revision(model_cfg: ModelConfig) -> str:
    """Pin what was run: the given revision, or a digest of a local checkpoint's files."""
    import hashlib
    import os

    path = model_cfg.path
    if not os.path.isdir(path):
        if model_cfg.revision is None:
            log.warning("model %s has no --model-revision pinned; recording 'main'", model_cfg.name)
        return model_cfg.revision or "main"
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin", ".json", ".txt")):
            with open(os.path.join(path, name), "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
    return f"local-sha256:{h.hexdigest()[:16]}"
