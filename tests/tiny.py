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
                    num_hidden_layers: int = 2) -> str:
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
                         bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder
