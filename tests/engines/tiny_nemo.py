"""Tiny random-weight NeMo models built offline in seconds: the real loading, streaming and export code
runs on them. Their text is meaningless; tests assert structure, determinism and agreement.

Shapes follow Parakeet and Canary (FastConformer encoder, dw_striding x8 subsampling) at d_model 64.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest

SAMPLE_RATE = 16000
TEXT = """the quick brown fox jumps over the lazy dog
hello world this is a tiny speech recognition test
streaming speech to text server with partial results
one two three four five six seven eight nine ten
parakeet and canary are nemo speech models
a tiny model that says nothing useful at all
good morning good evening good night
""".strip().splitlines()
CANARY_LANGUAGES = ("en", "es", "de", "fr")


def require(module: str, extra: str) -> None:
    """Skip when an optional engine package is missing (scripts/test.sh installs them all)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'streamscribe[{extra}]')")


def train_tokenizer(folder: Path, vocab_size: int = 64) -> Path:
    """A SentencePiece BPE model in the layout ``tokenizer: {dir, type: bpe}`` reads."""
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "text.txt"
    corpus.write_text("\n".join(TEXT * 3) + "\n")
    create_spt_model(
        data_file=str(corpus),
        vocab_size=vocab_size,
        sample_size=-1,
        do_lower_case=True,
        tokenizer_type="bpe",
        output_dir=str(folder),
    )
    return folder


def preprocessor() -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": SAMPLE_RATE,
        "normalize": "per_feature",
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": 80,
        "n_fft": 512,
        "frame_splicing": 1,
        "dither": 0.0,
        "pad_to": 0,
    }


def fastconformer(d_model: int = 64) -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 80,
        "feat_out": -1,
        "n_layers": 2,
        "d_model": d_model,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": 32,
        "causal_downsampling": False,
        "ff_expansion_factor": 2,
        "self_attention_model": "rel_pos",
        "n_heads": 2,
        "att_context_size": [-1, -1],
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "dropout": 0.0,
        "dropout_pre_encoder": 0.0,
        "dropout_emb": 0.0,
        "dropout_att": 0.0,
    }


def tdt_config(tokenizer: Path) -> dict[str, Any]:
    durations = [0, 1, 2, 3, 4]
    return {
        "sample_rate": SAMPLE_RATE,
        "compute_eval_loss": False,
        "log_prediction": False,
        "model_defaults": {
            "enc_hidden": 64,
            "pred_hidden": 64,
            "joint_hidden": 64,
            "tdt_durations": durations,
        },
        "tokenizer": {"dir": str(tokenizer), "type": "bpe"},
        "preprocessor": preprocessor(),
        "spec_augment": None,
        "encoder": fastconformer(),
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {"pred_hidden": 64, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.0},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "fused_batch_size": 4,
            "jointnet": {"joint_hidden": 64, "activation": "relu", "dropout": 0.0},
            "num_extra_outputs": len(durations),  # TDT duration logits
        },
        "decoding": {
            "strategy": "greedy_batch",
            "model_type": "tdt",
            "durations": durations,
            "greedy": {"max_symbols": 10},
        },
        "loss": {
            "loss_name": "tdt",
            "tdt_kwargs": {
                "fastemit_lambda": 0.0,
                "clamp": -1.0,
                "durations": durations,
                "sigma": 0.02,
                "omega": 0.1,
            },
        },
        "optim": {"name": "adamw", "lr": 1e-3},
    }


def cache_aware_tdt_config(tokenizer: Path) -> dict[str, Any]:
    """As NeMo's fastconformer_transducer_bpe_streaming: chunked_limited attention, causal convolutions."""
    config = copy.deepcopy(tdt_config(tokenizer))
    config["encoder"].update(
        {
            "att_context_size": [[70, 13], [70, 6], [70, 1], [70, 0]],
            "att_context_style": "chunked_limited",
            "att_context_probs": None,
            "conv_context_size": "causal",
            "causal_downsampling": True,
            "conv_norm_type": "layer_norm",
        }
    )
    return config


