"""Hugging Face-format assets of the embedded default: tokenizer, tiny Llama, JSONL data, manifest.

Everything is built locally (no Hub access) and saved with ``save_pretrained`` so downstream code
loads it exactly like a hub model::

    tokenizer = AutoTokenizer.from_pretrained(out_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(out_dir / "model")

Layout written by :func:`build_assets` (paths relative to ``out_dir``)::

    model/                      tokenizer + randomly initialised LlamaForCausalLM
    data/sft/{train,validation}.jsonl       {"prompt", "response"}
    data/prefs/{train,validation}.jsonl     {"prompt", "chosen", "rejected", "chosen_reward",
                                             "rejected_reward", "label_flipped"}
    data/prompts/{train,test}.jsonl         {"prompt"}  (one row per prompt)
    manifest.json               build parameters + sha256 of every file above (written last)

Prompts in the data files are raw instructions; apply the tokenizer's chat template to them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from datamodules.chat import ROLES, USER, message
from datamodules.synthetic.task import FILLER, SyntheticTask, all_prompts
from datamodules.templates import DEFAULT_EOS, render_zephyr, zephyr_marker
from datamodules.utils.cache import files_manifest_problem, invalidate, write_files_manifest
from datamodules.utils.files import default_file_mode, write_jsonl_atomic

ROLE_TOKENS: tuple[str, ...] = tuple(zephyr_marker(role) for role in ROLES)  # <|system|> <|user|> <|assistant|>
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", DEFAULT_EOS, "<unk>", *ROLE_TOKENS)
# Zephyr-style (`datamodules.templates.render_zephyr`): "<|role|>\n{content}" then "</s>\n" after
# assistant turns, "\n" after the others.
# Newlines are string literals because HF renders templates with trim_blocks=True.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + '\n' }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MANIFEST_VERSION = 1
DEFAULT_MODEL_KWARGS: dict[str, int] = {
    "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512,
    "max_position_embeddings": 128, "seed": 0,
}  # fmt: skip


def chat_text(prompt: str, response: str | None = None) -> str:
    """The chat-template rendering of one user turn (and the assistant's answer if given).

    `chat_text("count 1 to 3", "1 2 3")` == `"<|user|>\\ncount 1 to 3\\n<|assistant|>\\n1 2 3</s>\\n"`.
    """
    text = render_zephyr([message(USER, prompt)], eos=DEFAULT_EOS)
    return text if response is None else f"{text}{response}{DEFAULT_EOS}\n"


def tokenizer_corpus() -> list[str]:
    """Chat-formatted texts of every prompt with its target, with and without the filler."""
    return [chat_text(p, r) for p, t in all_prompts().items() for r in (t, f"{t} {FILLER}")]


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """Split special tokens out of the texts: the BPE trainer would otherwise spend merges on them."""
    pattern = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    No BOS/EOS is added by ``__call__`` (no post-processor): the chat template writes ``</s>``
    after assistant turns, and collators add what they need.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_without_special_tokens(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=DEFAULT_EOS,
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (~1.1M parameters at the defaults) sized to ``tokenizer``.

    Initialisation uses ``seed`` under a forked RNG, so the global torch RNG is left untouched.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _save_model_dir(model_dir: Path, tokenizer: PreTrainedTokenizerFast, model: LlamaForCausalLM) -> None:
    """``save_pretrained`` into a temp dir beside ``model_dir``, then move each file in atomically."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=".model.", suffix=".tmp"))
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        new_files = {p.name for p in tmp.iterdir()}
        for stale in model_dir.iterdir():
            if stale.name not in new_files:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        for name in sorted(new_files):
            os.chmod(tmp / name, default_file_mode())
            os.replace(tmp / name, model_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_assets(
    out_dir: str | os.PathLike,
    *,
    task: SyntheticTask,
    n_sft: int = 4000,
    n_pref: int = 4000,
    n_val: int = 256,
    label_noise: float = 0.1,
    vocab_size: int = 512,
    model_kwargs: dict | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) the tokenizer, initial model and data files under ``out_dir``; return it.

    Cached: if ``manifest.json`` records identical parameters and every file's sha256 matches,
    nothing is rebuilt (unless ``force``). Otherwise the manifest is removed first, every file
    is rewritten atomically, and the manifest is written last, so an interrupted build is
    never mistaken for a complete one.
    """
    out = Path(out_dir)
    params = {
        "manifest_version": MANIFEST_VERSION, "task": dataclasses.asdict(task), "n_sft": n_sft,
        "n_pref": n_pref, "n_val": n_val, "label_noise": label_noise, "vocab_size": vocab_size,
        "model_kwargs": {**DEFAULT_MODEL_KWARGS, **(model_kwargs or {})},
    }  # fmt: skip
    if not force and files_manifest_problem(out / "manifest.json", out, expected={"params": params}) is None:
        print(f"[synthetic] {out}: cached assets match the manifest, nothing to do")
        return out
    out.mkdir(parents=True, exist_ok=True)
    invalidate(out / "manifest.json")

    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=vocab_size)
    print(f"[synthetic] tokenizer: byte-level BPE, {len(tokenizer)} tokens")
    model = build_tiny_model(tokenizer, **params["model_kwargs"])
    tokenizer.model_max_length = model.config.max_position_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    _save_model_dir(out / "model", tokenizer, model)
    print(f"[synthetic] model: LlamaForCausalLM, {n_params:,} parameters -> {out / 'model'}")

    data = {
        "data/sft/train.jsonl": task.sft_rows("train", n_sft),
        "data/sft/validation.jsonl": task.sft_rows("validation", n_val),
        "data/prefs/train.jsonl": task.preference_rows("train", n_pref, label_noise),
        "data/prefs/validation.jsonl": task.preference_rows("validation", n_val, label_noise),
        "data/prompts/train.jsonl": task.prompt_rows("train"),
        "data/prompts/test.jsonl": task.prompt_rows("test"),
    }
    for rel, rows in data.items():
        write_jsonl_atomic(out / rel, rows)
        print(f"[synthetic] {rel}: {len(rows)} rows")

    files = sorted([f"model/{p.name}" for p in (out / "model").iterdir() if p.is_file()] + list(data))
    write_files_manifest(out / "manifest.json", out, files, {"params": params, "n_params": n_params})
    print(f"[synthetic] manifest: {len(files)} files checksummed -> {out / 'manifest.json'}")
    return out
