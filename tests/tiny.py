"""A tiny random-init Llama and a BPE tokenizer trained on the spot with `tokenizers`: a
real Hugging Face model folder for tests, benchmarks and smoke runs, made without a download.

Hidden 64 with 2 heads gives head_dim 32, the smallest that vLLM's CPU attention accepts.
"""

import random

WORDS = ("the a cat dog sky is blue green red yes no good bad answer question what why how please thanks "
         "sure thing well ok hello capital city river mountain sound color opposite big small").split()


# ChatML turns closed by the tokenizer's EOS; like many real templates it refuses roles it does not know.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<eos>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tokenizer(folder: str, extra_text: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)] + list(extra_text)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      eos_token="<eos>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)
    return wrapped


def make_tiny_model(folder: str, extra_text: list[str] = (), seed: int = 0, hidden_size: int = 64,
                    num_hidden_layers: int = 2, tie_word_embeddings: bool = False) -> str:
    """Writes tokenizer and a Llama (safetensors; by default 2 layers of 64, 0.15M parameters) into
    `folder`; returns it. Heads of 32 dimensions at every size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(folder, extra_text)
    torch.manual_seed(seed)
    heads = hidden_size // 32
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=tie_word_embeddings)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_sentencepiece_tokenizer(folder: str, extra_text: list[str] = (), add_eos_token: bool = False):
    """A Llama tokenizer from a SentencePiece BPE model trained here: BOS, a dummy prefix (a word at
    the start of a text gets '▁'), byte fallback; as Llama-2, Mistral and Gemma tokenize."""
    import io
    import json
    import os

    import sentencepiece
    from transformers import AutoTokenizer

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)] + list(extra_text)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, add_dummy_prefix=True, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": add_eos_token,
                   "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # converted from the SentencePiece model once
    tokenizer.save_pretrained(folder)
    return tokenizer


# Gemma's shape: turns closed by <end_of_turn>, which is not the tokenizer's EOS.
TURN_END_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")


def make_turn_end_tokenizer(folder: str):
    """The tiny BPE tokenizer with a chat template whose turns end with <end_of_turn> (a special
    token that is not EOS)."""
    tokenizer = make_tokenizer(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = TURN_END_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer
