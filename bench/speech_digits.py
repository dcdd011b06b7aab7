"""Spoken digits (issue #34): a speech recogniser trained on four speakers of the Free Spoken Digit
Dataset, tested on the fifth (an unseen voice), against a baseline in the same run.

    python bench/speech_digits.py --out runs/speech            # test speaker nicolas, 8 minutes
    python bench/speech_digits.py --test-speaker george --minutes 4

The recogniser is ``lmforge finetune --task transcribe`` on a manifest of the 2,000 training
recordings (the transcript is the digit's English word): log-Mel frames at 8 kHz, a conv subsampler
and transformer encoder, prefix fusion into a small decoder that writes the word. The baseline is a
logistic regression on each recording's mean and standard deviation of log-Mel bands (scikit-learn)
on the same split. Reported: digit accuracy on the unseen speaker (the transcript must be the word
exactly), word error rate, the batch-1 real-time factor of ``lm.transcribe`` and training throughput.
The checkpoint is left in ``DIR/speech`` (``LanguageModel.load(DIR/speech).transcribe(path)``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from arithmetic_tasks import cpu_flags
from tasklib import DATA, need, run_finetune, setup_logging, write_json

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FSDD = DATA / "fsdd"
MEDIA = {"sample_rate": 8000, "max_seconds": 1.25, "n_fft": 200, "hop_length": 80, "n_mels": 40,
         "width": 128, "n_layer": 3, "n_head": 4, "augment": True}


def recordings() -> list[dict[str, str]]:
    with open(FSDD / "metadata.csv", newline="", encoding="utf-8") as f:
        return [{"audio": str(FSDD / "recordings" / row["file"]), "text": WORDS[int(row["digit"])],
                 "speaker": row["speaker"]} for row in csv.DictReader(f)]


def write_manifest(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps({"audio": r["audio"], "text": r["text"]}) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def baseline_accuracy(train: list[dict], test: list[dict]) -> float:
    """Logistic regression on per-recording mean and std of the log-Mel bands."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lmforge.data.media import load_audio
    from lmforge.models.multimodal.audio_features import LogMelSpectrogram

    mel = LogMelSpectrogram(8000, 200, 80, 40)

    def features(rows: list[dict]) -> torch.Tensor:
        out = []
        for row in rows:
            spec = mel(load_audio(row["audio"], 8000))[0]  # (40, frames)
            out.append(torch.cat([spec.mean(1), spec.std(1)]))
        return torch.stack(out).numpy()

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(features(train), [r["text"] for r in train])
    predictions = classifier.predict(features(test))
    return float(sum(p == r["text"] for p, r in zip(predictions, test)) / len(test))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/speech-digits")
    parser.add_argument("--test-speaker", default="nicolas")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    need(FSDD / "metadata.csv")
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = recordings()
    test = [r for r in rows if r["speaker"] == args.test_speaker]
    train = [r for r in rows if r["speaker"] != args.test_speaker]
    if not test:
        raise SystemExit(f"error: no recordings of speaker {args.test_speaker!r}")
    # 1 in 10 training recordings is the validation set (for the checkpoint choice); the test speaker never is
    val, fit = train[::10], [r for i, r in enumerate(train) if i % 10]

    from lmforge.api import LanguageModel
    from lmforge.evaluation.metrics import word_error_rate
    from lmforge.tokenizer import Tokenizer

    Tokenizer.train(iter(WORDS), "char").save(out / "tokenizer")
    options = {"task": "transcribe", "tokenizer": str(out / "tokenizer"), "out": str(out / "run"),
               "model": {"preset": "gpt2-tiny", "n_embd": 128, "n_head": 4, "n_layer": 2, "block_size": 64},
               "media": MEDIA,
               "data": {"path": write_manifest(out / "train.jsonl", fit),
                        "val_path": write_manifest(out / "val.jsonl", val)},
               "train": {"max_time": args.minutes * 60, "max_steps": None, "batch_size": 32, "lr": 2e-3,
                         "warmup_steps": 50, "eval_interval": 100, "eval_windows": 200, "final_eval_windows": None,
                         "best_metric": "exact_match", "device": "cpu", "progress": False, "seed": 0}}
    result, seconds = run_finetune(options)
    steps = result.step
    checkpoint = result.best_checkpoint or result.final_checkpoint
    target = out / "speech"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(checkpoint, target)

    lm = LanguageModel.load(target, device="cpu")
    start = time.perf_counter()
    predictions = lm.transcribe([r["audio"] for r in test])
    batch_seconds = time.perf_counter() - start
    accuracy = sum(p.strip() == r["text"] for p, r in zip(predictions, test)) / len(test)
    wer = word_error_rate(predictions, [r["text"] for r in test])
    audio_seconds, single_seconds = 0.0, 0.0
    import soundfile

    for r in test[:100]:  # batch-1 real-time factor
        audio_seconds += soundfile.info(r["audio"]).duration
        start = time.perf_counter()
        lm.transcribe(r["audio"])
        single_seconds += time.perf_counter() - start
    baseline = baseline_accuracy(fit, test)
    result_json = {
        "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(), "test_speaker": args.test_speaker,
        "train_recordings": len(fit), "val_recordings": len(val), "test_recordings": len(test),
        "train_seconds": round(seconds, 1), "train_steps": steps,
        "train_samples_per_sec": round(steps * 32 / seconds, 1) if steps else None,
        "digit_accuracy": accuracy, "wer": wer, "baseline_logreg_accuracy": baseline,
        "batch_transcribe_seconds": round(batch_seconds, 2),
        "realtime_factor_batch1": round(audio_seconds / single_seconds, 1),
        "checkpoint": str(target)}
    write_json(str(out / "results.json"), result_json)
    print(json.dumps(result_json, indent=2))
    print(f"unseen speaker {args.test_speaker}: digit accuracy {accuracy:.3f} (baseline {baseline:.3f}), "
          f"WER {wer:.3f}; batch-1 {result_json['realtime_factor_batch1']}x faster than real time "
          f"(CPU: {result_json['cpu_flags']}, {result_json['torch_threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
