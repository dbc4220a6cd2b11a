#!/usr/bin/env python3
"""Make a tiny, random, Llama-architecture model that vLLM (CPU) can serve.

Why: tests need a real vLLM server, but no model hub is reachable.  This
writes a complete Hugging Face model folder from scratch, deterministically,
in a few seconds:

* a byte-level BPE tokenizer (vocab 4096) trained with ``tokenizers`` on
  generated English-ish text, with the special tokens ``<|im_start|>``,
  ``<|im_end|>`` and ``<|endoftext|>`` and a ChatML chat template that honours
  ``add_generation_prompt``; saved through ``PreTrainedTokenizerFast``
  (eos ``<|im_end|>``, pad ``<|endoftext|>``);
* a ``LlamaForCausalLM`` (hidden 128, intermediate 256, 2 layers, 2 heads of
  head_dim 64, 2 KV heads, max_position_embeddings 65536), random weights from
  a fixed seed, saved as safetensors.

Run it with the vLLM venv's python (it has torch, transformers, tokenizers,
safetensors)::

    /opt/perftest-vllm/bin/python tests/support/make_tiny_model.py OUT_DIR

Idempotent: when OUT_DIR already holds a complete model of this recipe
(marker file ``perftest-tiny-model.json``) nothing is done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

# Bump when anything below changes the produced files.
RECIPE_VERSION = 1
MARKER = "perftest-tiny-model.json"

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORDS = (
    "the of and to in is was for that on as with by he she it they we you at from be this have "
    "are or an had not but which one were all their there been has when who will more no if out "
    "so said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come "
    "since against go came right used take three small large house city number water report model "
    "token server request latency throughput benchmark service memory cache prompt answer question "
    "data system value result test run fast slow green blue red morning evening river mountain "
    "garden window letter music story friend family school table paper light night road market"
).split()
_PUNCT = [".", ".", ".", "?", "!", ","]


_ONSETS = "b c d f g h j k l m n p r s t v w y z ch sh th st tr pl br gr".split()
_VOWELS = "a e i o u ai ea ou io".split()
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck"]


def _pseudo_words(rng: random.Random, count: int):
    """Pronounceable made-up words, so BPE has enough to merge to 4096."""
    out = []
    for _ in range(count):
        syl = rng.randint(1, 4)
        out.append("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syl)))
    return out


def _corpus(seed: int = 1234, sentences: int = 30000):
    """Deterministic English-ish sentences (plus digits and some code-ish text)."""
    rng = random.Random(seed)
    # Zipf-like mix: real words are common, made-up words fill the long tail.
    lexicon = _WORDS * 20 + _pseudo_words(rng, 6000)
    for i in range(sentences):
        n = rng.randint(4, 18)
        words = [rng.choice(lexicon) for _ in range(n)]
        words[0] = words[0].capitalize()
        s = " ".join(words) + rng.choice(_PUNCT)
        if i % 7 == 0:
            s += f" {rng.randint(0, 99999)} {rng.random():.4f}"
        if i % 11 == 0:
            s += ' {"key": "value", "n": [1, 2, 3]}\n'
        yield s


def _complete(out_dir: str, dtype: str, seed: int) -> bool:
    """True when OUT_DIR holds a finished model of this recipe, dtype and seed."""
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return (m.get("recipe_version"), m.get("dtype"), m.get("seed")) == (RECIPE_VERSION, dtype, seed)


def build(out_dir: str, dtype: str = "float32", seed: int = 0) -> str:
    if _complete(out_dir, dtype, seed):
        print(f"tiny model already complete in {out_dir}", file=sys.stderr)
        return out_dir

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t0 = time.monotonic()
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    # Build in a temp folder beside OUT_DIR, then rename: a half-written model
    # is never seen under OUT_DIR.
    tmp = tempfile.mkdtemp(prefix=".tiny-model-", dir=parent)
    try:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            min_frequency=2,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer=trainer)

        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            bos_token=None,
            model_max_length=65536,
            clean_up_tokenization_spaces=False,
        )
        hf_tok.chat_template = CHATML_TEMPLATE
        hf_tok.save_pretrained(tmp)
        # transformers 5 writes tokenizer_class "TokenizersBackend" and puts
        # the template only in chat_template.jinja; name the class every
        # transformers release knows and inline the template as well.
        tc_path = os.path.join(tmp, "tokenizer_config.json")
        with open(tc_path) as f:
            tc = json.load(f)
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc["chat_template"] = CHATML_TEMPLATE
        with open(tc_path, "w") as f:
            json.dump(tc, f, indent=2, sort_keys=True)

        vocab = len(hf_tok)
        eos_id = hf_tok.convert_tokens_to_ids("<|im_end|>")
        pad_id = hf_tok.convert_tokens_to_ids("<|endoftext|>")
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=65536,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            torch_dtype=dtype,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = pad_id
        model.generation_config.bos_token_id = eos_id
        model.save_pretrained(tmp, safe_serialization=True)
        # transformers 5 writes "dtype"; keep the older key too for older readers.
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.setdefault("torch_dtype", dtype)
        cfg.setdefault("dtype", dtype)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"recipe_version": RECIPE_VERSION, "vocab_size": vocab, "dtype": dtype, "seed": seed}, f)
        # Readable by any uid (containers may run as non-root); mkdtemp is 0700.
        os.chmod(tmp, 0o755)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"tiny model written to {out_dir} (vocab {vocab}, {dtype}) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Make a tiny random Llama model + BPE tokenizer for vLLM tests.")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights dtype (default float32; serve it with --dtype float32, see tests/support/README.md)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build(args.out_dir, dtype=args.dtype, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
