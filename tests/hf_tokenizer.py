"""A real Hugging Face tokenizer built in the test (never downloaded): a small BPE trained on a few sentences, saved as
``tokenizer.json`` with a ``tokenizer_config.json`` carrying a chat template, as a model directory holds them."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a cache aware router sends a prompt to the worker that holds its prefix",
    "large language models answer questions about tokens blocks and caches",
    "you are a helpful assistant; answer briefly and exactly",
    "what is the capital of france? paris is the capital of france",
]
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# A Zephyr-like template: the BOS once, each turn "<|role|>\n content </s>\n", then the assistant's generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(directory: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Train, save ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``; returns it."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer)
    bos = tokenizer.token_to_id("<s>")
    # completions get a BOS, as Llama-style tokenizers add it; the chat template writes its own
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config: dict[str, object] = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def expected_chat_ids(directory: Path, messages: list[dict[str, str]]) -> list[int]:
    """The chat's token ids straight from the tokenizer: the template rendered by hand, encoded without specials."""
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages) + "<|assistant|>\n"
    return tokenizer.encode(text, add_special_tokens=False).ids
