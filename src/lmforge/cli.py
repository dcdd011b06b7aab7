"""``lmforge <command>``: one thin function per command, each calling the documented Python API.

Errors a user can cause print one line ``error: ...`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.cli_alignment import add_alignment_commands
from lmforge.cli_parsing import Formatter, Parser, Subcommands
from lmforge.cli_parsing import add_checkpoint as _add_checkpoint
from lmforge.cli_parsing import add_config_options as _add_config_options
from lmforge.cli_parsing import command as _command
from lmforge.cli_parsing import run_config as _run_config
from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError
from lmforge.version import __version__

log = logging.getLogger("lmforge")


# ----------------------------------------------------------------------------------- commands
def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from lmforge.data.sources import expand_inputs, iter_texts
    from lmforge.tokenizer import Tokenizer

    files = expand_inputs(args.input)
    characters = 0  # of non-blank text read (a byte-level BPE has its 256 byte tokens even without any)

    def texts() -> Iterator[str]:
        nonlocal characters
        for text in iter_texts(files, args.text_field):
            characters += len(text.strip())
            yield text

    tokenizer = Tokenizer.train(texts(), kind=args.kind, vocab_size=args.vocab_size,
                                show_progress=sys.stderr.isatty())
    if not characters:
        raise DataError(f"the input ({len(files)} file(s)) holds no text to train a tokenizer on")
    tokenizer.save(args.out)
    print(f"trained a {args.kind} tokenizer with {tokenizer.vocab_size:,} tokens on {len(files)} file(s)")
    print(f"saved to {Path(args.out) / 'tokenizer.json'}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.shards import prepare

    meta = prepare(args.input, args.tokenizer, args.out, args.val_fraction, args.text_field,
                   progress=not args.quiet)
    verb = "already prepared (inputs and tokenizer unchanged)" if meta["reused"] else "prepared"
    print(f"{verb}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}) "
          f"in {args.out}")


def _pretrain_config(args: argparse.Namespace) -> Any:
    from lmforge.config import PretrainConfig

    config, values = _run_config(args, PretrainConfig, "pretrain", ("model",))
    model_given = bool(config.model.preset) or "model" in values
    if config.init and model_given:
        raise ConfigError("--init continues pretraining a checkpoint with its own architecture; drop --model and "
                          "the 'model:' section")
    if not config.init and not model_given:
        raise ConfigError("no model: give --model PRESET (see 'lmforge presets') or a 'model:' section, or --init "
                          "CHECKPOINT to continue pretraining one")
    return config


def cmd_pretrain(args: argparse.Namespace) -> int | None:
    from lmforge.recipes.pretrain import adopt_initial_model, check_inputs, pretrain
    from lmforge.training.distributed import launch

    config = _pretrain_config(args)
    adopt_initial_model(config)
    config.validate()
    if config.nproc > 1 and "RANK" not in os.environ:  # launch the workers; they run the branch below
        check_inputs(config)
        return launch(config.nproc, args.argv)
    result = pretrain(config)
    if os.environ.get("RANK", "0") == "0":
        metrics = result.metrics
        print(f"trained {result.step:,} steps ({result.tokens:,} tokens) in {result.elapsed:.1f} s; "
              f"val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f}")
        print(f"run directory: {result.run_dir}  (config.yaml, metrics.jsonl, tensorboard/, loss.png)")
        print(f"checkpoints:   {result.final_checkpoint} (last), {result.best_checkpoint} (best val loss)")
        print(f"next: lmforge generate {result.run_dir} --prompt \"...\"")
    return None


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmforge.config import FinetuneConfig
    from lmforge.recipes.finetune import finetune, resolve_task

    config, _ = _run_config(args, FinetuneConfig, "finetune", ("data", "model"))
    result = finetune(config)
    metrics = result.metrics
    task = resolve_task(config)
    if task == "sft":
        scores = f"response loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f}"
    else:
        scores = ", ".join(f"{name.removeprefix('val_')} {value:.4f}" for name, value in metrics.items()
                           if name.startswith("val_"))
    print(f"trained {result.step:,} steps ({result.tokens:,} tokens) in {result.elapsed:.1f} s; held-out {scores}")
    print(f"run directory: {result.run_dir}  (config.yaml, metrics.jsonl, tensorboard/, loss.png)")
    best = "loss" if config.train.best_metric == "loss" else config.train.best_metric
    print(f"checkpoints:   {result.final_checkpoint} (last), {result.best_checkpoint} (best held-out {best})")
    if config.lora.enabled:
        print(f"LoRA adapters only; fold them into full weights with: lmforge merge-lora {result.best_checkpoint} OUT")
    next_step = {"sft": f"lmforge chat {result.run_dir}",
                 "classification": f"lmforge eval {result.run_dir} --task classification --data FILE",
                 "qa": f"lmforge eval {result.run_dir} --task qa --data FILE",
                 "seq2seq": f"lmforge generate {result.run_dir} --prompt \"...\""}
    print(f"next: {next_step[task]}")


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from lmforge.models.lora import has_lora, merge_lora
    from lmforge.training.checkpoint import load_model, resolve_checkpoint, save_checkpoint

    source = resolve_checkpoint(args.checkpoint)
    model, tokenizer, info = load_model(source)
    if not has_lora(model):
        raise ConfigError(f"{source} has no LoRA adapters to merge")
    merge_lora(model)
    keep = {k: v for k, v in info.items() if k not in ("format", "lmforge_version", "family", "model", "lora", "base")}
    out = save_checkpoint(args.out, model, tokenizer, info={**keep, "merged_from": str(source.resolve())})
    print(f"wrote a full checkpoint with the adapters merged to {out}")


def cmd_average(args: argparse.Namespace) -> None:
    from lmforge.training.averaging import average_checkpoints, last_checkpoints

    if args.last is not None:
        if len(args.checkpoints) != 1:
            raise ConfigError("--last N takes one run directory, not a list of checkpoints")
        if args.last < 1:
            raise ConfigError(f"--last must be at least 1, not {args.last}")
        sources = last_checkpoints(args.checkpoints[0], args.last)
    else:
        sources = [Path(p) for p in args.checkpoints]
    out = average_checkpoints(sources, args.out)
    print(f"wrote the mean of {len(sources)} checkpoints ({', '.join(p.name for p in sources)}) to {out}")


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.api import LanguageModel
    from lmforge.chat import chat_loop

    options = _sampling_options(args)
    lm = LanguageModel.load(args.checkpoint, device=args.device, dtype=args.dtype)
    chat_loop(lm, options, system=args.system)


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.evaluation.options import CLI_OPTIONS
    from lmforge.evaluation.suite import main_eval

    options = {option.name: getattr(args, option.name) for option in CLI_OPTIONS}
    options.update(_sampling_options(args, skip=("num_samples",)))  # --num-samples is the diversity task's
    return main_eval(_checkpoints(args), task=args.task, data=args.data, suite=args.suite, limit=args.limit,
                     out=args.out, device=args.device, dtype=args.dtype, progress=not args.quiet, **options)


def cmd_serve(args: argparse.Namespace) -> None:
    """Start the HTTP server at once (``/health`` says 503 while loading), load the model behind it."""
    from lmforge.config import ServeConfig
    from lmforge.options import build_dataclass, field_names, namespace_to_dict

    config = build_dataclass(ServeConfig, namespace_to_dict(args, keep=field_names(ServeConfig)))
    config.validate()  # before the slow imports: a wrong flag is a one-line error at once

    import uvicorn

    from lmforge.api import LanguageModel
    from lmforge.device import dtype_name, select_device, select_dtype
    from lmforge.interop.hf import is_hf_folder
    from lmforge.serving import create_app
    from lmforge.serving.request_log import RequestLog, default_log_path
    from lmforge.training.checkpoint import resolve_checkpoint

    checkpoint = Path(args.checkpoint)
    if not is_hf_folder(checkpoint):
        resolve_checkpoint(checkpoint)  # a missing or foreign folder is an error now, not after start-up
    precision = dtype_name(select_dtype(args.dtype, select_device(args.device)))
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        logging.getLogger("lmforge").warning("serving on %s without --api-key: anyone who can reach this address "
                                             "can use the model", config.host)
    log = None
    if not config.no_request_log:
        log_path = Path(config.request_log) if config.request_log else default_log_path(checkpoint)
        log = RequestLog(log_path, log_prompts=config.log_prompts)
    failure: list[BaseException] = []

    def stop_on_failure(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(lambda: LanguageModel.load(checkpoint, device=args.device, dtype=args.dtype),
                     api_key=config.api_key, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                     prefix_cache_tokens=config.prefix_cache_tokens,
                     model_name=checkpoint.resolve().name, request_timeout=config.request_timeout,
                     max_body_bytes=config.max_body_size, request_log=log, on_load_error=stop_on_failure)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    shown = f"[{config.host}]" if ":" in config.host else config.host
    print(f"serving {args.checkpoint} ({precision}) at http://{shown}:{config.port}/v1 (OpenAI-compatible), web page "
          f"at http://{shown}:{config.port}/" + (f"; requests logged to {log.path}" if log else "") + "; Ctrl-C stops",
          flush=True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        if server.started:
            raise
    finally:
        if log is not None:
            log.close()
    if failure:
        error = failure[0]
        raise error if isinstance(error, LmforgeError) else CheckpointError(f"could not load the model: {error}")
    if not server.started:
        raise ConfigError(f"could not listen on {config.host}:{config.port} (is the port in use?)")


def cmd_requests(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from lmforge.serving.request_log import format_records, format_summary, recent, summarize

    if args.last is not None and args.last < 1:
        raise ConfigError(f"--last must be >= 1, not {args.last}")
    summary = summarize(args.log)
    records = recent(summary["path"], args.last) if args.last else None
    if args.json:
        if records is not None:
            summary["recent"] = [asdict(r) for r in records]
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    print(format_summary(summary))
    if records is not None:
        print(f"\nlast {len(records)} request(s):")
        print(format_records(records))


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.api import LanguageModel
    from lmforge.config import SamplingConfig

    options = _sampling_options(args)
    num_samples = SamplingConfig.from_options(**options).num_samples
    prompts = args.prompt or [""]
    if args.stream and (len(prompts) > 1 or num_samples > 1):
        raise ConfigError("--stream shows one prompt and one sample at a time")
    lm = LanguageModel.load_ensemble(_checkpoints(args), device=args.device, dtype=args.dtype) if args.ensemble \
        else LanguageModel.load(args.checkpoint, device=args.device, dtype=args.dtype)
    if lm.kind == "seq2seq":  # an encoder-decoder maps each text to its output
        if args.stream:
            raise ConfigError("an encoder-decoder writes its output whole: drop --stream")
        outputs = lm.generate(prompts, beam_size=args.beam_size, **({"mbr": args.mbr} if args.mbr else {}),
                              **options)
        for prompt, output in zip(prompts, outputs):
            print(json.dumps({"source": prompt, "text": output}, ensure_ascii=False) if args.json else output)
        return
    if args.beam_size != 1 or args.mbr:
        raise ConfigError(f"{'--beam-size' if args.beam_size != 1 else '--mbr'} is for encoder-decoder checkpoints")
    if args.stream:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        for piece in lm.stream(prompts[0], truncate=args.truncate, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    completions = lm.complete(prompts, truncate=args.truncate, **options)
    if args.json:
        for c in completions:
            print(json.dumps({"text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                              "completion_tokens": len(c.token_ids)}, ensure_ascii=False))
        return
    for i, c in enumerate(completions):
        prompt = prompts[i // num_samples]
        if i:
            print("-" * 40)
        if c.prompt_truncated:
            print(f"(the prompt was truncated: its first {c.prompt_truncated} tokens were dropped)", file=sys.stderr)
        print(prompt + c.text)


def cmd_classify(args: argparse.Namespace) -> None:
    from lmforge.api import LanguageModel

    lm = LanguageModel.load(args.checkpoint, device=args.device, dtype=args.dtype)
    for text, result in zip(args.text, lm.classify(args.text, labels=args.labels)):
        if args.json:
            print(json.dumps({"text": text, "label": result.label, "labels": result.labels, "scores": result.scores},
                             ensure_ascii=False))
        else:
            scores = "  ".join(f"{label} {p:.3f}" for label, p in result.scores.items())
            print(f"{', '.join(result.labels)}\t{scores}")


def cmd_answer(args: argparse.Namespace) -> None:
    from lmforge.api import LanguageModel

    context = args.context
    if args.context_file:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {args.context_file}: {exc}") from None
    if not context:
        raise ConfigError("give the context: --context TEXT or --context-file FILE")
    lm = LanguageModel.load(args.checkpoint, device=args.device, dtype=args.dtype)
    found = lm.answer(args.question, context)
    if args.json:
        print(json.dumps({"answer": found.text, "score": found.score, "start": found.start, "end": found.end},
                         ensure_ascii=False))
    else:
        where = f" (characters {found.start}-{found.end})" if found.start is not None else ""
        print(f"{found.text}{where}")


def cmd_media(args: argparse.Namespace) -> None:
    """caption / transcribe / describe: one line per file (or a JSON object with --json)."""
    from lmforge.api import LanguageModel

    lm = LanguageModel.load(args.checkpoint, device=args.device, dtype=args.dtype)
    options = {"max_new_tokens": args.max_new_tokens}
    if args.command == "caption" and args.question:
        texts = lm.ask(list(args.files), args.question, **options)
    else:
        texts = getattr(lm, args.command)(list(args.files), **options)
    for file, text in zip(args.files, texts):
        print(json.dumps({"file": file, "text": text}, ensure_ascii=False) if args.json else text)


def cmd_perplexity(args: argparse.Namespace) -> None:
    from lmforge.api import LanguageModel

    path = Path(args.input)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"input file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from None
    if not text:
        raise DataError(f"{path} is empty")
    lm = LanguageModel.load(args.checkpoint, device=args.device, dtype=args.dtype)
    logprobs = lm.token_logprobs(text, stride=args.stride).double()
    nll = -float(logprobs.mean())
    print(f"perplexity {math.exp(nll):.4f}  (mean negative log-likelihood {nll:.4f} nats/token over "
          f"{len(logprobs):,} tokens of {path})")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from lmforge.interop.hf import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"wrote a Hugging Face model folder to {out}")
    print(f"load it with: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from lmforge.interop.gguf import export_gguf

    out = export_gguf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB)")
    print(f"run it with llama.cpp: llama-cli -m {out} -p \"...\"")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from lmforge.interop.hf import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"wrote an lmforge checkpoint to {out}")
    print(f"next: lmforge generate {out} --prompt \"...\"")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from lmforge.quickstart import quickstart

    quickstart(out=args.out, max_time=args.max_time, inputs=args.input, model=args.model)


def cmd_presets(args: argparse.Namespace) -> None:
    from lmforge.config import ModelConfig, preset_names
    from lmforge.models import build_model

    print(f"{'preset':<12} {'layers':>6} {'width':>6} {'heads':>9} {'context':>8} {'params (8k vocab)':>18}")
    for name in preset_names():
        config = ModelConfig.from_dict({"preset": name, "vocab_size": 8192})
        model = build_model(config)
        heads = f"{config.n_head}/{config.n_kv_head}"
        print(f"{name:<12} {config.n_layer:>6} {config.n_embd:>6} {heads:>9} {config.block_size:>8} "
              f"{model.num_parameters():>18,}")


def cmd_recipes(args: argparse.Namespace) -> None:
    import textwrap

    from lmforge.recipes.catalog import recipe_info, recipe_names, recipe_path

    for name in recipe_names():
        info = recipe_info(name)
        needs = " ".join("CHECKPOINT" if key == "checkpoint" else f"--{key} ..." for key in info["needs"])
        print(f"{name}: lmforge {info['command']} --recipe {name} {needs}")
        for text in (info["description"], f"measured: {info['measured']}" if info["measured"] else ""):
            if text:
                print(textwrap.fill(text, 110, initial_indent="    ", subsequent_indent="    "))
    print(f"\nthe YAML files (copy one to edit, then --config FILE): {recipe_path(recipe_names()[0]).parent}")


# ----------------------------------------------------------------------------------- shared
def _sampling_options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The sampling flags given (:class:`SamplingConfig` field names and their values; those not given
    are left out, so the API's defaults apply), checked before the (slower) model load."""
    from lmforge.config import SamplingConfig
    from lmforge.options import field_names

    options = {name: getattr(args, name) for name in field_names(SamplingConfig)
               if name not in skip and hasattr(args, name)}
    SamplingConfig.from_options(**options)
    return options


def _checkpoints(args: argparse.Namespace) -> Any:
    """The checkpoint argument, or with ``--ensemble`` the list of all the checkpoints."""
    return [args.checkpoint, *args.ensemble] if args.ensemble else args.checkpoint


# ----------------------------------------------------------------------------------- parser
# Each option group is declared once, here or in the dataclass it comes from: SamplingConfig (sampling
# flags), PretrainConfig/FinetuneConfig (training), ServeConfig (serving), lmforge.evaluation.options
# (eval task options).
def _add_device_options(parser: argparse.ArgumentParser, dtype: str = "fp32", dtype_help: str = "") -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", default=dtype,
                        help=f"weights' precision: fp32, bf16, fp16 or auto (default: {dtype}){dtype_help}")


def _add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what}")


def _add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_ensemble_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ensemble", nargs="+", default=None, metavar="CKPT",
                        help="more encoder-decoder checkpoints (same tokenizer) decoded with CHECKPOINT as one "
                             "model: the mean of their next-token probabilities")


def _add_sampling_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from lmforge.config import SamplingConfig
    from lmforge.options import add_arguments

    add_arguments(parser, SamplingConfig, flat=True, skip=skip)


def _add_data_commands(commands: Subcommands) -> None:
    p = _command(commands, "train-tokenizer", "train a character or byte-level BPE tokenizer on text")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text/JSONL files, folders or globs")
    p.add_argument("--kind", choices=("char", "bpe"), default="bpe", help="tokenizer kind")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size including special tokens (bpe default 8192; char: cap on the alphabet)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL records")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json")
    p.set_defaults(func=cmd_train_tokenizer)

    p = _command(commands, "prepare", "tokenize a corpus into train/val token shards")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text/JSONL files, folders or globs")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for train.bin, val.bin, meta.json")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL records")
    _add_quiet_option(p)
    p.set_defaults(func=cmd_prepare)


def _add_pretrain_command(commands: Subcommands) -> None:
    from lmforge.config import PretrainConfig
    from lmforge.options import add_arguments

    p = _command(commands, "pretrain", "pretrain a model on prepared data (decoder/LSTM: next token; encoder: "
                                       "masked tokens)",
                 "Pretrain a model. Options come from --config FILE (YAML), overridden by flags; every YAML key "
                 "is also a flag (e.g. train.lr -> --train.lr).")
    _add_config_options(p, "pretrain", "data, out, model, train sections")
    p.add_argument("--model", dest="model.preset", default=argparse.SUPPRESS, metavar="PRESET",
                   help="model preset name (see 'lmforge presets') or preset YAML file")
    p.add_argument("--max-steps", dest="train.max_steps", default=argparse.SUPPRESS, metavar="N",
                   help="same as --train.max_steps")
    p.add_argument("--max-time", dest="train.max_time", default=argparse.SUPPRESS, metavar="S",
                   help="same as --train.max_time (seconds)")
    add_arguments(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)


def _add_finetune_command(commands: Subcommands) -> None:
    from lmforge.config import FinetuneConfig
    from lmforge.options import add_arguments

    p = _command(commands, "finetune", "fine-tune on chats/instructions/text (sft), labelled texts (classification), "
                                       "SQuAD-style questions (qa) or source/target pairs (seq2seq)",
                 "Fine-tune a checkpoint (full or LoRA) through the same training loop as pretraining, or train a "
                 "task model from scratch (--tokenizer DIR --model.preset NAME). The task comes from the data "
                 "(or --task). Options come from --config FILE (YAML), overridden by flags; every YAML key is "
                 "also a flag.")
    _add_checkpoint(p, "base checkpoint or run directory", hf=True, nargs="?", default=argparse.SUPPRESS)
    _add_config_options(p, "finetune", "checkpoint, data, out, train, lora, eval")
    p.add_argument("--data", dest="data.path", default=argparse.SUPPRESS, metavar="FILE",
                   help="same as --data.path: JSONL/JSON (chat, alpaca, prompt/completion, text, labelled texts, "
                        "SQuAD-style, source/target), CSV/TSV, or a text file")
    add_arguments(p, FinetuneConfig, skip=("checkpoint",))
    p.set_defaults(func=cmd_finetune)


def _add_checkpoint_commands(commands: Subcommands) -> None:
    p = _command(commands, "merge-lora", "fold a LoRA checkpoint's adapters into full weights")
    _add_checkpoint(p, "LoRA checkpoint or run directory")
    p.add_argument("out", metavar="OUT_CHECKPOINT", help="checkpoint folder to write")
    p.set_defaults(func=cmd_merge_lora)

    p = _command(commands, "average", "average the weights of several checkpoints of one model (e.g. a run's last "
                                      "ones)",
                 "Write a checkpoint whose weights are the element-wise mean of the given checkpoints' (same "
                 "architecture, task and tokenizer), or of a run directory's last N checkpoints with --last N.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint folders, or one run directory "
                                                                           "with --last")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="average the N newest checkpoints (step-N and final) of the one run directory given")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    p.set_defaults(func=cmd_average)


def _add_chat_command(commands: Subcommands) -> None:
    p = _command(commands, "chat", "chat with a checkpoint in the terminal (streaming; /reset, /exit)")
    _add_checkpoint(p, hf=True)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    _add_sampling_options(p)
    _add_device_options(p)
    p.set_defaults(func=cmd_chat)


def _add_eval_command(commands: Subcommands) -> None:
    from lmforge.evaluation.options import CLI_OPTIONS

    p = _command(commands, "eval", "evaluate a checkpoint: perplexity, generation (BLEU/chrF/ROUGE), QA, "
                                   "classification, diversity; or a YAML suite with thresholds",
                 "Evaluate a checkpoint on one task and data file, or on a YAML suite of tasks whose thresholds "
                 "make the command exit with code 1 when a metric falls short (to gate a release in CI).")
    _add_checkpoint(p, hf=True)
    p.add_argument("--task", choices=("perplexity", "generation", "qa", "classification", "diversity"),
                   help="what to measure")
    p.add_argument("--data", nargs="+", metavar="FILE", help="data file(s) for the task")
    p.add_argument("--suite", metavar="FILE", help="YAML suite: tasks, data, limits and min/max thresholds")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N examples")
    p.add_argument("--out", metavar="FILE", help="write the JSON report here")
    _add_quiet_option(p)
    for option in CLI_OPTIONS:  # the tasks' own options
        p.add_argument(option.flag, **option.argparse_kwargs())
    _add_sampling_options(p, skip=("num_samples",))  # --num-samples is the diversity task's
    _add_ensemble_option(p)
    _add_device_options(p)
    p.set_defaults(func=cmd_eval)


def _add_serving_commands(commands: Subcommands) -> None:
    from lmforge.config import ServeConfig
    from lmforge.options import add_arguments

    p = _command(commands, "serve", "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)")
    _add_checkpoint(p, hf=True)
    add_arguments(p, ServeConfig, flat=True, defaults=True)
    _add_device_options(p, dtype="auto", dtype_help="; auto is bf16 where the hardware computes it natively, "
                        "the faster choice under concurrent load, and fp32 elsewhere; fp32 gives the lowest latency "
                        "to a single client of a small model")
    p.set_defaults(func=cmd_serve)

    p = _command(commands, "requests", "summarize the requests a server recorded (counts, tokens, latency, errors)",
                 "Summarize a request log written by 'lmforge serve': requests by endpoint and outcome, tokens, "
                 "latency and time-to-first-token percentiles, the most common errors.")
    p.add_argument("log", metavar="CHECKPOINT_OR_DB",
                   help="the request log file, or the checkpoint/run folder holding requests.sqlite3")
    p.add_argument("--last", type=int, default=None, metavar="N", help="also list the last N requests")
    _add_json_option(p, "JSON instead of tables")
    p.set_defaults(func=cmd_requests)


def _add_generate_command(commands: Subcommands) -> None:
    p = _command(commands, "generate", "generate text from a checkpoint")
    _add_checkpoint(p)
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text; give it several times for a batch (default: an empty prompt)")
    _add_sampling_options(p)
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--truncate", action="store_true",
                   help="drop the start of a prompt that is too long for the context (else an error)")
    _add_json_option(p, "one JSON object per sample")
    p.add_argument("--beam-size", type=int, default=1, metavar="N",
                   help="encoder-decoder checkpoints: beam search with N beams (1: greedy or sampling)")
    p.add_argument("--mbr", choices=("bleu", "chrf"), default=None,
                   help="encoder-decoder checkpoints: of the beam's N hypotheses, the one that agrees most with the "
                        "others by this utility (minimum Bayes risk decoding)")
    _add_ensemble_option(p)
    _add_device_options(p)
    p.set_defaults(func=cmd_generate)