def ctc_config(tokenizer: Path) -> dict[str, Any]:
    return {
        "sample_rate": SAMPLE_RATE,
        "log_prediction": False,
        "ctc_reduction": "mean_volume",
        "tokenizer": {"dir": str(tokenizer), "type": "bpe"},
        "preprocessor": preprocessor(),
        "spec_augment": None,
        "encoder": fastconformer(),
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": None,
            "num_classes": -1,
            "vocabulary": [],
        },
        "decoding": {"strategy": "greedy_batch"},
        "optim": {"name": "adamw", "lr": 1e-3},
    }


def canary_config(work: Path) -> dict[str, Any]:
    """Canary-1B layout: an aggregate tokenizer (special tokens + one SentencePiece model per language)."""
    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer

    CanaryTokenizer.build_special_tokenizer(
        ["translate", "transcribe", *CANARY_LANGUAGES], str(work / "tok_canary_spl"), force_rebuild=False
    )
    for language in CANARY_LANGUAGES:
        train_tokenizer(work / f"tok_canary_{language}", vocab_size=48)
    transformer = {
        "hidden_size": 64,
        "inner_size": 256,
        "num_attention_heads": 2,
        "ffn_dropout": 0.0,
        "attn_score_dropout": 0.0,
        "attn_layer_dropout": 0.0,
        "pre_ln": True,
    }
    return {
        "sample_rate": SAMPLE_RATE,
        "label_smoothing": 0.0,
        "context_len_for_AR_decoding": 5,
        "log_prediction": False,
        "prompt_format": "canary",
        "model_defaults": {"asr_enc_hidden": 64, "lm_enc_hidden": 64, "lm_dec_hidden": 64},
        "tokenizer": {
            "dir": None,
            "type": "agg",
            "langs": {
                "spl_tokens": {"dir": str(work / "tok_canary_spl"), "type": "bpe"},
                **{
                    lang: {"dir": str(work / f"tok_canary_{lang}"), "type": "bpe"}
                    for lang in CANARY_LANGUAGES
                },
            },
            "custom_tokenizer": {
                "_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer",
                "tokenizer": None,
            },
        },
        "preprocessor": {**preprocessor(), "log": True, "pad_value": 0.0},
        "spec_augment": None,
        "encoder": {**fastconformer(), "xscaling": False},
        "transf_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 0,
            "mask_future": False,
            "pre_ln_final_layer_norm": True,
            **transformer,
        },
        "transf_decoder": {
            # Hydra logs "Error getting class ... get_nemo_transformer": harmless (as in NVIDIA's config).
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "model_name": None,
            "pretrained": False,
            "encoder": None,
            "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": 128,
                "num_token_types": 0,
                "embedding_dropout": 0.0,
                "learn_positional_encodings": False,
                "num_layers": 2,
                "hidden_act": "relu",
                "vocab_size": None,
                **transformer,
            },
        },
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1,
            "activation": "relu",
            "log_softmax": True,
            "hidden_size": 64,
            "num_classes": None,
            "dropout": 0.0,
            "use_transformer_init": True,
        },
        "decoding": {
            "strategy": "beam",
            "return_best_hypothesis": True,
            "beam": {"beam_size": 1, "len_pen": 0.0, "max_generation_delta": 20},
        },
        "loss": {
            "_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
            "label_smoothing": 0.0,
            "pad_id": None,
        },
        "optim": {"name": "adamw", "lr": 3e-4},
    }


def build_tiny_models(work: Path) -> dict[str, Path]:
    """Write tiny_{tdt,ctc,tdt_cache,canary}.nemo into ``work``; returns kind -> file."""
    import torch
    from nemo.collections.asr.models import EncDecCTCModelBPE, EncDecMultiTaskModel, EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(work / "tok_bpe")
    builders = {
        "tdt": lambda: EncDecRNNTBPEModel(cfg=OmegaConf.create(tdt_config(tokenizer))),
        "ctc": lambda: EncDecCTCModelBPE(cfg=OmegaConf.create(ctc_config(tokenizer))),
        "tdt_cache": lambda: EncDecRNNTBPEModel(cfg=OmegaConf.create(cache_aware_tdt_config(tokenizer))),
        "canary": lambda: EncDecMultiTaskModel(cfg=OmegaConf.create(canary_config(work))),
    }
    files: dict[str, Path] = {}
    for kind, build in builders.items():
        torch.manual_seed(0)
        model = build().eval()
        files[kind] = work / f"tiny_{kind}.nemo"
        model.save_to(str(files[kind]))
    return files
