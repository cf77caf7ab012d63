"""What the tests share: the sizes of the tiny synthetic corpus (conftest builds it), the entries of its copy with
bad clips that are no files, and tiny randomly initialised audio encoders of every backbone family, saved with
``save_pretrained`` next to their feature extractors."""

import os
import subprocess
import sys
from pathlib import Path

TINY = {"dev_machines": ("ToyCar", "valve"), "eval_machines": ("ToyPet",), "train_source": 12,
        "train_target": 4, "test_per_cell": 5, "supplemental": 1, "seconds": 2.0, "seed": 7}

# Entries of corpus_with_bad_clips that are named like clips but are no files: {file name: words of its reason}.
NOT_FILES = {"section_00_source_test_normal_0902_spd_99_mic_1.wav": "a directory named like a clip",
             "section_00_source_test_normal_0903_spd_99_mic_1.wav": "broken symbolic link",
             "section_00_source_train_normal_0902_spd_99_mic_1.wav": "a directory named like a clip",
             "section_00_source_train_normal_0903_spd_99_mic_1.wav": "broken symbolic link"}


class WritesAMarker:
    """Unpickling this calls open(marker, "w"): the code a checkpoint file from elsewhere could run when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.open, (self.marker, "w")


def entries_named_like_clips(root) -> int:
    """Every entry under ``root`` named *.wav, whatever it is (file, directory, dangling link)."""
    return sum(1 for _, dirs, files in os.walk(root) for name in dirs + files if name.lower().endswith(".wav"))


# The backbone families by model_type (asd_ray.models.encoders.FAMILIES); the spectrogram ones use 1 s windows.
FAMILIES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio", "audio-spectrogram-transformer", "whisper", "clap",
            "clap_audio_model")
WAVEFORM_FAMILIES = FAMILIES[:4]

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, layerdrop=0.0)
# CLAP's HTSAT tower: 32 mel bands folded twice into a 64 x 64 image, three stages (16, 32, 64 wide) as the real
# one's stages differ in width; its extractor makes 1 s windows at 48 kHz.
_CLAP_AUDIO = dict(spec_size=64, num_mel_bins=32, patch_size=4, patch_stride=4, window_size=4, depths=[1, 1, 1],
                   num_attention_heads=[2, 2, 2], patch_embeds_hidden_size=16, hidden_size=64, projection_dim=16)


def save_tiny_encoder(family: str, path) -> None:
    """A randomly initialised 2-layer (CLAP: 3-stage) model of ``family`` and its feature extractor, in ``path``."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    conv = dict(conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    if family == "hubert":  # GroupNorm feature encoder, as HuBERT-Base
        model, extractor = tf.HubertModel(tf.HubertConfig(**_SMALL, **conv)), None
    elif family == "wav2vec2":  # GroupNorm feature encoder; its extractor standardises each clip
        model = tf.Wav2Vec2Model(tf.Wav2Vec2Config(**_SMALL, **conv))
        extractor = tf.Wav2Vec2FeatureExtractor(do_normalize=True)
    elif family == "wavlm":
        model = tf.WavLMModel(tf.WavLMConfig(**_SMALL, **conv, num_buckets=32, max_bucket_distance=100))
        extractor = tf.Wav2Vec2FeatureExtractor(do_normalize=False)
    elif family == "data2vec-audio":  # LayerNorm feature encoder, a stack of positional convolutions
        model = tf.Data2VecAudioModel(tf.Data2VecAudioConfig(
            **_SMALL, conv_dim=(32,) * 7, conv_pos_kernel_size=5, num_conv_pos_embeddings=3,
            num_conv_pos_embedding_groups=4))
        extractor = tf.Wav2Vec2FeatureExtractor(do_normalize=True)
    elif family == "audio-spectrogram-transformer":
        model = tf.ASTModel(tf.ASTConfig(**{k: v for k, v in _SMALL.items() if k != "layerdrop"}, max_length=100))
        extractor = tf.ASTFeatureExtractor(max_length=100)
    elif family == "whisper":
        model = tf.WhisperModel(tf.WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
            decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50,
            max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1))
        extractor = tf.WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    elif family in ("clap", "clap_audio_model"):
        model = (tf.ClapModel(tf.ClapConfig(audio_config=_CLAP_AUDIO, projection_dim=16, text_config=dict(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            projection_dim=16))) if family == "clap" else tf.ClapAudioModel(tf.ClapAudioConfig(**_CLAP_AUDIO)))
        extractor = tf.ClapFeatureExtractor(feature_size=32, max_length_s=1, truncation="rand_trunc",
                                            padding="repeatpad")
    else:
        raise ValueError(f"no tiny {family}")
    model.save_pretrained(path)
    if extractor is not None:
        extractor.save_pretrained(path)


def fault_run_settings(init: str, store: Path, name: str | None) -> list[str]:
    """The fine-tuning run the fault test injects its fault into (test_node_loss's node loss) and the unbroken run it
    is compared with (the session's ``unbroken_finetune``): 2 workers over every machine's train clips of
    ``corpus_with_bad_clips``, a checkpoint every 3 steps, all kept; ``name`` None leaves the run's name to the
    command. Resources are not in it: each run sets its own, and the weights depend neither on them (one torch
    thread per worker) nor on the name."""
    return [f"finetune.init={init}", "finetune.workers=2", "finetune.epochs=2", "finetune.batch_size=4",
            "finetune.crop_seconds=1.0", "finetune.lr=1e-3", "finetune.warmup_steps=2", "finetune.checkpoint_every=3",
            "finetune.keep_checkpoints=100", "finetune.max_failures=2", "finetune.heldout_clips=4",
            f"finetune.storage_path={store}", *([f"finetune.name={name}"] if name else [])]


def command_env() -> dict[str, str]:
    """The environment of an ``asd-ray`` command a test starts: this process's (as conftest set it up), throwaway,
    without token auth, and without ``RAY_ADDRESS``: the command starts a Ray of its own as a user's does
    (``ensure_ray``: its CPUs, no dashboard, resource plans refused before anything starts), whatever else runs on
    this machine. ``RAY_ADDRESS=local`` took the path of a command joining a cluster instead."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def asd_ray(*args, timeout: float = 400) -> subprocess.CompletedProcess:
    """``asd-ray args`` in a process of its own (``command_env``), run by this interpreter; fails unless it exits 0.
    -> the finished process, its stdout and stderr."""
    done = subprocess.run([sys.executable, "-m", "asd_ray.cli", *map(str, args)], env=command_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done
