"""lmforge against Hugging Face transformers, side by side in one run, on the same GPT-2-shaped model.

Both models get the same random weights (checked: equal logits), the same data, optimiser (fused
AdamW), clipping and loss. Reported, for fp32 and for bf16 autocast:

* training tokens/s (forward + backward + optimiser step), against transformers' default (SDPA)
  attention and against its eager attention
* batch-1 greedy decoding tokens/s with a KV cache (lmforge's ``LanguageModel.complete`` against
  ``GPT2LMHeadModel.generate``; both produce the same tokens, checked)
* batch-16 greedy decoding throughput

at two sizes: the nanoGPT reference shape (4 layers, width 128, character vocabulary; overheads
dominate on a CPU) and the gpt2-10m preset with an 8,192-token BPE vocabulary (matrix multiplies and
memory bandwidth dominate).

    python bench/vs_transformers.py [--shapes nanogpt,gpt2-10m] [--new-tokens 200]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
import transformers

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.corpus import default_documents
from lmforge.interop.hf import GPT2, to_hf_state
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import unique_state


def hf_twin(model: DecoderLM) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel computing exactly what ``model`` computes (exact GELU, same weights), built
    from lmforge's own Hugging Face export config and weight table."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2.write_config(model.config)))
    hf.load_state_dict(to_hf_state(unique_state(model), model.config, GPT2), strict=False)
    return hf.eval()


def train_speed(model: torch.nn.Module, logits_of, data: torch.Tensor, batch: int, block: int, steps: int,
                dtype: torch.dtype) -> float:
    """Training tokens/s over ``steps`` steps after 2 warm-up steps (on a copy: the weights stay as they were)."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=generator)
        rows = torch.stack([data[s:s + block + 1] for s in starts])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = logits_of(model, rows[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * block / (time.perf_counter() - start)


SHAPES = {
    # name: (model knobs, tokenizer kind, vocabulary, training batch, training context, training steps)
    "nanogpt": ({"preset": "gpt2-tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256}, "char", None,
                12, 64, 200),
    "gpt2-10m": ({"preset": "gpt2-10m"}, "bpe", 8192, 8, 256, 8),
}


def compare(shape: str, documents: list[str], new_tokens: int) -> list[tuple[str, float, float]]:
    knobs, kind, vocab, batch_size, block_size, steps = SHAPES[shape]
    tokenizer = Tokenizer.train(documents, kind=kind, vocab_size=vocab)
    data = torch.tensor(tokenizer.encode("\n\n".join(documents[:200])), dtype=torch.long)
    torch.manual_seed(0)
    ours = DecoderLM(ModelConfig.from_dict({**knobs, "vocab_size": tokenizer.vocab_size})).eval()
    theirs = hf_twin(ours)
    probe = data[:64][None]
    with torch.no_grad():
        difference = (ours(probe) - theirs(probe).logits).abs().max().item()
    print(f"{shape}: {ours.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size:,}; "
          f"max logit difference between the twins {difference:.1e}", flush=True)

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        a = train_speed(ours, lambda m, x: m(x), data, batch_size, block_size, steps, dtype)
        b = train_speed(theirs, lambda m, x: m(x).logits, data, batch_size, block_size, steps, dtype)
        rows.append((f"{shape}: training tokens/s ({name}, batch {batch_size}x{block_size})", a, b))
        theirs.config._attn_implementation = "eager"  # transformers' other attention, faster in some cases
        b = train_speed(theirs, lambda m, x: m(x).logits, data, batch_size, block_size, steps, dtype)
        theirs.config._attn_implementation = "sdpa"
        rows.append((f"{shape}: training tokens/s ({name}), transformers with eager attention", a, b))
    ours.eval()
    theirs.eval()
    lm = LanguageModel(ours, tokenizer)
    prompt = tokenizer.decode(data[:16].tolist())
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        lm.model.to(dtype)
        theirs.to(dtype)
        for batch in (1, 16):
            a, b, same = decode_speed(lm, theirs, [prompt] * batch, new_tokens)
            rows.append((f"{shape}: greedy decoding tokens/s ({name}, batch {batch}, same tokens: {same})", a, b))
    return rows


def decode_speed(lm: LanguageModel, theirs: transformers.GPT2LMHeadModel, prompts: list[str],
                 new_tokens: int) -> tuple[float, float, bool]:
    """Generated tokens/s of lmforge and transformers, and whether the first rows agree."""
    options = dict(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    lm.complete(prompts, **{**options, "max_new_tokens": 8})  # warm-up
    start = time.perf_counter()
    completions = lm.complete(prompts, **options)
    ours = len(prompts) * new_tokens / (time.perf_counter() - start)
    ids = torch.tensor([lm.tokenizer.encode(p) for p in prompts])
    hf_options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                      pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        theirs.generate(ids, **{**hf_options, "max_new_tokens": 8, "min_new_tokens": 8})
        start = time.perf_counter()
        generated = theirs.generate(ids, **hf_options)
        rate = len(prompts) * new_tokens / (time.perf_counter() - start)
    return ours, rate, generated[0, ids.shape[1]:].tolist() == completions[0].token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="nanogpt,gpt2-10m")
    parser.add_argument("--new-tokens", type=int, default=200)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    documents = list(default_documents())
    rows = [row for shape in args.shapes.split(",") for row in compare(shape, documents, args.new_tokens)]
    print(f"\n{'measure':<76} {'lmforge':>9} {'transformers':>13} {'ratio':>7}")
    for label, a, b in rows:
        print(f"{label:<76} {a:>9,.0f} {b:>13,.0f} {a / b:>6.2f}x")


if __name__ == "__main__":
    main()
