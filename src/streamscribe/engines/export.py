"""Turning a ``.nemo`` checkpoint into the folders the onnx and mlx Parakeet variants load.

    python -m streamscribe.engines.export onnx parakeet-tdt-0.6b-v2.nemo ./parakeet-onnx
    python -m streamscribe.engines.export mlx  parakeet-tdt-0.6b-v2.nemo ./parakeet-mlx

Both need NeMo (``streamscribe[nemo]``); the MLX conversion also needs ``safetensors`` (a NeMo dependency).
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np


def export_onnx(nemo_path: Path, folder: Path) -> Path:
    """Write onnx-asr's layout: encoder-model.onnx + decoder_joint-model.onnx (CTC: model.onnx),
    vocab.txt ("<token> <id>" per line, blank last as <blk>) and config.json."""
    from streamscribe.engines.nemo import load_nemo_model

    model = load_nemo_model(str(nemo_path), "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    model.export(str(folder / "model.onnx"))  # transducers: encoder-model.onnx + decoder_joint-model.onnx
    is_ctc = not hasattr(model, "joint")
    vocabulary = list(model.decoder.vocabulary if is_ctc else model.joint.vocabulary)
    with open(folder / "vocab.txt", "w", encoding="utf8") as vocab:
        for index, token in enumerate([*vocabulary, "<blk>"]):
            vocab.write(f"{token} {index}\n")
    is_tdt = str(model.cfg.get("loss", {}).get("loss_name", "")) == "tdt"
    model_type = (
        "nemo-conformer-ctc" if is_ctc else ("nemo-conformer-tdt" if is_tdt else "nemo-conformer-rnnt")
    )
    config = {
        "model_type": model_type,
        "features_size": int(model.cfg.preprocessor.features),
        "subsampling_factor": int(model.cfg.encoder.subsampling_factor),
        "max_tokens_per_step": 10,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def export_mlx(nemo_path: Path, folder: Path) -> Path:
    """Write parakeet-mlx's layout: config.json (the NeMo config) + model.safetensors (channels-last)."""
    import torch
    import yaml
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(nemo_path) as archive:
        members = {Path(name).name: name for name in archive.getnames()}
        config_file = archive.extractfile(members["model_config.yaml"])
        weights_file = archive.extractfile(members["model_weights.ckpt"])
        assert config_file is not None and weights_file is not None
        config = yaml.safe_load(config_file)
        state: dict[str, Any] = torch.load(weights_file, map_location="cpu", weights_only=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))

    tensors: dict[str, np.ndarray] = {}
    lstm_biases: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.startswith("preprocessor.") or key.endswith("num_batches_tracked"):
            continue  # parakeet-mlx computes its own mel filterbank and window
        array = value.float().numpy()
        # NeMo's joint net is [activation, Dropout, Linear] with dropout > 0 (real Parakeet), but
        # [activation, Linear] with dropout 0; parakeet-mlx always reads the Linear at index 2.
        if key.startswith("joint.joint_net.1."):
            key = key.replace("joint.joint_net.1.", "joint.joint_net.2.")
        lstm = re.match(r"(.*\.lstm)\.(weight|bias)_(ih|hh)_l(\d+)$", key)
        if lstm:  # torch LSTM -> mlx.nn.LSTM: same gate order, Wx/Wh, one summed bias
            base, kind, which, layer = lstm.groups()
            name = f"{base}.{layer}"
            if kind == "weight":
                tensors[f"{name}.{'Wx' if which == 'ih' else 'Wh'}"] = array
            else:
                lstm_biases[name] = lstm_biases.get(name, 0) + array
            continue
        if array.ndim == 4:  # Conv2d [out, in, h, w] -> [out, h, w, in]
            array = array.transpose(0, 2, 3, 1)
        elif array.ndim == 3:  # Conv1d [out, in, k] -> [out, k, in]
            array = array.transpose(0, 2, 1)
        tensors[key] = np.ascontiguousarray(array)
    for name, bias in lstm_biases.items():
        tensors[f"{name}.bias"] = bias
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamscribe.engines.export", description=__doc__)
    parser.add_argument("target", choices=["onnx", "mlx"])
    parser.add_argument("nemo_file", type=Path)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    export = export_onnx if args.target == "onnx" else export_mlx
    print(export(args.nemo_file, args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
