"""Tiny Llama decoders for the text-generation tests: random init, a few KV and FFN groups zeroed, slimmed
in memory (`slim` + `apply_to`) so the two layers keep different KV head counts and FFN widths."""

from __future__ import annotations

import torch
from torch import nn

import slimship
from slimship.hf import LogitsOnly

VOCAB = 96


def tiny_llama(seed: int = 0, *, hidden: int = 64, ffn: int = 128, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, vocab: int = VOCAB, max_positions: int = 256) -> nn.Module:  # fmt: skip
    """A dense Llama with decisive logits (a wide init: greedy choices are not near-ties)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@torch.no_grad()
def zero_groups(model: nn.Module, fractions: dict[str, float], seed: int = 0) -> None:
    """Zero a fraction of the removable groups of each space whose name contains a key of `fractions`."""
    import random

    from slimship.slimming.api import find_groups, zero_group

    example = (torch.arange(8).unsqueeze(0) % VOCAB,)
    wrapper = LogitsOnly(model)  # group names are the wrapper's
    found = find_groups(wrapper, example)
    rng = random.Random(seed)
    for space, indices in found.by_space.items():
        fraction = next((f for key, f in fractions.items() if key in space), 0.0)
        k = min(int(round(fraction * len(indices))), len(indices) - 1)
        for i in rng.sample(indices, k):
            zero_group(wrapper, found.groups[i])


def slim_llama(model: nn.Module) -> nn.Module:
    """`model` slimmed in place (its own module objects, the slim weights)."""
    wrapper = LogitsOnly(model)
    example = (torch.arange(8).unsqueeze(0) % VOCAB,)
    slimship.slim(wrapper, example).apply_to(wrapper, example)
    return model


def tiny_slim_llama(seed: int = 0) -> nn.Module:
    """A slim tiny Llama: layer 0 loses one of its two KV groups and 40% of its FFN, layer 1 30% of it."""
    return slim_llama(tiny_zeroed_llama(seed))


def tiny_zeroed_llama(seed: int = 0) -> nn.Module:
    """The dense model `tiny_slim_llama` slims: same weights, zeroed groups still in place."""
    model = tiny_llama(seed)
    zero_groups(model, {"layers.0.self_attn": 0.5, "layers.0.mlp": 0.4, "layers.1.mlp": 0.3}, seed)
    return model


SENTENCES = [
    "the slim model runs on the phone",
    "a small decoder writes one token at a time",
    "the cache holds keys and values for every layer",
    "tokens per second is what the phone measures",
]


def tiny_tokenizer():
    """A word-level tokenizer trained on a few sentences (nothing downloaded): <unk> 0, <s> 1, </s> 2, as the
    tiny Llama's bos/eos ids; filler words w<i> make its vocabulary the model's, so every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.add_tokens([f"w{i}" for i in range(tok.get_vocab_size(), VOCAB)])
    assert tok.get_vocab_size() == VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_checkpoint(folder, seed: int = 0):
    """The zeroed tiny Llama as a checkpoint folder with its tokenizer and generation config beside it."""
    model = tiny_zeroed_llama(seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder
