#!/usr/bin/env python3
"""Write the tiny random model of make_tiny_model.py as one GGUF file for llama.cpp.

Why: llama.cpp's ``llama-server`` serves GGUF files only, and no model hub is
reachable.  This converts the Hugging Face folder that make_tiny_model.py
wrote (same weights, same tokenizer, same chat template), so vLLM and
llama.cpp serve the *same* model and their figures can be compared:

* architecture ``llama``: hidden 128, 2 layers, 2 heads of 64, F32 tensors;
  q/k projections permuted from Hugging Face's rotate-half layout to the
  interleaved one llama.cpp's rope expects (as llama.cpp's own converter does);
* tokenizer ``gpt2`` (byte-level BPE) with pre-tokenizer ``gpt-2`` (the plain
  GPT-2 split regex, which is what the ``tokenizers`` ByteLevel pre-tokenizer
  with ``use_regex`` uses), the full vocab and merges, the three special
  tokens marked as control tokens, eos ``<|im_end|>``, no bos added;
* the ChatML chat template, so ``/apply-template`` and ``--jinja`` work.

It needs numpy and safetensors (the vLLM venv has both) and the ``gguf``
package; .ci/setup-llamacpp.sh keeps the copy that ships inside the llama.cpp
sources it builds from at $PERFTEST_LLAMACPP_DIR/gguf-py (put it on
PYTHONPATH, or pass --gguf-py)::

    /opt/perftest-vllm/bin/python tests/support/make_tiny_gguf.py \\
        /opt/perftest-tiny-model /opt/perftest-tiny-gguf/tiny.gguf \\
        --gguf-py /opt/perftest-llamacpp/gguf-py

Idempotent: when OUT already exists beside a marker naming this recipe and
the source model's marker, nothing is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

RECIPE_VERSION = 1


def _marker_path(out: str) -> str:
    return out + ".perftest.json"


def _wanted_marker(src: str) -> dict:
    with open(os.path.join(src, "perftest-tiny-model.json")) as f:
        source = json.load(f)
    return {"recipe_version": RECIPE_VERSION, "source": source}


def _complete(src: str, out: str) -> bool:
    try:
        with open(_marker_path(out)) as f:
            return os.path.isfile(out) and json.load(f) == _wanted_marker(src)
    except (OSError, ValueError):
        return False


def _permute(w, n_head: int):
    """Hugging Face rotate-half q/k rows -> llama.cpp's interleaved rope rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(src: str):
    """(tokens by id, merges as 'a b', ids of special tokens) from tokenizer.json."""
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    model = tj["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"tokenizer.json: model type {model.get('type')!r}, want BPE")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    n = max(by_id) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise SystemExit(f"tokenizer.json: ids without a token, e.g. {missing[:5]}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [by_id[i] for i in range(n)], merges, special


def _write_header(w, gguf, cfg: dict, chat_template: str, tokens, merges, special, ids) -> None:
    w.add_name("perftest-tiny")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(len(tokens))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|im_end|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)


_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _tensors(src: str, cfg: dict):
    """(gguf name, float32 array) for every weight, in a fixed order."""
    import numpy as np
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(src, "model.safetensors"))
    yield "token_embd.weight", weights["model.embed_tokens.weight"]
    for b in range(cfg["num_hidden_layers"]):
        for hf, gg in _NAMES.items():
            t = weights[f"model.layers.{b}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute(t, cfg["num_attention_heads"])
            elif hf == "self_attn.k_proj":
                t = _permute(t, cfg["num_key_value_heads"])
            yield f"blk.{b}.{gg}.weight", np.ascontiguousarray(t, dtype=np.float32)
    yield "output_norm.weight", weights["model.norm.weight"]
    yield "output.weight", weights["lm_head.weight"]


def build(src: str, out: str) -> str:
    if _complete(src, out):
        print(f"tiny GGUF already complete at {out}", file=sys.stderr)
        return out
    import gguf

    t0 = time.monotonic()
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(src, "tokenizer_config.json")) as f:
        chat_template = json.load(f)["chat_template"]
    tokens, merges, special = _vocab(src)
    ids = {t: i for i, t in enumerate(tokens)}
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    tmp = out + ".tmp"
    w = gguf.GGUFWriter(tmp, arch="llama")
    _write_header(w, gguf, cfg, chat_template, tokens, merges, special, ids)
    for name, t in _tensors(src, cfg):
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    with open(_marker_path(out), "w") as f:
        json.dump(_wanted_marker(src), f)
    print(f"tiny GGUF written to {out} ({len(tokens)} tokens) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert the tiny random model to GGUF for llama.cpp tests.")
    p.add_argument("src", help="folder written by make_tiny_model.py")
    p.add_argument("out", help="GGUF file to write")
    p.add_argument("--gguf-py", help="folder holding the gguf package (llama.cpp's gguf-py)")
    args = p.parse_args(argv)
    if args.gguf_py:
        sys.path.insert(0, args.gguf_py)
    build(args.src, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