def _add_task_commands(commands: Subcommands) -> None:
    p = _command(commands, "classify", "classify texts with a classifier checkpoint (or zero-shot with a language "
                                       "model)")
    _add_checkpoint(p)
    p.add_argument("text", nargs="+", help="text(s) to classify")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="candidate labels (needed by a language model; a classifier's own labels by default)")
    _add_json_option(p, "one JSON object per text")
    _add_device_options(p)
    p.set_defaults(func=cmd_classify)

    p = _command(commands, "answer", "answer a question about a context (extractive QA checkpoint, or a language "
                                     "model)")
    _add_checkpoint(p)
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--context", default=None, help="the context text")
    p.add_argument("--context-file", default=None, metavar="FILE", help="read the context from a file")
    _add_json_option(p, "a JSON object")
    _add_device_options(p)
    p.set_defaults(func=cmd_answer)

    media_commands = {"caption": ("caption images (or, with --question, answer a question about each)", "image"),
                      "transcribe": ("transcribe recordings (WAV, FLAC, OGG, MP3)", "recording"),
                      "describe": ("describe video clips (a video file or a folder of frames each)", "clip")}
    for name, (help_text, what) in media_commands.items():
        p = _command(commands, name, f"{help_text} with a multimodal checkpoint")
        _add_checkpoint(p)
        p.add_argument("files", nargs="+", metavar="FILE", help=f"{what} file(s)")
        if name == "caption":
            p.add_argument("--question", default=None, help="ask this question about every image instead (VQA)")
        p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens per text")
        _add_json_option(p, "one JSON object per file")
        _add_device_options(p)
        p.set_defaults(func=cmd_media)

    p = _command(commands, "perplexity", "perplexity of a checkpoint on a text file")
    _add_checkpoint(p)
    p.add_argument("--input", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens the scoring window advances (default: the context length)")
    _add_device_options(p)
    p.set_defaults(func=cmd_perplexity)


def _format(formats: Subcommands, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return formats.add_parser(name, help=help, description=description, formatter_class=Formatter)


def _formats(parser: argparse.ArgumentParser) -> Subcommands:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", parser_class=Parser)
    formats.required = True
    return formats


def _add_interop_commands(commands: Subcommands) -> None:
    formats = _formats(_command(commands, "export", "export a checkpoint for other tools (Hugging Face "
                                                    "transformers, llama.cpp)"))
    q = _format(formats, "hf", "a Hugging Face folder (GPT2LMHeadModel or LlamaForCausalLM + tokenizer)",
                "Write a folder that transformers' AutoModelForCausalLM and AutoTokenizer load as is.")
    _add_checkpoint(q)
    q.add_argument("out", metavar="OUT_DIR", help="folder to write")
    q.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="precision of the weights")
    q.set_defaults(func=cmd_export_hf)
    q = _format(formats, "gguf", "one GGUF file for llama.cpp / Ollama (Llama-flavoured models)",
                "Write a GGUF file with the tokenizer embedded (Llama-flavoured models with a byte-level BPE "
                "tokenizer).")
    _add_checkpoint(q)
    q.add_argument("out", metavar="OUT.gguf", help="file to write")
    q.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f16",
                   help="precision of the matrices (norms stay f32)")
    q.set_defaults(func=cmd_export_gguf)

    formats = _formats(_command(commands, "import", "import a model from another format into an lmforge "
                                                    "checkpoint"))
    q = _format(formats, "hf", "a local Hugging Face GPT-2, Llama or Mistral folder",
                "Convert a local Hugging Face folder (config.json, safetensors or pytorch_model.bin, tokenizer) "
                "into an lmforge checkpoint.")
    q.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder")
    q.add_argument("out", metavar="OUT_CHECKPOINT", help="checkpoint folder to write")
    q.set_defaults(func=cmd_import_hf)


def _add_start_commands(commands: Subcommands) -> None:
    p = _command(commands, "quickstart", "train a small model end to end on an embedded corpus (no download)")
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="where everything is written")
    p.add_argument("--max-time", type=float, default=300.0, metavar="SECONDS", help="training time budget")
    p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                   help="your own text/JSONL files, folders or globs instead of the embedded corpus")
    p.add_argument("--model", default=None, metavar="PRESET", help="model preset (default: a small GPT-2)")
    p.set_defaults(func=cmd_quickstart)

    p = _command(commands, "presets", "list the bundled model presets")
    p.set_defaults(func=cmd_presets)

    p = _command(commands, "recipes", "list the shipped recipes (lmforge pretrain/finetune --recipe NAME)")
    p.set_defaults(func=cmd_recipes)


_COMMAND_GROUPS = (  # in the order of 'lmforge --help'
    _add_data_commands, _add_pretrain_command, _add_finetune_command, add_alignment_commands,
    _add_checkpoint_commands, _add_chat_command, _add_eval_command, _add_serving_commands, _add_generate_command,
    _add_task_commands, _add_interop_commands, _add_start_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmforge", formatter_class=Formatter,
                    description="Train, fine-tune, evaluate and serve language models, offline and CPU first.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    for add_commands in _COMMAND_GROUPS:
        add_commands(commands)
    return parser


def _reject_unknown(parser: argparse.ArgumentParser, command: list[str], unknown: list[str]) -> None:
    """Exit with one line naming the unknown options, with a did-you-mean hint."""
    import difflib

    sub = parser
    for name in command:  # descend to the (sub)command that was used
        subparsers = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = subparsers.choices[name]
    known = [flag for action in sub._actions for flag in action.option_strings]
    flag = next((u.split("=")[0] for u in unknown if u.startswith("-")), unknown[0])
    close = difflib.get_close_matches(flag, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    sub.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("lmforge")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, [args.command] + ([args.format] if getattr(args, "format", None) else []), unknown)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    try:
        code = args.func(args)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
